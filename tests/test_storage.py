"""runner.storage on real files and real processes: atomic writes under SIGKILL, the retry policy, the helpers.

The only fake here is a flaky ``os.replace``/``os.fsync`` standing in for a Drive FUSE mount that drops out
(EIO, errno 107), which cannot exist on a test machine; everything else is a real file or a real process.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from runner import defaults, storage
from runner.errors import DamagedFile, StorageError
from runner.paths import is_temp_name
from tests.conftest import REPO, runner_env
from tests.support.storage_rewriter import parse

REWRITER = REPO / "tests" / "support" / "storage_rewriter.py"

TRANSIENT = [errno.EIO, errno.ENOTCONN, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.EINTR]
DRIVE_FILE = "/content/drive/MyDrive/runner/jobs/job-a/state.json"


class Flaky:
    """A callable that raises ``OSError(code)`` on its first ``failures`` calls, then returns ``"ok"``."""

    def __init__(self, code: int, failures: int, *, filename: str = DRIVE_FILE) -> None:
        self.code, self.failures, self.filename, self.calls = code, failures, filename, 0

    def __call__(self, *args: object, **kwargs: object) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(self.code, os.strerror(self.code), self.filename)
        return "ok"


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "runner.storage" and r.levelno == logging.WARNING]


# --- atomic writes under SIGKILL ------------------------------------------------------------------------------


@pytest.mark.slow
def test_atomic_writes_killed_at_random_leave_old_or_new_never_partial(tmp_path: Path) -> None:
    target = tmp_path / "payload"
    rng = random.Random(20240607)
    last_version = 0
    for kill in range(24):
        child = subprocess.Popen(
            [sys.executable, str(REWRITER), str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=runner_env(),
            cwd=REPO,
        )
        assert child.stdout is not None
        if child.stdout.readline() == b"ready\n":
            # Kill anywhere in the loop: mid-write, mid-fsync, between the write and the rename, after it.
            try:
                child.wait(timeout=rng.uniform(0.0, 0.08))
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate()
        assert child.returncode == -signal.SIGKILL, f"rewriter died by itself:\n{stderr.decode()}"

        if target.exists():
            version = parse(target.read_bytes())  # raises on a partial or mixed payload
            assert version >= last_version, f"kill {kill}: version went back from {last_version} to {version}"
            last_version = version
        else:
            assert last_version == 0, f"kill {kill}: the file vanished after version {last_version}"
        leftovers = [name for name in os.listdir(tmp_path) if name != target.name]
        assert all(is_temp_name(name) for name in leftovers), leftovers
        assert all(target.name in name for name in leftovers), leftovers

    assert last_version >= 2, "the rewriter never got far enough for the kills to test anything"


# --- the retry policy -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", TRANSIENT, ids=[errno.errorcode[c] for c in TRANSIENT])
def test_transient_errors_are_retried_with_bounded_waits_and_logged(
    code: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="runner.storage")
    sleeps: list[float] = []
    flaky = Flaky(code, failures=3)

    result = storage.retrying(sleep=sleeps.append, max_attempts=5)(flaky)("arg", key="value")

    assert result == "ok"
    assert flaky.calls == 4
    assert len(sleeps) == 3
    assert all(0 <= pause <= defaults.RETRY_MAX_WAIT_S for pause in sleeps), sleeps
    warnings = retry_warnings(caplog)
    assert len(warnings) == 3
    assert all(os.strerror(code) in record.getMessage() for record in warnings)


def test_retry_waits_grow_exponentially_up_to_the_cap() -> None:
    # The waits are jittered (full jitter), so one run need not grow; their window does. Seeded for repeatability.
    state = random.getstate()
    random.seed(7)
    try:
        runs = []
        for _ in range(400):
            sleeps: list[float] = []
            with pytest.raises(StorageError):
                storage.retrying(sleep=sleeps.append, max_attempts=11)(Flaky(errno.EIO, failures=10**6))()
            runs.append(sleeps)
    finally:
        random.setstate(state)

    assert all(len(sleeps) == 10 for sleeps in runs)
    means = [sum(run[k] for run in runs) / len(runs) for k in range(10)]
    growing = means[:5]  # before the window (0.5 s doubling) reaches the 10 s cap
    assert all(later > 1.5 * earlier for earlier, later in zip(growing, growing[1:])), means
    assert max(max(run) for run in runs) <= defaults.RETRY_MAX_WAIT_S
    assert means[-1] <= defaults.RETRY_MAX_WAIT_S


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "space"),
        (errno.EDQUOT, "quota"),
        (errno.EACCES, "permission"),
        (errno.EROFS, "read-only"),
        (errno.ENOENT, "does not exist"),
    ],
    ids=lambda value: errno.errorcode.get(value, value) if isinstance(value, int) else value,
)
def test_permanent_errors_are_not_retried_and_say_what_to_do(
    code: int, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="runner.storage")
    sleeps: list[float] = []
    flaky = Flaky(code, failures=1)

    with pytest.raises(StorageError) as raised:
        storage.retrying(sleep=sleeps.append)(flaky)()

    assert flaky.calls == 1
    assert sleeps == []
    assert retry_warnings(caplog) == []
    error = raised.value
    assert error.errno_ == code
    assert error.transient is False
    assert error.path == DRIVE_FILE
    assert DRIVE_FILE in str(error)
    assert words in str(error).lower()
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == code


def test_transient_errors_that_never_stop_give_up_with_mount_advice(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="runner.storage")
    sleeps: list[float] = []
    flaky = Flaky(errno.ENOTCONN, failures=10**6)

    with pytest.raises(StorageError) as raised:
        storage.retrying(sleep=sleeps.append)(flaky)()

    assert flaky.calls == defaults.RETRY_MAX_ATTEMPTS
    assert len(sleeps) == defaults.RETRY_MAX_ATTEMPTS - 1
    assert len(retry_warnings(caplog)) == defaults.RETRY_MAX_ATTEMPTS - 1
    error = raised.value
    assert error.transient is True
    assert error.errno_ == errno.ENOTCONN
    assert DRIVE_FILE in str(error)
    assert "mount" in str(error) and "107" in str(error)


def test_a_bug_is_neither_retried_nor_converted() -> None:
    sleeps: list[float] = []
    bug = ValueError("not an I/O problem")
    calls = []

    def broken() -> None:
        calls.append(1)
        raise bug

    with pytest.raises(ValueError) as raised:
        storage.retrying(sleep=sleeps.append)(broken)()

    assert raised.value is bug
    assert not isinstance(raised.value, StorageError)
    assert calls == [1]
    assert sleeps == []


def test_nested_policies_do_not_multiply_retries() -> None:
    # A retried helper calling another retried helper must give up once, not max_attempts ** 2 times.
    sleeps: list[float] = []
    inner = Flaky(errno.EIO, failures=10**6)
    policy = storage.retrying(sleep=sleeps.append, max_attempts=3)
    outer = policy(policy(inner))

    with pytest.raises(StorageError) as raised:
        outer()

    assert inner.calls == 3
    assert raised.value.transient is True


# --- the helpers on real files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"epoch": 3, "metrics": {"loss"', b"\xff\xfe\x00garbage", b""], ids=str
)
def test_read_json_of_garbage_is_a_damaged_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)

    with pytest.raises(DamagedFile) as raised:
        storage.read_json(path)

    assert raised.value.path == str(path)
    assert str(path) in str(raised.value)


def test_read_json_round_trips_and_a_missing_file_is_enoent(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    storage.atomic_write_json(path, {"epoch": 3, "metrics": {"loss": 0.25}})

    assert storage.read_json(path) == {"epoch": 3, "metrics": {"loss": 0.25}}
    with pytest.raises(StorageError) as raised:
        storage.read_json(tmp_path / "missing.json")
    assert raised.value.errno_ == errno.ENOENT


def test_append_line_appends_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"

    storage.append_line(path, '{"event": "submitted"}')
    storage.append_line(path, '{"event": "claimed"}\n')
    storage.append_line(path, '{"event": "checkpoint", "epoch": 1}')

    assert path.read_bytes() == b'{"event": "submitted"}\n{"event": "claimed"}\n{"event": "checkpoint", "epoch": 1}\n'


@pytest.mark.parametrize("existing", ["empty", "full"])
def test_commit_dir_never_replaces_an_existing_folder(tmp_path: Path, existing: str) -> None:
    source, target = tmp_path / ".tmp-ckpt-1", tmp_path / "ckpt"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"new")
    target.mkdir()
    if existing == "full":
        (target / "weights.bin").write_bytes(b"old")

    with pytest.raises(StorageError) as raised:
        storage.commit_dir(source, target)

    assert raised.value.errno_ == errno.EEXIST
    assert (source / "weights.bin").read_bytes() == b"new"
    assert sorted(os.listdir(target)) == ([] if existing == "empty" else ["weights.bin"])
    if existing == "full":
        assert (target / "weights.bin").read_bytes() == b"old"


def test_commit_dir_moves_a_folder_into_place(tmp_path: Path) -> None:
    source, target = tmp_path / ".tmp-ckpt-1", tmp_path / "ckpt"
    (source / "nested").mkdir(parents=True)
    (source / "nested" / "weights.bin").write_bytes(b"weights")

    storage.commit_dir(source, target)

    assert not source.exists()
    assert (target / "nested" / "weights.bin").read_bytes() == b"weights"


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 3 * (1 << 20) + 12345])
def test_copy_file_returns_the_size_and_sha256_of_the_copy(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    source, target = tmp_path / "source.bin", tmp_path / "target.bin"
    source.write_bytes(data)

    assert storage.copy_file(source, target) == (size, hashlib.sha256(data).hexdigest())
    assert target.read_bytes() == data
    assert storage.file_digest(target) == (size, hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("size", [0, 1, 3 * (1 << 20) + 12345])
def test_write_file_returns_the_size_and_sha256_of_what_it_wrote_without_seeking(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    target = tmp_path / "target.bin"
    seen: list[bool] = []

    def produce(handle) -> None:  # noqa: ANN001
        seen.append(handle.seekable())
        for start in range(0, size, 65536):
            handle.write(data[start : start + 65536])

    assert storage.write_file(target, produce) == (size, hashlib.sha256(data).hexdigest())
    assert target.read_bytes() == data
    assert seen == [False], "a writer that seeks back would make the hash differ from the file"


def test_write_file_writes_the_whole_file_again_after_a_transient_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(defaults.RETRY_BUDGET_ENV, "5")
    data, calls = b"checkpoint bytes " * 1000, []

    def produce(handle) -> None:  # noqa: ANN001
        calls.append(1)
        handle.write(data[:100])
        if len(calls) == 1:
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))  # the mount dropped mid-write
        handle.write(data[100:])

    assert storage.write_file(tmp_path / "target.bin", produce) == (len(data), hashlib.sha256(data).hexdigest())
    assert len(calls) == 2 and (tmp_path / "target.bin").read_bytes() == data


def test_list_dir_is_sorted_and_empty_for_a_missing_folder(tmp_path: Path) -> None:
    for name in ["b", "a", ".tmp-c-1-ff"]:
        (tmp_path / name).write_text(name)

    assert storage.list_dir(tmp_path / "missing") == []
    assert storage.list_dir(tmp_path) == [".tmp-c-1-ff", "a", "b"]


def test_remove_tree_removes_everything_and_accepts_a_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "b" / "weights.bin").write_bytes(b"x" * 1000)
    (folder / "MANIFEST.json").write_text("{}")

    storage.remove_tree(folder)
    storage.remove_tree(folder)
    storage.remove_tree(tmp_path / "never-existed")

    assert not folder.exists()
    assert os.listdir(tmp_path) == []


# --- a real transient fault on a real file operation -----------------------------------------------------------


def flaky_os(monkeypatch: pytest.MonkeyPatch, name: str, code: int, failures: int) -> list[int]:
    """Make ``os.<name>`` fail with ``code`` on its first calls, as a Drive mount that drops out does."""
    real: Callable[..., object] = getattr(os, name)
    calls: list[int] = []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) <= failures:
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, flaky)
    return calls


@pytest.mark.parametrize(("call", "code"), [("replace", errno.EIO), ("fsync", errno.ENOTCONN)])
def test_atomic_write_rides_out_a_flaky_mount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, call: str, code: int
) -> None:
    caplog.set_level(logging.WARNING, logger="runner.storage")
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    data = random.Random(1).randbytes(200_000)
    calls = flaky_os(monkeypatch, call, code, failures=2)

    storage.atomic_write_bytes(path, data)
    monkeypatch.undo()

    assert path.read_bytes() == data
    assert len(calls) >= 3
    assert len(retry_warnings(caplog)) == 2
    assert os.listdir(tmp_path) == ["state.json"], "a failed try left its temporary file behind"


def test_an_exclusive_create_whose_error_came_after_the_work_is_ours_on_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount that wrote the claim marker and then failed to answer: the retry finds our own marker there."""
    marker = tmp_path / "g000003"
    calls = flaky_os(monkeypatch, "fsync", errno.ENOTCONN, failures=1)  # the file is made and written, then this

    assert storage.create_exclusive(marker, b"host-a 1234 token-a")
    monkeypatch.undo()

    assert len(calls) >= 3, "the fault was not injected"  # the failed fsync, then the file's and the folder's
    assert marker.read_bytes() == b"host-a 1234 token-a"
    assert not storage.create_exclusive(marker, b"host-b 99 token-b"), "another worker's create must lose"
    assert not storage.create_exclusive(marker), "a marker with no content to compare is never ours"


def test_an_exclusive_create_whose_error_came_right_after_making_the_file_is_ours_on_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error came after the file was made, before anything was written: the retry completes it."""
    marker = tmp_path / "g000004"
    real_open = os.open
    failed: list[str] = []

    def open_then_fail(path: object, flags: int, *args: object) -> int:
        fd = real_open(path, flags, *args)
        if flags & os.O_EXCL and not failed:
            failed.append(str(path))
            os.close(fd)
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
        return fd

    monkeypatch.setattr(os, "open", open_then_fail)
    assert storage.create_exclusive(marker, b"host-a 1234 token-a")
    monkeypatch.undo()

    assert failed == [str(marker)], "the fault was not injected"
    assert marker.read_bytes() == b"host-a 1234 token-a"


@pytest.mark.parametrize("operation", ["commit_dir", "rename"])
def test_a_rename_whose_error_came_after_the_work_is_done_on_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    """The mount renamed the folder and then failed to answer: the retry finds the work done, instead of failing
    on a source that is gone (a job failed that way in the chaos runs, pruning a checkpoint under faults)."""
    source, target = tmp_path / "checkpoints" / "g000002-e000000-s000000002", tmp_path / "checkpoints" / ".old"
    source.mkdir(parents=True)
    (source / "MANIFEST.json").write_text("{}")
    real_rename = os.rename
    failed: list[str] = []

    def rename_then_fail(old: object, new: object) -> None:
        real_rename(old, new)
        if not failed:
            failed.append(str(old))
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))

    monkeypatch.setattr(os, "rename", rename_then_fail)
    getattr(storage, operation)(source, target)
    monkeypatch.undo()

    assert failed == [str(source)], "the fault was not injected"
    assert not source.exists() and (target / "MANIFEST.json").read_text() == "{}"


def test_a_commit_onto_an_existing_folder_on_its_first_try_is_refused(tmp_path: Path) -> None:
    source, target = tmp_path / "new", tmp_path / "taken"
    source.mkdir()
    target.mkdir()
    with pytest.raises(StorageError, match="already exists"):
        storage.commit_dir(source, target)
    assert source.exists()


def test_an_empty_file_found_on_a_first_try_belongs_to_another_worker(tmp_path: Path) -> None:
    marker = tmp_path / "g000005"
    marker.write_bytes(b"")  # another worker between its create and its write
    assert not storage.create_exclusive(marker, b"host-a 1234 token-a")
    assert marker.read_bytes() == b""


def test_is_dir_and_is_file_ride_out_a_flaky_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Path.is_dir()`` answers False only for a missing path; errno 107 escapes it into code that expects none."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_bytes(b"x")
    flaky_os(monkeypatch, "stat", errno.ENOTCONN, failures=1)
    with pytest.raises(OSError, match="not connected"):
        (tmp_path / "folder").is_dir()  # the precondition: the plain call fails here
    for path, folder, file in [("folder", True, False), ("file", False, True), ("missing", False, False)]:
        flaky_os(monkeypatch, "stat", errno.ENOTCONN, failures=1)
        assert storage.is_dir(tmp_path / path) is folder
        flaky_os(monkeypatch, "stat", errno.EIO, failures=1)
        assert storage.is_file(tmp_path / path) is file
    monkeypatch.undo()
    (tmp_path / "link").symlink_to(tmp_path / "folder")
    assert storage.is_dir(tmp_path / "link") and not storage.is_dir(tmp_path / "link", follow_symlinks=False)


def test_remove_tree_retries_when_a_failed_stat_makes_a_folder_look_like_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rmtree takes a folder whose stat failed for a file, and unlink(2) then says EISDIR: another pass clears it."""
    tree = tmp_path / "snapshot"
    (tree / "variables").mkdir(parents=True)
    (tree / "variables" / "a.npy").write_bytes(b"a")
    calls = flaky_os(monkeypatch, "unlink", errno.EISDIR, failures=1)
    storage.remove_tree(tree)
    monkeypatch.undo()
    assert len(calls) >= 2, "the fault was not injected"
    assert not tree.exists()
