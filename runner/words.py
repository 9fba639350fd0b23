"""Words in messages: a count with its noun in the right number."""

from __future__ import annotations


def counted(count: int, noun: str) -> str:
    """``"1 epoch"``, ``"0 epochs"``, ``"2 epochs"``: English plurals of the nouns runner counts (add an ``s``)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
