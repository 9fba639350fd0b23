"""Named points in checkpointing and publishing where a test can have this process SIGKILLed, exactly there.

A kill at a random moment rarely lands inside a publish, which takes milliseconds; the kill tests need it to.
Only tests set ``$RUNNER_KILL_AT`` (``<point>:<n>``, several separated by commas): the ``n``-th time the process
reaches ``<point>`` it appends one JSON line to ``$RUNNER_KILL_LOG`` (so the test knows the kill landed, and
where) and sends itself SIGKILL, which no handler can delay. Unset, as it always is for users, :func:`reached`
costs one dictionary lookup.
"""

from __future__ import annotations

import json
import os
import signal
import time

KILL_AT_ENV = "RUNNER_KILL_AT"
"""Where to die: ``<point>:<n>[,<point>:<n>...]``; tests only."""

KILL_LOG_ENV = "RUNNER_KILL_LOG"
"""A file that gets one JSON line (point, count, pid, time) just before a kill at a point."""

POINTS = {
    "snapshot-written": "the trainer wrote a local snapshot and has not handed it to the publisher yet",
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


_wanted = _parse(os.environ.get(KILL_AT_ENV, ""))
_counts: dict[str, int] = {}


def reached(point: str) -> None:
    """Mark that this process reached ``point``; SIGKILL it here if ``$RUNNER_KILL_AT`` asks for this time."""
    if point not in _wanted:
        return
    _counts[point] = count = _counts.get(point, 0) + 1
    if count != _wanted[point]:
        return
    if log := os.environ.get(KILL_LOG_ENV):
        line = json.dumps({"point": point, "count": count, "pid": os.getpid(), "time": time.time()}) + "\n"
        descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(descriptor, line.encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    os.kill(os.getpid(), signal.SIGKILL)
