"""Claim a job and commit checkpoints until fenced; run by tests/test_lease.py.

usage: lease_commit.py QUEUE JOB LEASE_DURATION KEEP

Takes the lease, claims the job and prints ``generation <n>``. Then, for each line read on stdin, commits a
checkpoint of the next epoch (1, 2, ...) through ``CheckpointStore(..., fence=claim.fence)`` and prints
``committed <id>``, or ``fenced <reason>`` and stops. Being paced by stdin lets the test stop this process
between two commits: a stop between the fence check and the rename is a window no file-based fence closes.
Finally waits (bounded) for the lease to be reported lost and prints ``lost <reason>`` (or ``lost None``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from runner.checkpoints import CheckpointStore
from runner.errors import Fenced
from runner.queue import Queue

GIVE_UP_S = 60.0


def main(argv: list[str]) -> int:
    root, name, duration, keep = argv[0], argv[1], float(argv[2]), int(argv[3])
    deadline = time.monotonic() + GIVE_UP_S
    queue = Queue(root, lease_duration=duration)
    lease = queue.lease(name)
    while not lease.try_acquire():
        if time.monotonic() > deadline:
            print("timeout acquiring", flush=True)
            return 1
        time.sleep(0.02)
    claim = queue.claim(name, lease)
    if claim is None:
        print("unclaimed", flush=True)
        return 1
    print(f"generation {claim.generation}", flush=True)
    store = CheckpointStore(claim.job, keep=keep, fence=claim.fence)
    epoch = 0
    with tempfile.TemporaryDirectory() as scratch:
        while sys.stdin.readline():
            epoch += 1
            source = Path(scratch) / f"epoch-{epoch}"
            source.mkdir()
            (source / "weights.bin").write_bytes(os.urandom(4096))
            (source / "state.json").write_text(json.dumps({"epoch": epoch, "pid": os.getpid()}))
            try:
                info = store.commit(source, generation=claim.generation, epoch=epoch, step=0)
            except Fenced as fenced:
                print(f"fenced {fenced.reason}", flush=True)
                break
            print(f"committed {info.id}", flush=True)
    while lease.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    print(f"lost {lease.lost.reason if lease.lost else None}", flush=True)
    lease.release()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
