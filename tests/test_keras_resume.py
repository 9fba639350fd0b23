"""Resume of real Keras training from damaged checkpoints, and a finished job left alone.

The kill-and-resume tests proper are in tests/test_kill_resume.py.

Each run is a real `runner work` process with the default Keras trainer on a tiny real dataset (digits from
the bundled archive), a model with Dropout and random augmentation, and `deterministic: true`.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from runner.checkpoints import CheckpointStore
from runner.history import read_history
from runner.job import Job, JobStatus
from tests.conftest import run_cli, start_cli
from tests.support.keras_jobs import job_of, keras_env, make_digit_folders, submit_keras_spec, write_keras_spec

pytestmark = pytest.mark.slow

EPOCHS = 4


def newest_variables(queue: Path, name: str) -> dict[str, np.ndarray]:
    store = CheckpointStore(job_of(queue, name), keep=2)
    newest = store.newest()
    assert newest is not None
    with np.load(newest.path / "variables.npz") as arrays:
        return {key: arrays[key].copy() for key in arrays.files}


def events(queue: Path, name: str, kind: str) -> list[dict]:
    return [event for event in job_of(queue, name).events.read() if event["event"] == kind]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_digit_folders(tmp_path_factory.mktemp("digits"), train_per_class=24)


@pytest.fixture(scope="module")
def reference(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list]:
    """Variables and history of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    env = keras_env(tmp / "cache")
    submit_keras_spec(tmp, tmp / "queue", digits, "tiny", env)
    result = run_cli("work", "--queue", str(tmp / "queue"), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert job_of(tmp / "queue", "tiny").read_state().status is JobStatus.DONE
    return newest_variables(tmp / "queue", "tiny"), read_history(job_of(tmp / "queue", "tiny").paths.history)


def signal_after_epochs(queue: Path, env: dict[str, str], job: Job, *, epochs: int, signum: int) -> None:
    """Run `runner work` and send it ``signum`` once ``epochs`` epochs are checkpointed (or it has ended)."""
    worker = start_cli("work", "--queue", str(queue), env=env)
    try:
        deadline = time.monotonic() + 180
        while job.read_state().epoch < epochs and worker.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        worker.send_signal(signum)
        worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()


def assert_same_result(queue: Path, reference: tuple[dict, list]) -> None:
    variables, history = reference
    got = newest_variables(queue, "tiny")
    assert got.keys() == variables.keys()
    for key in variables:
        assert np.array_equal(got[key], variables[key]), f"{key} differs from the uninterrupted run"
    rows = read_history(job_of(queue, "tiny").paths.history)
    assert [row["epoch"] for row in rows] == [str(epoch) for epoch in range(EPOCHS)]
    assert rows == history


def test_a_damaged_newest_checkpoint_falls_back_and_ends_bit_identical(
    digits: Path, reference: tuple[dict, list], tmp_path: Path
) -> None:
    env = keras_env(tmp_path / "cache")
    queue = tmp_path / "queue"
    submit_keras_spec(tmp_path, queue, digits, "tiny", env)
    job = job_of(queue, "tiny")
    signal_after_epochs(queue, env, job, epochs=2, signum=signal.SIGKILL)
    store = CheckpointStore(job, keep=2)
    committed = store.committed()
    if job.read_state().status is JobStatus.DONE or len(committed) < 2:
        pytest.skip("the run finished before it could be interrupted with two checkpoints")
    newest = committed[0]
    weights = newest.path / "variables.npz"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a cut upload
    final = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    fallbacks = events(queue, "tiny", "fallback")
    assert [event["checkpoint"] for event in fallbacks] == [newest.id]
    said = " ".join(final.stderr.split())
    assert f"warning: checkpoint {newest.id} of 'tiny' does not verify" in said and "using the one before it" in said
    assert f"checkpoint {newest.id} does not verify" in job.paths.log.read_text()
    resumed = events(queue, "tiny", "resumed")[-1]
    assert resumed["checkpoint"] == committed[1].id
    assert_same_result(queue, reference)


def test_a_finished_job_is_never_trained_again(digits: Path, tmp_path: Path) -> None:
    env = keras_env(tmp_path / "cache")
    queue = tmp_path / "queue"
    submit_keras_spec(tmp_path, queue, digits, "tiny", env, training={"epochs": 1})
    assert run_cli("work", "--queue", str(queue), env=env, timeout=600).returncode == 0
    before = job_of(queue, "tiny").read_state()
    again = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    assert again.returncode == 0
    assert job_of(queue, "tiny").read_state() == before
    status = json.loads(run_cli("status", "--json", "--queue", str(queue), env=env).stdout)
    assert status[0]["state"] == "done" and status[0]["epoch"] == 1


def test_when_no_checkpoint_verifies_the_job_starts_again_and_says_so(digits: Path, tmp_path: Path) -> None:
    env = keras_env(tmp_path / "cache")
    queue = tmp_path / "queue"
    submit_keras_spec(tmp_path, queue, digits, "tiny", env)
    job = job_of(queue, "tiny")
    # SIGTERM saves a checkpoint and stops: the job is left resumable.
    signal_after_epochs(queue, env, job, epochs=1, signum=signal.SIGTERM)
    committed = CheckpointStore(job, keep=2).committed()
    if job.read_state().status is JobStatus.DONE or not committed:
        pytest.skip("the run finished before it could be stopped with a checkpoint")
    for info in committed:  # every checkpoint damaged, as by a sync tool gone wrong
        weights = info.path / "variables.npz"
        weights.write_bytes(b"\0" * weights.stat().st_size)

    final = run_cli("work", "--queue", str(queue), env=env, timeout=600)

    assert final.returncode == 0, final.stderr[-3000:]
    said = " ".join(final.stderr.split())
    assert "warning: no checkpoint of 'tiny' verifies: training starts again from the beginning" in said
    assert [event["checkpoint"] for event in events(queue, "tiny", "fallback")] == [info.id for info in committed]
    assert events(queue, "tiny", "started")[-1]["generation"] == job.read_state().generation
    history = read_history(job.paths.history)
    assert [int(row["epoch"]) for row in history] == list(range(len(history)))  # each epoch once, from 0


def test_an_edited_learning_rate_replaces_the_one_the_checkpoint_restores(digits: Path, tmp_path: Path) -> None:
    env, queue = keras_env(tmp_path / "cache"), tmp_path / "queue"
    submit_keras_spec(tmp_path, queue, digits, "tiny", env, training={"epochs": 2})
    killed = run_cli("work", "--queue", str(queue), env={**env, "RUNNER_KILL_AT": "state-written:1"}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    job = job_of(queue, "tiny")
    first = job.read_state().checkpoint
    assert first is not None and job.read_state().epoch == 1
    spec = write_keras_spec(tmp_path, "tiny", digits, training={"epochs": 2, "learning_rate": 0.005})

    edited = run_cli("edit", "tiny", str(spec), "--queue", str(queue), env=env)

    assert edited.returncode == 0, edited.stderr
    assert f"trains on from checkpoint {first}" in " ".join(edited.stderr.split())
    done = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "learning rate 0.005 from the spec replaces 0.01 of checkpoint" in " ".join(done.stderr.split())
    (changed,) = events(queue, "tiny", "learning-rate")
    assert changed["checkpoint"] == first and changed["after"] == 0.005
    assert np.float32(changed["before"]) == np.float32(0.01)
    # The optimizer's float scalars: its learning rate alone (its iteration count is an integer).
    saved = newest_variables(queue, "tiny")
    rates = [value for key, value in saved.items() if key.startswith("optimizer/") and value.shape == ()]
    assert [float(value) for value in rates if value.dtype.kind == "f"] == [float(np.float32(0.005))]
