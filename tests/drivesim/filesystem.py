"""The fusepy operations: a passthrough to a root folder, behind the link, the fault injector and the journal.

Every call goes through :meth:`DriveFS.__call__`: latency, then the fault decision, then the real operation on
``root``. With a journal (write-back mode) ``root`` is the VM's local copy, and every mutation is recorded in the
same critical section as it is made locally; file content is recorded when a written file is flushed (close),
fsynced or released, and before any rename (so a renamed file's content is never behind its new name).
"""

from __future__ import annotations

import os
import time
from typing import Any

from fuse import FuseOSError

from tests.drivesim.faults import FaultInjector
from tests.drivesim.journal import Journal
from tests.drivesim.link import Link

_STAT_FIELDS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_blksize")
_STATVFS_FIELDS = (
    "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax",
)  # fmt: skip
_UTIME_NOW, _UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2  # libfuse passes these with tv_sec = 0


class DriveFS:
    """fusepy operations object (``raw_fi=True``: open/create see the open flags, file handles are ``fi.fh``)."""

    use_ns = True

    def __init__(self, root: str, *, link: Link, injector: FaultInjector, journal: Journal | None = None) -> None:
        self.root = os.path.realpath(root)
        self.net, self.injector, self.journal = link, injector, journal
        self._dirty: set[int] = set()

    def __call__(self, op: str, *args: Any) -> Any:
        self.net.wait(op)
        fault = self.injector.decide(op)
        if fault is not None and not fault[1]:
            raise FuseOSError(fault[0])
        result = getattr(self, op)(*args)
        if fault is not None:
            if op in ("open", "create"):
                self._close(args[-1].fh)  # the caller gets an error, so it will never release this handle
            raise FuseOSError(fault[0])
        return result

    # -- helpers ------------------------------------------------------------------------------------------------

    def _full(self, path: str) -> str:
        return self.root + path

    def _mutate(self, kind: str | None, args: tuple[Any, ...], action: Any) -> Any:
        """Run ``action`` locally and record it, both under the journal's lock (one order for both)."""
        if self.journal is None:
            return action()
        with self.journal.lock:
            result = action()
            if kind is not None:
                self.journal.record(kind, *args)
            return result

    def _snapshot(self, fd: int) -> None:
        """Record the content of open file ``fd`` under its current name (caller holds the journal lock)."""
        self._dirty.discard(fd)  # before copying: a write racing with the copy marks it dirty again
        where = os.readlink(f"/proc/self/fd/{fd}")
        if where.endswith(" (deleted)") or not where.startswith(self.root + "/"):
            return
        rel = where[len(self.root) + 1 :]
        assert self.journal is not None
        self.journal.record_content(rel, f"/proc/self/fd/{fd}", os.fstat(fd).st_mode & 0o7777)

    def _settle(self, fd: int) -> None:
        if self.journal is not None and fd in self._dirty:
            with self.journal.lock:
                if fd in self._dirty:
                    self._snapshot(fd)

    def _close(self, fd: int) -> None:
        self._settle(fd)
        os.close(fd)

    def _written(self, fd: int) -> None:
        if self.journal is not None:
            self._dirty.add(fd)

    # -- metadata -----------------------------------------------------------------------------------------------

    def getattr(self, path: str, fi: Any = None) -> dict[str, int]:
        st = os.fstat(fi.fh) if fi else os.lstat(self._full(path))
        attrs = {key: getattr(st, key) for key in _STAT_FIELDS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    def statfs(self, path: str) -> dict[str, int]:
        stv = os.statvfs(self._full(path))
        return {key: getattr(stv, key) for key in _STATVFS_FIELDS}

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._full(path), uid, gid, follow_symlinks=False)

    def chmod(self, path: str, mode: int) -> None:
        self._mutate("chmod", (path[1:], mode & 0o7777), lambda: os.chmod(self._full(path), mode & 0o7777))

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        full = self._full(path)
        now = time.time_ns()
        resolved = (now, now)
        if times is not None:
            current = os.lstat(full)
            resolved = (
                _resolve(times[0], now=now, old=current.st_atime_ns),
                _resolve(times[1], now=now, old=current.st_mtime_ns),
            )
        self._mutate("utime", (path[1:], list(resolved)), lambda: os.utime(full, ns=resolved, follow_symlinks=False))

    # -- namespace ----------------------------------------------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> None:
        self._mutate("mkdir", (path[1:], mode & 0o7777), lambda: os.mkdir(self._full(path), mode))

    def rmdir(self, path: str) -> None:
        self._mutate("rmdir", (path[1:],), lambda: os.rmdir(self._full(path)))

    def unlink(self, path: str) -> None:
        self._mutate("unlink", (path[1:],), lambda: os.unlink(self._full(path)))

    def symlink(self, path: str, target: str) -> None:
        self._mutate("symlink", (path[1:], target), lambda: os.symlink(target, self._full(path)))

    def link(self, path: str, existing: str) -> None:
        self._mutate("link", (path[1:], existing[1:]), lambda: os.link(self._full(existing), self._full(path)))

    def rename(self, old: str, new: str) -> None:
        def act() -> None:
            if self.journal is not None:
                for fd in list(self._dirty):  # content written so far goes ahead of the rename
                    self._snapshot(fd)
            os.rename(self._full(old), self._full(new))

        self._mutate("rename", (old[1:], new[1:]), act)

    def truncate(self, path: str, length: int, fi: Any = None) -> None:
        if fi:
            os.ftruncate(fi.fh, length)
            self._written(fi.fh)
            return
        full = self._full(path)

        def act() -> None:
            os.truncate(full, length)
            if self.journal is not None:
                self.journal.record_content(path[1:], full, os.stat(full).st_mode & 0o7777)

        self._mutate(None, (), act)

    # -- files --------------------------------------------------------------------------------------------------

    def create(self, path: str, mode: int, fi: Any) -> int:
        def act() -> None:
            fi.fh = os.open(self._full(path), fi.flags | os.O_CREAT, mode)
            self._written(fi.fh)  # a new file exists on Drive even if nothing is ever written to it

        self._mutate(None, (), act)
        return 0

    def open(self, path: str, fi: Any) -> int:
        fi.fh = os.open(self._full(path), fi.flags)
        if fi.flags & os.O_TRUNC:
            self._written(fi.fh)
        return 0

    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        data = os.pread(fi.fh, size, offset)
        self.net.download(len(data))
        return data

    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        self.net.upload(len(data))
        written = os.pwrite(fi.fh, data, offset)
        self._written(fi.fh)
        return written

    def flush(self, path: str | None, fi: Any) -> None:
        self._settle(fi.fh)  # flush is what close(2) waits for: the content is handed to the uploader here

    def fsync(self, path: str | None, datasync: int, fi: Any) -> None:
        # On DriveFS fsync reaches the VM's cache, not Drive: in write-back mode it only queues the upload.
        self._settle(fi.fh)

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> None:
        return None

    def release(self, path: str | None, fi: Any) -> None:
        self._close(fi.fh)


def _resolve(value: int, *, now: int, old: int) -> int:
    """A timestamp from libfuse, with its UTIME_NOW / UTIME_OMIT markers made concrete."""
    return now if value == _UTIME_NOW else old if value == _UTIME_OMIT else value
