"""Kill a lease holder inside a PID namespace of its own (as in a container) and report what runner sees.

usage: lease_namespace.py QUEUE JOB  -- run under ``unshare --pid --fork --mount-proc`` by tests/test_lease.py.

Colab runtimes and most CI jobs run in a container, that is in a PID namespace other than the host's. Starts
``lease_hold.py`` with a 60 s lease, reads the holder while it lives, SIGKILLs it, reads the holder again and
tries to take over; prints one JSON object with what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from runner.lease import LeaseHolder, read_holder
from runner.queue import Queue

HOLD = Path(__file__).resolve().with_name("lease_hold.py")


def _seen(holder: LeaseHolder | None) -> dict[str, object] | None:
    """What runner tells of a holder, evaluated now (dead_on_this_host asks the OS at call time)."""
    if holder is None:
        return None
    return {"describe": holder.describe(), "dead": holder.dead_on_this_host()}


def main(argv: list[str]) -> int:
    root, name = argv[0], argv[1]
    queue = Queue(root, lease_duration=60.0)
    paths = queue.paths.job(name)
    child = subprocess.Popen(
        [sys.executable, str(HOLD), root, name, "60", "60"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = child.stdout.readline().split()
        alive = _seen(read_holder(paths))
        child.kill()
        child.wait()
        dead = _seen(read_holder(paths))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    lease = queue.lease(name)
    took_over = lease.try_acquire()
    lease.release()
    report = {
        "child_said": line,
        "child_pid": child.pid,
        "pid_namespace": os.stat("/proc/self/ns/pid").st_ino,
        "alive": alive,
        "killed": dead,
        "took_over": took_over,
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
