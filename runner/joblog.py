"""A job's runner.log: written by the worker without ever making training wait, read by ``runner logs NAME [-f]``.

Following reads only what was appended since the last look (a log on Drive can grow to megabytes over many
sessions), and stops by itself once the job is finished, so that ``!runner logs -f NAME`` in a notebook cell
ends with the job instead of blocking the notebook until it is interrupted.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from runner import storage
from runner.errors import RunnerError
from runner.job import FINISHED, Job


class JobLogHandler(logging.Handler):
    """Appends log records to the job's runner.log, tagged with the claim generation, without ever making the
    job wait: one plain append per record, no retries; lines that cannot be written now (the mount is failing)
    are kept in memory (the newest 1,000) and written with the next record."""

    _MAX_PENDING = 1000

    def __init__(self, job: Job, generation: int) -> None:
        super().__init__()
        self.job, self.generation = job, generation
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self._pending.append(f"[g{self.generation}] {self.format(record)}\n")
        del self._pending[: -self._MAX_PENDING]
        try:
            fd = os.open(self.job.paths.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, "".join(self._pending).encode("utf-8"))
            finally:
                os.close(fd)
        except OSError:
            return  # kept for the next record; a log line must never stall or fail the job
        self._pending.clear()


FOLLOW_POLL_S = 1.0
"""Seconds between two looks at a followed log (each is a stat and a small read on Drive)."""


@storage.retry_io
def read_from(path: Path, offset: int) -> tuple[bytes, int]:
    """What ``path`` holds from ``offset`` on, and the offset to read from next.

    A file shorter than ``offset`` was replaced: it is read from its start. A missing file reads as empty.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return b"", 0
    try:
        start = offset if os.fstat(fd).st_size >= offset else 0
        chunks, position = [], start
        while chunk := os.pread(fd, 1 << 20, position):
            chunks.append(chunk)
            position += len(chunk)
        return b"".join(chunks), position
    finally:
        os.close(fd)


def show_log(
    job: Job,
    write: Callable[[str], None],
    *,
    follow: bool,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Write the job's log through ``write``; with ``follow``, keep writing what is appended until the job is
    finished (or Ctrl-C). Returns whether the log had anything at all."""
    data, offset = read_from(job.paths.log, 0)
    write(data.decode("utf-8", errors="replace"))
    seen_any = bool(data)
    while follow:
        finished = _finished(job)
        sleep(FOLLOW_POLL_S)
        data, offset = read_from(job.paths.log, offset)
        write(data.decode("utf-8", errors="replace"))
        seen_any = seen_any or bool(data)
        if finished and not data:
            break  # finished before this last read, and nothing more came: the log is complete
    return seen_any


def _finished(job: Job) -> bool:
    try:
        return job.read_state().status in FINISHED
    except (RunnerError, OSError) as error:
        if isinstance(error, OSError) and error.errno not in (errno.ENOENT,):
            raise
        return False  # a damaged or missing state.json: keep following, a worker may rebuild it
