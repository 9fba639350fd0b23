"""Hold one job's lease from a separate, live process until stdin closes: ``python worker_hold_lease.py QUEUE
NAME DURATION``. Prints ``held`` once the lease is taken; the lease heartbeats while it waits."""

from __future__ import annotations

import sys

from runner.queue import Queue


def main() -> int:
    root, name, duration = sys.argv[1], sys.argv[2], float(sys.argv[3])
    lease = Queue(root, lease_duration=duration).lease(name)
    if not lease.try_acquire():
        print("not-acquired", flush=True)
        return 1
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
    lease.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
