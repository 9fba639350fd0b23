"""A queue folder that cannot be used: one line naming the folder and the fix, a non-zero exit, no traceback,
and nothing half-written."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_spec


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("command", ["submit", "work", "status"])
def test_a_queue_path_through_a_file_is_one_line(tmp_path: Path, command: str) -> None:
    spec = write_spec(tmp_path, "job-a")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be\n")
    args = [command, "--queue", str(blocker / "queue")] + ([str(spec)] if command == "submit" else [])

    result = run_cli(*args)

    assert result.returncode == 1
    line = one_error_line(result)
    assert str(blocker) in line
    assert "a part of this path is a file, not a folder" in line
    assert blocker.read_text() == "a file where a folder should be\n"


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A real read-only file system (a small tmpfs), mounted writable first so that a queue can be put on it."""
    folder = tmp_path / "mnt"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def test_submitting_to_a_read_only_folder_is_one_line_and_writes_nothing(read_only_folder: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "job-a")
    remount_read_only(read_only_folder)

    result = run_cli("submit", "--queue", str(read_only_folder / "queue"), str(spec))

    assert result.returncode == 1
    assert "read-only file system: use a writable folder" in one_error_line(result)
    assert list(read_only_folder.iterdir()) == []


def test_working_a_queue_that_became_read_only_leaves_the_job_as_it_was(read_only_folder: Path, tmp_path: Path) -> None:
    queue_dir = read_only_folder / "queue"
    spec = write_spec(tmp_path, "job-a")
    assert run_cli("submit", "--queue", str(queue_dir), str(spec)).returncode == 0
    state_before = (queue_dir / "jobs" / "job-a" / "state.json").read_bytes()
    remount_read_only(read_only_folder)

    worked = run_cli("work", "--queue", str(queue_dir))
    status = run_cli("status", "--json", "--queue", str(queue_dir))

    assert worked.returncode == 1
    assert "Traceback" not in worked.stderr
    assert "read-only file system: use a writable folder" in " ".join(worked.stderr.split())
    assert (queue_dir / "jobs" / "job-a" / "state.json").read_bytes() == state_before
    assert status.returncode == 0 and '"state": "queued"' in status.stdout
