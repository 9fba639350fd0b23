"""TensorBoard logs: one scalar per epoch and tag, equal to history.csv, after any number of kills and resumes.

The slow tests run real `runner work` processes on a tiny real job (digits from the bundled archive) and kill them
with SIGKILL right after a checkpoint is recorded, when the TensorBoard files are being published. The fast ones
drive :class:`TensorBoardLog` directly and read its files with TensorBoard's own loader, as a live TensorBoard
would: it keeps each file open and reads on from where it stopped.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from runner.errors import StorageError
from runner.history import read_history
from runner.job import JobStatus
from runner.paths import JobPaths, event_file_name
from runner.train.outputs.tensorboard import TensorBoardLog
from tests.conftest import run_cli, start_cli
from tests.support.keras_jobs import job_of, keras_env, make_digit_folders, submit_keras_spec
from tests.support.tensorboard_files import raw_scalars, tensorboard_scalars

EPOCHS = 8
"""Enough epochs for three kills to land before the job is done (after the first, an epoch takes ~0.1 s)."""

TAGS = {"train": ("loss", "accuracy", "lr"), "validation": ("val_loss", "val_accuracy")}
"""history.csv's column behind each run's ``epoch_<metric>`` tags."""


# --- reading event files ----------------------------------------------------------------------------------------


def assert_matches_history(paths: JobPaths, epochs: int) -> dict[str, dict[str, list[float]]]:
    """One file per run, each tag's steps 0..epochs-1 once and in order, values equal (float32) to history.csv."""
    rows = read_history(paths.history)
    assert [int(row["epoch"]) for row in rows] == list(range(epochs))
    values: dict[str, dict[str, list[float]]] = {}
    for run, folder in (("train", paths.tensorboard_train), ("validation", paths.tensorboard_validation)):
        assert len(list(folder.iterdir())) == 1, sorted(folder.iterdir())
        raw, shown = raw_scalars(folder), tensorboard_scalars(folder)
        assert sorted(raw) == sorted(f"epoch_{c.removeprefix('val_')}" for c in TAGS[run])
        for column in TAGS[run]:
            tag = f"epoch_{column.removeprefix('val_')}"
            expected = [(epoch, np.float32(row[column])) for epoch, row in enumerate(rows)]
            assert [(step, np.float32(value)) for step, value in raw[tag]] == expected, (run, tag)
            assert [(step, np.float32(value)) for step, value in shown[tag]] == expected, (run, tag)
            values.setdefault(run, {})[tag] = [value for _, value in raw[tag]]
    return values


# --- real jobs --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_digit_folders(tmp_path_factory.mktemp("digits"), train_per_class=24)


@pytest.fixture(scope="module")
def uninterrupted(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> JobPaths:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    env = keras_env(tmp / "cache")
    submit_keras_spec(tmp, tmp / "queue", digits, "tiny", env, training={"epochs": EPOCHS})
    result = run_cli("work", "--queue", str(tmp / "queue"), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return job_of(tmp / "queue", "tiny").paths


def kill_after_next_checkpoint(queue: Path, env: dict[str, str], rng: random.Random) -> bool:
    """Start `runner work`, SIGKILL it just after it records a checkpoint beyond where it resumed; whether the
    kill cut the job short."""
    job = job_of(queue, "tiny")
    resumed_at = job.read_state().epoch
    worker = start_cli("work", "--queue", str(queue), env=env)
    try:
        deadline = time.monotonic() + 120
        while job.read_state().epoch <= resumed_at and worker.poll() is None:
            assert time.monotonic() < deadline, "the worker never recorded a checkpoint"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.05))  # while history.csv and the TensorBoard files are being written
        if worker.poll() is None:
            worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    return worker.returncode == -signal.SIGKILL and job.read_state().status is not JobStatus.DONE


@pytest.mark.slow
def test_an_uninterrupted_run_logs_each_epoch_once_as_in_history(uninterrupted: JobPaths) -> None:
    assert assert_matches_history(uninterrupted, EPOCHS)
    assert [p.name for p in uninterrupted.tensorboard_train.iterdir()] == [event_file_name(1)]


@pytest.mark.slow
def test_a_run_killed_three_times_logs_each_epoch_once_as_uninterrupted(
    digits: Path, uninterrupted: JobPaths, tmp_path: Path
) -> None:
    env = keras_env(tmp_path / "cache")
    queue = tmp_path / "queue"
    submit_keras_spec(tmp_path, queue, digits, "tiny", env, training={"epochs": EPOCHS})
    rng = random.Random(3)
    landed = sum(kill_after_next_checkpoint(queue, env, rng) for _ in range(3))
    assert landed >= 2, "the kills did not cut the run short"
    # The kills rarely land inside the few milliseconds of an append: leave one torn, as such a kill would.
    torn = sorted(job_of(queue, "tiny").paths.tensorboard_train.iterdir())[-1]  # older ones may be left too
    torn.write_bytes(torn.read_bytes()[:-9])
    final = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    job = job_of(queue, "tiny")
    state = job.read_state()
    assert state.status is JobStatus.DONE and state.generation >= landed + 1
    assert [p.name for p in job.paths.tensorboard_train.iterdir()] == [event_file_name(state.generation)]
    assert assert_matches_history(job.paths, EPOCHS) == assert_matches_history(uninterrupted, EPOCHS)
    assert read_history(job.paths.history) == read_history(uninterrupted.history)


@pytest.mark.slow
def test_a_tensorboard_folder_that_cannot_be_written_only_warns(digits: Path, tmp_path: Path) -> None:
    env = keras_env(tmp_path / "cache")
    queue = tmp_path / "queue"
    submit_keras_spec(tmp_path, queue, digits, "tiny", env, training={"epochs": 2})
    job = job_of(queue, "tiny")
    job.paths.tensorboard.write_text("a file where the folder should be")
    result = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert job.read_state().status is JobStatus.DONE
    assert len(read_history(job.paths.history)) == 2
    log = job.paths.log.read_text()
    assert log.count("could not write the TensorBoard logs") == 1, log[-3000:]  # once per streak of failures
    said = " ".join(result.stderr.split())
    assert said.count("warning: could not write the TensorBoard logs") == 1 and "training goes on" in said
    assert job.paths.tensorboard.read_text() == "a file where the folder should be"


# --- what a live TensorBoard sees -------------------------------------------------------------------------------


def history(epochs: int, shift: float = 0.0) -> list[dict[str, float]]:
    return [
        {"epoch": e, "loss": 1 / (e + 1) + shift, "accuracy": e / 10, "val_loss": 2 / (e + 1), "val_accuracy": e / 9}
        for e in range(epochs)
    ]


def no_fence() -> None:
    pass


def test_a_live_tensorboard_follows_each_epoch_and_a_resume_without_duplicates(tmp_path: Path) -> None:
    paths = JobPaths(tmp_path / "job")
    first = TensorBoardLog(paths, generation=1, local_folder=tmp_path / "local-1")
    first.publish(history(1), fence=no_fence)
    inode = (paths.tensorboard_train / first.name).stat().st_ino
    live = event_accumulator.EventAccumulator(str(paths.tensorboard_train))
    assert tensorboard_scalars(paths.tensorboard_train, live)["epoch_loss"] == [(0, 1.0)]
    first.publish(history(3), fence=no_fence)
    assert (paths.tensorboard_train / first.name).stat().st_ino == inode  # grown in place, not replaced
    assert [step for step, _ in tensorboard_scalars(paths.tensorboard_train, live)["epoch_loss"]] == [0, 1, 2]

    # The next claim restores a checkpoint at epoch 2 (the file's third epoch was never committed) and goes on
    # with other values: the live reader drops what it had and shows each epoch once, from the new file.
    second = TensorBoardLog(paths, generation=2, local_folder=tmp_path / "local-2")
    second.publish(history(2, shift=5.0), fence=no_fence)
    assert sorted(p.name for p in paths.tensorboard_train.iterdir()) == [second.name]
    second.publish(history(4, shift=5.0), fence=no_fence)
    expected = [(e, np.float32(1 / (e + 1) + 5.0)) for e in range(4)]
    shown = tensorboard_scalars(paths.tensorboard_train, live)["epoch_loss"]
    assert [(step, np.float32(value)) for step, value in shown] == expected
    assert [(step, np.float32(value)) for step, value in raw_scalars(paths.tensorboard_train)["epoch_loss"]] == expected


def test_a_published_file_grows_in_place_and_a_torn_append_is_completed(tmp_path: Path) -> None:
    paths = JobPaths(tmp_path / "job")
    log = TensorBoardLog(paths, generation=3, local_folder=tmp_path / "local")
    log.publish(history(2), fence=no_fence)
    file = paths.tensorboard_validation / log.name
    inode = file.stat().st_ino
    file.write_bytes(file.read_bytes()[:-5])  # an append cut short by a failing mount
    log.publish(history(3), fence=no_fence)
    assert file.stat().st_ino == inode, "replaced: a live TensorBoard would never read it again"
    assert file.read_bytes() == (tmp_path / "local" / "validation" / log.name).read_bytes()
    assert [step for step, _ in raw_scalars(paths.tensorboard_validation)["epoch_loss"]] == [0, 1, 2]


def test_a_failed_publish_is_done_by_the_next_and_fencing_stops_it(tmp_path: Path) -> None:
    paths = JobPaths(tmp_path / "job")
    paths.folder.mkdir()
    paths.tensorboard.write_text("in the way")
    log = TensorBoardLog(paths, generation=1, local_folder=tmp_path / "local")
    with pytest.raises(StorageError):
        log.publish(history(1), fence=no_fence)
    paths.tensorboard.unlink()
    log.publish(history(2), fence=no_fence)
    assert [step for step, _ in raw_scalars(paths.tensorboard_train)["epoch_loss"]] == [0, 1]

    class Fenced(Exception):
        pass

    def fenced() -> None:
        raise Fenced

    before = (paths.tensorboard_train / log.name).read_bytes()
    with pytest.raises(Fenced):
        log.publish(history(3), fence=fenced)
    assert (paths.tensorboard_train / log.name).read_bytes() == before


def test_a_newer_generations_file_and_other_files_are_left_alone(tmp_path: Path) -> None:
    paths = JobPaths(tmp_path / "job")
    paths.tensorboard_train.mkdir(parents=True)
    keras_file = paths.tensorboard_train / "events.out.tfevents.1700000000.host.1.v2"
    newer = paths.tensorboard_train / event_file_name(9)
    older = paths.tensorboard_train / event_file_name(4)
    for path in (keras_file, newer, older):
        path.write_bytes(b"")
    TensorBoardLog(paths, generation=5, local_folder=tmp_path / "local").publish(history(1), fence=no_fence)
    assert sorted(p.name for p in paths.tensorboard_train.iterdir()) == sorted(
        [keras_file.name, newer.name, event_file_name(5)]
    )


def test_a_job_without_validation_has_no_validation_run(tmp_path: Path) -> None:
    paths = JobPaths(tmp_path / "job")
    rows = [{"epoch": e, "loss": 1.0 / (e + 1)} for e in range(2)]
    TensorBoardLog(paths, generation=1, local_folder=tmp_path / "local").publish(rows, fence=no_fence)
    assert raw_scalars(paths.tensorboard_train) == {"epoch_loss": [(0, 1.0), (1, 0.5)]}
    assert not paths.tensorboard_validation.exists()
