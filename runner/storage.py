"""File I/O that survives kills and flaky mounts: atomic writes, directory commits, one retry policy.

Every function here may be cut by SIGKILL at any instant and leaves either the old content or the new, never a
mix. Transient errors (a Drive mount that drops, errno 107; EIO; timeouts) are retried with backoff under one
policy; permanent ones (no space, no permission, read-only, missing) are not, and every error that is left
surfaces as a :class:`~runner.errors.StorageError` that says what to do.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import stat as stat_module
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import tenacity

from runner import defaults
from runner.errors import DamagedFile, StorageError, UsageError
from runner.paths import temp_sibling
from runner.settings import seconds_from_environment

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_ERRNOS = frozenset(
    {errno.EIO, errno.ENOTCONN, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.EINTR, errno.ECONNABORTED}
)
"""Errors a network mount gives while it recovers: worth another try."""

_CHUNK = 1 << 20


def is_transient(error: BaseException) -> bool:
    """Whether an error is worth retrying: a transient OS error, never a permanent one or a bug."""
    return isinstance(error, OSError) and not isinstance(error, StorageError) and error.errno in TRANSIENT_ERRNOS


def retrying(
    *,
    transient: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
    budget_s: float | None = None,
    max_attempts: int = defaults.RETRY_MAX_ATTEMPTS,
    shorter_budget: Callable[[BaseException], float | None] | None = None,
    describe: Callable[..., str] | None = None,
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """The retry policy as a decorator: transient errors retried with jittered backoff, within a budget.

    ``transient`` decides what is worth another try (by default: transient OS errors of a mount; downloads pass
    their own test). ``budget_s`` bounds the seconds spent on one operation; by default the process-wide budget
    (:func:`set_retry_budget`); ``shorter_budget`` may cut it for an error (a refused connection). Every failed
    try is logged, named by ``describe(*args, **kwargs)`` when given. OS errors left once the policy gives up
    (and permanent ones at once) become :class:`StorageError`.
    """

    def over_budget(state: tenacity.RetryCallState) -> bool:
        limit = budget_s if budget_s is not None else _budget[0]
        error = state.outcome.exception() if state.outcome else None
        if shorter_budget is not None and error is not None and (cut := shorter_budget(error)) is not None:
            limit = min(limit, cut)
        return (state.seconds_since_start or 0.0) >= limit

    def log_retry(state: tenacity.RetryCallState) -> None:
        what = describe(*state.args, **state.kwargs) if describe is not None else None
        _log_retry(state, what)

    policy = tenacity.retry(
        retry=tenacity.retry_if_exception(transient),
        stop=tenacity.stop_any(over_budget, tenacity.stop_after_attempt(max_attempts)),
        wait=tenacity.wait_random_exponential(multiplier=0.5, max=defaults.RETRY_MAX_WAIT_S),
        before_sleep=log_retry,
        sleep=sleep,
        reraise=True,
    )

    def decorate(function: Callable[..., T]) -> Callable[..., T]:
        retried = policy(function)

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> T:
            try:
                return retried(*args, **kwargs)
            except StorageError:
                raise
            except OSError as error:
                raise storage_error(error) from error

        return call

    return decorate


def _log_retry(state: tenacity.RetryCallState, what: str | None = None) -> None:
    error = state.outcome.exception() if state.outcome else None
    pause = state.next_action.sleep if state.next_action else 0.0
    if what is None:
        log.warning("storage error (%s), try %d, retrying in %.1fs", error, state.attempt_number, pause)
    else:
        log.warning("%s failed (%s), try %d, retrying in %.1fs", what, error, state.attempt_number, pause)


def _budget_from_environment() -> float:
    # Read at import, where an error cannot be reported well: a bad value falls back to the default here, and the
    # command line refuses it with one line (check_retry_budget_environment).
    try:
        return check_retry_budget_environment()
    except UsageError:
        return defaults.RETRY_BUDGET_S


def check_retry_budget_environment(environ: Mapping[str, str] = os.environ) -> float:
    """``$RUNNER_RETRY_BUDGET`` seconds, or the default; :class:`UsageError` for a value that is not one."""
    return seconds_from_environment(
        defaults.RETRY_BUDGET_ENV, defaults.RETRY_BUDGET_S, allow_zero=True, environ=environ
    )


_budget = [_budget_from_environment()]


def retry_budget() -> float:
    """The process-wide retry budget in seconds (:func:`set_retry_budget`, ``$RUNNER_RETRY_BUDGET``)."""
    return _budget[0]


def set_retry_budget(seconds: float) -> None:
    """Change the process-wide retry budget, e.g. shorter for a status command than for a training worker."""
    if not seconds >= 0:
        raise ValueError(f"retry budget must be zero or more seconds, got {seconds!r}")
    _budget[0] = seconds


retry_io = retrying()
"""The policy every job-folder operation runs under (budget: ``$RUNNER_RETRY_BUDGET`` seconds, else the default)."""


_ADVICE = {
    errno.ENOSPC: "no space left on the device: free some space (on Drive, empty the trash) or lower checkpoint.keep",
    errno.EDQUOT: "storage quota exceeded: free space on Drive (deleted files count until the trash is emptied)",
    errno.EACCES: "permission denied: use a folder you can write to",
    errno.ENOTDIR: "a part of this path is a file, not a folder: choose another folder",
    errno.EPERM: "operation not permitted: use a folder you can write to",
    errno.EROFS: "read-only file system: use a writable folder",
    errno.ENOENT: "does not exist",
}


def storage_error(error: OSError) -> StorageError:
    """A one-line :class:`StorageError` for an OS error, naming the path and what to do."""
    path = error.filename if isinstance(error.filename, str) else None
    where = f"{path}: " if path else ""
    if error.errno in _ADVICE:
        message = f"{where}{_ADVICE[error.errno]}"
    elif error.errno in TRANSIENT_ERRNOS:
        message = (
            f"{where}{error.strerror or error} (kept failing after retries): check that the folder's mount is "
            "still there (errno 107 means Drive disconnected), then run the command again"
        )
    else:
        message = f"{where}{error.strerror or error}"
    return StorageError(message, path=path, errno_=error.errno, transient=error.errno in TRANSIENT_ERRNOS)


def _fsync_file(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable; a no-op where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        # Some FUSE mounts refuse fsync on directories; the rename itself is still atomic there.
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@retry_io
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a reader sees the old content or the new, never a mix."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            _fsync_file(handle)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        _name_the_path(error, path)
        raise
    fsync_dir(path.parent)


def _name_the_path(error: BaseException, path: Path) -> None:
    """A failed write(2) or fsync(2) (no space, quota) names no file: say which one, for the one-line message."""
    if isinstance(error, OSError) and error.filename is None:
        error.filename = str(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with UTF-8 ``text`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    """Replace ``path`` with ``value`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


@retry_io
def read_bytes(path: Path) -> bytes:
    """The content of ``path``; a missing file raises ``StorageError`` with ``errno_ == ENOENT``."""
    return Path(path).read_bytes()


def read_json(path: Path) -> Any:
    """Parse a JSON file; garbage in it raises :class:`DamagedFile`."""
    data = read_bytes(path)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFile(str(path), f"not valid JSON ({error})") from None


@retry_io
def append_line(path: Path, line: str) -> None:
    """Append one line with a single write, so that concurrent or killed writers never interleave within it."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except OSError as error:
        _name_the_path(error, path)
        raise
    finally:
        os.close(fd)


@retry_io
def exists(path: Path) -> bool:
    """Whether ``path`` exists; a mount that fails to answer is retried like any other operation."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


@retry_io
def file_size(path: Path) -> int | None:
    """The size of a file in bytes, or ``None`` when it does not exist; retried like :func:`exists`."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


@retry_io
def is_dir(path: Path, *, follow_symlinks: bool = True) -> bool:
    """Whether ``path`` is a folder (with ``follow_symlinks=False``: a folder, not a link to one); retried.

    ``Path.is_dir()`` returns ``False`` only for a missing path: on a struggling mount it raises errno 107 or EIO
    out of code that never expected an error."""
    try:
        return stat_module.S_ISDIR(os.stat(path, follow_symlinks=follow_symlinks).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


@retry_io
def is_file(path: Path) -> bool:
    """Whether ``path`` is a regular file; retried like :func:`is_dir`."""
    try:
        return stat_module.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def create_exclusive(path: Path, content: bytes = b"") -> bool:
    """Create a file holding ``content``; ``False`` if it already exists (someone else created it first).

    Exclusive on one machine only: on Drive each VM decides against its own view, so two VMs can both create it
    (see :meth:`runner.job.Job.check_claim`). A mount can do the work and then fail to answer (Drive's errno 107
    after the file was made): the retry then finds the file of its own earlier try, holding ``content`` or, when
    the error came before the write, nothing yet; either is ours, and is completed and made durable."""
    tried = False

    @retry_io
    def attempt() -> bool:
        nonlocal tried
        earlier, tried = tried, True
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            existing = Path(path).read_bytes()
            if not (earlier and content and existing in (b"", content)):
                return False
            fd = os.open(path, os.O_WRONLY)
        try:
            if content and os.fstat(fd).st_size != len(content):
                os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
        return True

    return attempt()


@retry_io
def make_dirs(path: Path) -> None:
    """Create a folder and its parents if missing."""
    Path(path).mkdir(parents=True, exist_ok=True)


def rename(source: Path, target: Path) -> None:
    """Rename a file or a folder in one step (same file system), retried on a transient error; a retry that finds
    the work done by its own earlier try (the mount renamed, then failed to answer) takes it as done."""
    _rename_retried(source, target, refuse_existing=False)


def _rename_retried(source: Path, target: Path, *, refuse_existing: bool) -> None:
    """``os.rename`` under the retry policy, where a retry that finds its own earlier try's work (the source gone,
    the target there) takes it as done. With ``refuse_existing`` (a commit), a target found on the first try is
    refused (rename(2) would silently replace an empty folder), and the rename is made durable."""
    tried = False

    @retry_io
    def attempt() -> None:
        nonlocal tried
        earlier, tried = tried, True
        if not (earlier and _renamed_already(source, target)):
            if refuse_existing and target.exists():
                raise StorageError(f"{target}: already exists", path=str(target), errno_=errno.EEXIST)
            os.rename(source, target)
        if refuse_existing:
            fsync_dir(target.parent)

    attempt()


def _renamed_already(source: Path, target: Path) -> bool:
    """Whether an earlier try of this rename did it: the source is gone and the target is there."""
    return not os.path.lexists(source) and os.path.lexists(target)


def tree_size(path: Path) -> int | None:
    """Bytes held by the files under ``path`` (one stat each; no retries: for a display); ``None`` when the folder
    cannot be read at all."""
    total, readable = 0, False
    for folder, _, files in os.walk(path):
        readable = True
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:
                continue  # removed while walking (a pruned checkpoint): it holds nothing now
    return total if readable else None


@retry_io
def list_dir(path: Path) -> list[str]:
    """Sorted entry names of a folder; an empty list when it does not exist."""
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _transient_for_rmtree(error: BaseException) -> bool:
    # rmtree asks each entry whether it is a folder; when the mount fails to answer it takes the folder for a
    # file, and unlink(2) then fails with EISDIR (or rmdir(2) with ENOTEMPTY after a failed listing): errors of a
    # flaky mount, not of the tree, that another pass clears.
    return is_transient(error) or (isinstance(error, OSError) and error.errno in (errno.EISDIR, errno.ENOTEMPTY))


@retrying(transient=_transient_for_rmtree)
def remove_tree(path: Path) -> None:
    """Delete a folder and everything in it; a missing folder is fine."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


@retry_io
def remove(path: Path) -> None:
    """Remove a folder with everything in it, or a file."""
    remove_tree(path) if Path(path).is_dir() else remove_file(path)


def remove_file(path: Path) -> None:
    """Delete a file; a missing file is fine."""
    Path(path).unlink(missing_ok=True)


@retry_io
def copy_file(source: Path, target: Path, *, durable: bool = True) -> tuple[int, str]:
    """Copy ``source`` to ``target`` and, unless ``durable`` is false, make it durable; return the size and sha256
    of what was written. A scratch copy that is read once and deleted (a restore's, on local disk) skips the
    fsync: for a gigabyte it is seconds of waiting for a durability nobody needs."""
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(_CHUNK):
            try:
                writer.write(chunk)
            except OSError as error:
                _name_the_path(error, target)
                raise
            digest.update(chunk)
            size += len(chunk)
        try:
            if durable:
                _fsync_file(writer)
            else:
                writer.flush()
        except OSError as error:
            _name_the_path(error, target)
            raise
    return size, digest.hexdigest()


class _HashingWriter(io.RawIOBase):
    """A file opened for writing, seen through the sha256 and size of what goes into it, and never seeking: a
    zip written through it puts each member's sizes after the member (a data descriptor) instead of seeking back,
    so every byte is hashed once, in the order it lands in the file."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.raw.write(view)
        self.digest.update(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        raise io.UnsupportedOperation("a hashed write does not seek")

    def flush(self) -> None:
        self.raw.flush()


@retry_io
def write_file(target: Path, produce: Callable[[BinaryIO], None]) -> tuple[int, str]:
    """Write a new file with ``produce(handle)`` and make it durable; return the size and sha256 of what was
    written. For files made in memory (a snapshot's): one write of the bytes, hashed as they are written. A retry
    writes the whole file again, so ``produce`` must be able to run more than once."""
    with open(target, "wb") as raw:
        hashing = _HashingWriter(raw)
        try:
            produce(hashing)  # type: ignore[arg-type]
            _fsync_file(raw)
        except OSError as error:
            _name_the_path(error, target)
            raise
    return hashing.size, hashing.digest.hexdigest()


@retry_io
def file_digest(path: Path) -> tuple[int, str]:
    """Size and sha256 of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as reader:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def commit_dir(source: Path, target: Path) -> None:
    """Rename a fully written folder into place; fails with ``FileExistsError``-like errors if ``target`` exists.

    A mount can rename and then fail to answer (Drive's errno 107): the retry then finds the source gone and the
    target there, its own earlier try's work, and only makes it durable. On a first try an existing target is
    always someone else's (a commit must never replace anything)."""
    _rename_retried(source, target, refuse_existing=True)


def free_bytes(path: Path) -> int | None:
    """Free space, in bytes, on the file system holding ``path``; ``None`` where it cannot be known."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize
