"""Full disks: the job folder (and the local cache) on a small tmpfs.

ENOSPC during a checkpoint leaves the previous checkpoint intact, `runner work` stops with one line about space
(exit 1, no traceback), status shows why, and once there is room the job resumes and ends bit-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runner.checkpoints import CheckpointStore
from runner.job import JobStatus
from tests.conftest import run_cli
from tests.support.keras_jobs import job_of, keras_env, make_digit_folders, write_keras_spec

pytestmark = pytest.mark.slow


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


def _resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(mount, "4m"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_digit_folders(tmp_path_factory.mktemp("digits"))


def _newest_variables(queue: Path) -> dict[str, np.ndarray]:
    newest = CheckpointStore(job_of(queue, "tiny"), keep=2).newest()
    assert newest is not None
    with np.load(newest.path / "variables.npz") as arrays:
        return {key: arrays[key].copy() for key in arrays.files}


def _assert_clean_space_error(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-2000:]
    assert "Traceback" not in output
    assert "no space left" in " ".join(result.stderr.split())  # the line may name a long path


def _reference(tmp_path: Path, digits: Path) -> dict[str, np.ndarray]:
    env, queue = keras_env(tmp_path / "ref-cache"), tmp_path / "ref-queue"
    spec = write_keras_spec(tmp_path, "tiny", digits)
    assert run_cli("submit", str(spec), "--queue", str(queue), env=env).returncode == 0
    assert run_cli("work", "--queue", str(queue), env=env, timeout=600).returncode == 0
    return _newest_variables(queue)


def test_a_full_job_folder_stops_cleanly_and_resumes_once_there_is_room(
    tmp_path: Path, tmpfs: Path, digits: Path
) -> None:
    reference = _reference(tmp_path, digits)
    env, queue = keras_env(tmp_path / "cache"), tmpfs / "queue"
    spec = write_keras_spec(tmp_path, "tiny", digits)
    assert run_cli("submit", str(spec), "--queue", str(queue), env=env).returncode == 0
    # Leave room for the job's own small files and one checkpoint (about 60 KB in tmpfs pages), not two.
    job = job_of(queue, "tiny")
    used = sum(path.stat().st_size for path in queue.rglob("*") if path.is_file())
    _resize(tmpfs, str(used + 100_000))

    first = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    _assert_clean_space_error(first)
    state = job.read_state()
    assert state.status is JobStatus.RUNNING and state.epoch < 4
    store = CheckpointStore(job, keep=2)
    committed = store.committed()
    assert committed, "the checkpoints before the full disk must still be there"
    for info in committed:
        store.verify(info)
    assert not [name for name in os.listdir(store.folder) if name.startswith(".tmp-")]
    status = json.loads(run_cli("status", "--json", "--queue", str(queue), env=env).stdout)[0]
    assert status["state"] == "interrupted"
    assert "no space left" in (status["error"] or "")
    assert any(event["event"] == "space-warning" for event in job.events.read())

    _resize(tmpfs, "20m")
    second = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert job.read_state().status is JobStatus.DONE
    assert job.read_state().error is None
    got = _newest_variables(queue)
    assert got.keys() == reference.keys()
    assert all(np.array_equal(got[key], reference[key]) for key in reference)


def test_a_full_local_cache_stops_cleanly_and_resumes(tmp_path: Path, tmpfs: Path, digits: Path) -> None:
    # The dataset is a local folder (used in place), so the local cache only holds what a claim writes there: its
    # TensorBoard files, the export, a checkpoint that waits on a failing job folder or is kept.
    env, queue = keras_env(tmpfs / "cache"), tmp_path / "queue"
    spec = write_keras_spec(tmp_path, "tiny", digits)
    assert run_cli("submit", str(spec), "--queue", str(queue), env=env).returncode == 0
    _resize(tmpfs, "20k")
    first = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    _assert_clean_space_error(first)
    job = job_of(queue, "tiny")
    assert job.read_state().status is JobStatus.RUNNING
    _resize(tmpfs, "20m")
    second = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert job.read_state().status is JobStatus.DONE


def test_a_write_that_runs_out_of_space_names_the_file(tmpfs: Path, tmp_path: Path) -> None:
    from runner import storage  # noqa: PLC0415
    from runner.errors import StorageError  # noqa: PLC0415

    target = tmpfs / "checkpoint.bin"
    big = b"\1" * (8 << 20)  # twice the tmpfs
    source = tmp_path / "big.bin"
    source.write_bytes(big)
    for write in (lambda: storage.atomic_write_bytes(target, big), lambda: storage.copy_file(source, target)):
        with pytest.raises(StorageError) as caught:
            write()
        assert str(caught.value).startswith(f"{target}: no space left on the device")
    assert [entry.name for entry in tmpfs.iterdir() if entry.name.startswith(".tmp-")] == []
