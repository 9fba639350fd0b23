"""The user's own Keras code (runner.train.own_code), killed: the tutorial's script (tests/support/own_code_job.py) through ``runner.fit``
and through the ``Checkpointing`` callback in its own ``model.fit``, SIGKILLed after commits (in training) and
inside publishing, ends bit-identical to an uninterrupted run of the same script, with each epoch once in
history.csv and in the CSVLogger's file, and every kill after a commit resumed from that commit with nothing
redone. Each test checks that its kills landed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import runner_env
from tests.support.keras_jobs import make_digit_folders
from tests.support.kill_harness import (
    Kill,
    KillRun,
    Reference,
    assert_same_result,
    check_resumes,
)

pytestmark = pytest.mark.slow

EPOCHS = 10
QUICK = (0.0, 0.05)
"""A kill's delay after a commit: an epoch of the tiny job takes about 0.1 s."""


def _command(queue: Path, way: str, data: Path, every_minutes: float | None) -> tuple[str, ...]:
    minutes = () if every_minutes is None else (str(every_minutes),)
    return ("-m", "tests.support.own_code_job", str(queue), "tutorial", str(data), way, str(EPOCHS), *minutes)


def _env(tmp_path: Path) -> dict[str, str]:
    env = runner_env(RUNNER_CACHE=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("RUNNER_TRAINER", None)
    return env


def _run(folder: Path, way: str, data: Path, env: dict[str, str], every_minutes: float | None, seed: int) -> KillRun:
    """Sessions of the script on a queue of its own in ``folder``."""
    queue = folder / "queue"
    command = _command(queue, way, data, every_minutes)
    return KillRun(queue, "tutorial", env, rng=random.Random(seed), folder=folder.parent, command=command)


def _csv_rows(queue: Path) -> list[str]:
    return (queue.parent / "tutorial.csv").read_text().splitlines()


CASES = {
    # runner.fit on image_dataset_from_directory's seeded shuffle: exact at epoch boundaries.
    "fit": (
        None,
        [
            Kill.after_commit(1, QUICK),
            Kill.at("commit-manifest", 1),
            Kill.after_commit(2, QUICK),
            Kill.at("state-written", 1),
        ],
    ),
    # runner.fit on runner's dataset, checkpointing every few steps: exact part way through epochs.
    "runner-data": (
        0.0001,
        [
            Kill.after_commit(2, QUICK),
            Kill.at("commit-renamed", 3),
            Kill.after_commit(3, QUICK),
            Kill.at("commit-copied", 2),
        ],
    ),
    # The user's own model.fit with the callback: exact at epoch boundaries.
    "callback": (
        None,
        [
            Kill.after_commit(1, QUICK),
            Kill.at("commit-renamed", 1),
            Kill.after_commit(2, QUICK),
            Kill.at("history-written", 1),
        ],
    ),
}


@pytest.mark.parametrize("way", list(CASES))
def test_the_tutorial_script_killed_after_commits_ends_as_the_uninterrupted_run(tmp_path: Path, way: str) -> None:
    data = make_digit_folders(tmp_path / "digits", classes=3, train_per_class=12, val_per_class=4)
    env = _env(tmp_path)
    every_minutes, kills = CASES[way]
    uninterrupted = _run(tmp_path / "reference", way, data, env, every_minutes, seed=0)
    uninterrupted.finish()
    reference = Reference.of(uninterrupted.queue, "tutorial", env)
    run = _run(tmp_path / "killed", way, data, env, every_minutes, seed=3)
    queue = run.queue
    for kill in kills:
        run.session(kill)
    run.finish()
    run.report()
    # The kills must have landed where they were meant to: in training after a commit, and inside publishing.
    landed = run.landed()
    assert len(landed) == len(kills), run.summary()
    assert len(run.landed("training")) >= 2, run.summary()
    assert run.boundary_resumes() + run.mid_epoch_resumes() >= len(kills) - 1, run.summary()
    if every_minutes is not None:
        assert run.mid_epoch_resumes() >= 1, run.summary()
    check_resumes(run)
    assert_same_result(run, reference)
    # The user's CSVLogger file: each epoch once, as the uninterrupted run wrote it.
    rows = _csv_rows(queue)
    assert [row.split(",")[0] for row in rows[1:]] == [str(epoch) for epoch in range(EPOCHS)], rows
    assert rows == _csv_rows(tmp_path / "reference" / "queue")
