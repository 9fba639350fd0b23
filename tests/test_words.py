"""Counts in messages read as English."""

from __future__ import annotations

import pytest

from runner.words import counted


@pytest.mark.parametrize(
    ("count", "noun", "said"),
    [(0, "epoch", "0 epochs"), (1, "epoch", "1 epoch"), (2, "epoch", "2 epochs"), (1, "restart", "1 restart")],
)
def test_a_count_takes_its_noun_in_the_right_number(count: int, noun: str, said: str) -> None:
    assert counted(count, noun) == said
