"""Commit checkpoints of a few MB into a job folder forever, with increasing epochs.

Run as ``python checkpoint_committer.py JOB_FOLDER SCRATCH [KEEP]``; the checkpoint tests SIGKILL it at random
moments and check that every committed checkpoint still verifies. Each run continues after the newest committed
checkpoint. Every snapshot holds random weights (so a mix of two versions cannot verify), nested folders and a
``state.json`` naming its epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from runner.checkpoints import CheckpointStore
from runner.job import Job
from runner.paths import JobPaths

FILES = {
    "weights.bin": 1_500_000,
    "optimizer/adam-m.bin": 700_000,
    "optimizer/adam-v.bin": 700_000,
    "rng/seed-generators/dropout.bin": 4_096,
}
"""Relative name and size of each random file in a snapshot (about 2.9 MB in all)."""

GENERATION = 1


def snapshot(folder: Path, epoch: int) -> None:
    """Write a local snapshot for ``epoch``."""
    for relative, size in FILES.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(os.urandom(size))
    (folder / "state.json").write_text(json.dumps({"epoch": epoch}))


def main(job_folder: Path, scratch: Path, keep: int) -> None:
    store = CheckpointStore(Job(JobPaths(job_folder)), keep=keep)
    newest = store.newest()
    epoch = newest.epoch + 1 if newest else 0
    print("ready", flush=True)
    while True:
        source = scratch / f"snapshot-{os.getpid()}-{epoch}"
        snapshot(source, epoch)
        store.commit(source, generation=GENERATION, epoch=epoch, step=0, meta={"epoch": epoch})
        shutil.rmtree(source)
        print(epoch, flush=True)
        epoch += 1


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2)
