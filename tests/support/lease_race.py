"""One of several processes racing for one job's lease; run by tests/test_lease.py.

usage: lease_race.py QUEUE JOB WORKDIR CONTENDERS HOLD_SECONDS

Prints ``ready`` once imported, waits for ``WORKDIR/go``, then calls ``try_acquire()`` until it wins. Around its
hold it appends ``start <pid>`` and ``end <pid>`` to ``WORKDIR/holds.log`` (O_APPEND: one write per line, so
lines of different processes never mix); two holders at once would show as two starts in a row. After its
first failed try it creates ``WORKDIR/tried/<pid>``; the first winner holds until all the others have failed at
least once, so the race really is contended however the machine schedules the processes. Prints
``done <pid> tries=<n>`` after releasing.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from runner.queue import Queue

LEASE_DURATION_S = 60.0
"""Far beyond the test's length: no holder can lose the lease by going silent, only by releasing it."""

GIVE_UP_S = 60.0


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    root, name, workdir = argv[0], argv[1], Path(argv[2])
    contenders, hold_s = int(argv[3]), float(argv[4])
    pid = os.getpid()
    lease = Queue(root, lease_duration=LEASE_DURATION_S).lease(name)
    print("ready", flush=True)
    deadline = time.monotonic() + GIVE_UP_S
    while not (workdir / "go").exists():
        if time.monotonic() > deadline:
            print("timeout waiting for go", flush=True)
            return 1
        time.sleep(0.005)
    tries = 0
    while True:
        tries += 1
        if lease.try_acquire():
            break
        if tries == 1:
            (workdir / "tried" / str(pid)).touch()
        if time.monotonic() > deadline:
            print(f"timeout acquiring tries={tries}", flush=True)
            return 1
        time.sleep(0.01)
    _append(workdir / "holds.log", f"start {pid}")
    hold_until = time.monotonic() + hold_s
    while time.monotonic() < hold_until or len(os.listdir(workdir / "tried")) < contenders - 1:
        if not lease.held:
            _append(workdir / "holds.log", f"lost {pid}")
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    _append(workdir / "holds.log", f"end {pid}")
    lease.release()
    print(f"done {pid} tries={tries}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
