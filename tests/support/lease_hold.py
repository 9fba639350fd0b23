"""Hold one job's lease until killed, or until the lease is taken away; run by tests/test_lease.py.

usage: lease_hold.py QUEUE JOB LEASE_DURATION [MAX_SECONDS]

Prints ``held <host:pid>`` once it holds the lease, then ``lost <reason> held=<bool>`` and exits when its
lease is lost (the marker was replaced or removed). Gives up after MAX_SECONDS so an orphan never lingers.
"""

from __future__ import annotations

import sys
import time

from runner.job import worker_identity
from runner.queue import Queue


def main(argv: list[str]) -> int:
    root, name, duration = argv[0], argv[1], float(argv[2])
    deadline = time.monotonic() + (float(argv[3]) if len(argv) > 3 else 120.0)
    lease = Queue(root, lease_duration=duration).lease(name)
    while not lease.try_acquire():
        if time.monotonic() > deadline:
            print("timeout acquiring", flush=True)
            return 1
        time.sleep(0.02)
    print(f"held {worker_identity()}", flush=True)
    while time.monotonic() < deadline:
        if (lost := lease.lost) is not None:
            print(f"lost {lost.reason} held={lease.held}", flush=True)
            lease.release()
            return 0
        time.sleep(0.02)
    lease.release()
    print("timeout holding", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
