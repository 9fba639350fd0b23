"""Where one checkpoint's time goes, phase by phase, against the floor of the same bytes on the same disk.

Builds the tutorial's network at 150x150 (89.7 M parameters; with Adam's two moments 1.08 GB of variables), takes
one training step so the optimizer holds real state, then times each phase of runner's checkpoint as the trainer
and the publisher run it:

- ``snapshot``: the trainer's only blocking part (variables to host arrays, the local ``variables.npz``);
- ``commit``: the publisher's copy into the job folder, hashing the bytes as they are written, the manifest and
  the rename (with the check that every file arrived at its size);
- ``prune``: deleting the checkpoint older than the ``keep`` newest.

The floor is the same byte count written once (``write``), copied once and made durable (``copy``, with its
fsync: a commit must be durable before its rename) and hashed once (``sha256``), with plain Python file calls. Medians of ``--repeats``; the job folder is a local folder, as a Drive mount's
local cache is what a commit writes to first.

    python benchmarks/checkpoint_breakdown.py [--repeats 3] [--size 150]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from runner.checkpoints import CheckpointStore  # noqa: E402
from runner.queue import Queue  # noqa: E402
from runner.spec import parse_spec  # noqa: E402
from runner.train.models.build import build_model, compile_model  # noqa: E402
from runner.train.snapshots.snapshot import TrainingState, save_snapshot  # noqa: E402

CHUNK = 1 << 20


def tutorial_model(size: int) -> tuple[keras.Model, object]:
    spec = parse_spec(
        {
            "name": "breakdown",
            "dataset": {"source": "/nonexistent", "image_size": [size, size], "label_mode": "binary"},
            "model": {"builtin": "simple_cnn", "params": {"filters": 32, "dense": 512}},
            "training": {"epochs": 1, "loss": "binary_crossentropy"},
        }
    )
    model = build_model(spec, input_shape=(size, size, 3), num_classes=2)
    compile_model(model, spec)
    images = np.random.default_rng(0).random((4, size, size, 3), dtype=np.float32)
    model.train_on_batch(images, np.array([0, 1, 0, 1], dtype=np.float32))  # the optimizer's state now exists
    return model, spec


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def floor_write(path: Path, size: int) -> None:
    block = os.urandom(CHUNK)
    with open(path, "wb") as handle:
        for _ in range(size // CHUNK):
            handle.write(block)


def floor_copy(source: Path, target: Path) -> None:
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(CHUNK):
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())  # a checkpoint must be durable before it is committed: one fsync belongs to the floor


def floor_hash(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as reader:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=150, help="image side of the tutorial's network")
    args = parser.parse_args()

    model, spec = tutorial_model(args.size)
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        queue = Queue(root / "queue")
        job, _ = queue.submit(spec)
        store = CheckpointStore(job, keep=1)
        size = 0
        for repeat in range(args.repeats + 1):  # the first round warms the page cache and is not counted
            folder = root / f"snapshot-{repeat}"
            phases = {
                "snapshot": timed(lambda: save_snapshot(model, TrainingState(epoch=repeat), folder)),
                "commit": timed(lambda: store.commit(folder, generation=1, epoch=repeat, step=0)),
            }
            size = (folder / "variables.npz").stat().st_size
            extra = store.committed()[0].path.parent / "older"
            shutil.copytree(store.committed()[0].path, extra)
            phases["prune"] = timed(lambda: shutil.rmtree(extra))
            shutil.rmtree(folder)
            blob, copy = root / "floor.bin", root / "floor-copy.bin"
            phases["floor: write"] = timed(lambda: floor_write(blob, size))
            phases["floor: copy"] = timed(lambda: floor_copy(blob, copy))
            phases["floor: sha256"] = timed(lambda: floor_hash(blob))
            blob.unlink()
            copy.unlink()
            if repeat:
                for name, seconds in phases.items():
                    rows.setdefault(name, []).append(seconds)

    floor = sum(statistics.median(rows[f"floor: {name}"]) for name in ("write", "copy", "sha256"))
    print(f"variables: {size / 1e9:.2f} GB; medians of {args.repeats}; keras {keras.__version__}")
    print(f"{'phase':<16} {'seconds':>8} {'GB/s':>6}")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"{name:<16} {median:8.2f} {size / 1e9 / median:6.2f}")
    ours = sum(statistics.median(rows[name]) for name in ("snapshot", "commit", "prune"))
    print(f"checkpoint total {ours:.2f} s; floor (write + copy + sha256) {floor:.2f} s; ratio x{ours / floor:.2f}")
    print(f"blocking the training loop: {statistics.median(rows['snapshot']):.2f} s (snapshot only)")


if __name__ == "__main__":
    main()
