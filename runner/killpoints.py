"""Named points in checkpointing and publishing where a test can have this process SIGKILLed, or held, exactly there.

A kill at a random moment rarely lands inside a publish, which takes milliseconds; the kill tests need it to.
Only tests set ``$RUNNER_KILL_AT`` (``<point>:<n>``, several separated by commas): the ``n``-th time the process
reaches ``<point>`` it appends one JSON line to ``$RUNNER_KILL_LOG`` (so the test knows the kill landed, and
where) and sends itself SIGKILL, which no handler can delay. ``$RUNNER_HOLD_AT`` (same form) logs the line and
then waits there until the file ``<kill log>.release`` exists, so that a test can break the storage at that very
moment (an outage, a lost lease). Unset, as they always are for users, :func:`reached` costs two dictionary
lookups.
"""

from __future__ import annotations

import json
import os
import signal
import time

KILL_AT_ENV = "RUNNER_KILL_AT"
"""Where to die: ``<point>:<n>[,<point>:<n>...]``; tests only."""

HOLD_AT_ENV = "RUNNER_HOLD_AT"
"""Where to wait for the test: ``<point>:<n>[,...]``; tests only."""

KILL_LOG_ENV = "RUNNER_KILL_LOG"
"""A file that gets one JSON line (point, count, pid, time, action) just before a kill or a hold at a point."""

HOLD_LIMIT_S = 300.0
"""A held process that is never released goes on after this long, so a broken test cannot hang forever."""

POINTS = {
    "snapshot-taken": "the trainer took a snapshot (in memory) and has not handed it to the publisher yet",
    "commit-copied": "a checkpoint's files are in its temporary folder; no manifest yet",
    "commit-manifest": "the manifest is written; the folder is not renamed into place yet",
    "commit-renamed": "the checkpoint is committed; not yet verified, logged or pruned",
    "state-written": "state.json records the committed checkpoint; history.csv not rewritten yet",
    "history-written": "history.csv is rewritten; the TensorBoard logs not yet",
    "export-written": "the final model is exported on local disk; not yet in the job folder",
    "export-published": "final/ is in the job folder; the job is not marked done yet",
}
"""Every point, and what has and has not happened when a process dies there."""


def _parse(value: str) -> dict[str, int]:
    wanted: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        point, _, count = item.partition(":")
        if point not in POINTS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"${KILL_AT_ENV}: {item!r} is not <point>:<n> with a point of {sorted(POINTS)}")
        wanted[point] = int(count)
    return wanted


_kill_at = _parse(os.environ.get(KILL_AT_ENV, ""))
_hold_at = _parse(os.environ.get(HOLD_AT_ENV, ""))
_counts: dict[str, int] = {}


def reached(point: str) -> None:
    """Mark that this process reached ``point``; die or wait here if ``$RUNNER_KILL_AT``/``$RUNNER_HOLD_AT`` ask."""
    if point not in _kill_at and point not in _hold_at:
        return
    _counts[point] = count = _counts.get(point, 0) + 1
    if _hold_at.get(point) == count:
        _log(point, count, "hold")
        _wait_for_release()
    if _kill_at.get(point) == count:
        _log(point, count, "kill")
        os.kill(os.getpid(), signal.SIGKILL)


def release_file(log: str) -> str:
    """The file whose existence lets a held process go on."""
    return f"{log}.release"


def _log(point: str, count: int, action: str) -> None:
    if not (log := os.environ.get(KILL_LOG_ENV)):
        return
    record = {"point": point, "count": count, "pid": os.getpid(), "time": time.time(), "action": action}
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(descriptor, (json.dumps(record) + "\n").encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _wait_for_release() -> None:
    release = release_file(os.environ.get(KILL_LOG_ENV, os.devnull))
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
