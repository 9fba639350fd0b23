"""Where one checkpoint's time goes, phase by phase, against the floor of the same bytes on the same disk.

Builds the tutorial's network at 150x150 (89.7 M parameters; with Adam's two moments 1.08 GB of variables), takes
one training step so the optimizer holds real state, then times each phase of runner's checkpoint as the trainer
and the publisher run it:

- ``capture``: the trainer's only blocking part (every variable copied to host memory);
- ``commit``: the publisher's write of the captured snapshot straight into the job folder, hashing the bytes as
  they are written and fsyncing them, the manifest and the rename (with the check that every file arrived at its
  size);
- ``prune``: deleting the checkpoint older than the ``keep`` newest.

Beside them, in the same process, the path before (``staged``): the trainer writes a local ``variables.npz``
(its blocking part), and the publisher copies that into the job folder (``staged commit``).

The floor is the same byte count written once and made durable (``write``, with its fsync: a commit must be
durable before its rename) and hashed once (``sha256``), with plain Python file calls. Medians of
``--repeats``; the job folder is a local folder, as a Drive mount's local cache is what a commit writes to first.

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
from runner.train.snapshots.snapshot import TrainingState, capture_snapshot, save_snapshot  # noqa: E402

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
        handle.flush()
        os.fsync(handle.fileno())  # a checkpoint must be durable before it is committed: the fsync belongs to the floor


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
            captured = None

            def capture() -> None:
                nonlocal captured
                captured = capture_snapshot(model, TrainingState(epoch=repeat))

            phases = {"capture": timed(capture)}
            phases["commit"] = timed(lambda: store.commit(captured.files, generation=1, epoch=repeat, step=0))
            captured.release()
            size = store.committed()[0].path.joinpath("variables.npz").stat().st_size
            extra = store.committed()[0].path.parent / "older"
            shutil.copytree(store.committed()[0].path, extra)
            phases["prune"] = timed(lambda: shutil.rmtree(extra))
            phases["staged: local npz"] = timed(lambda: save_snapshot(model, TrainingState(epoch=repeat), folder))
            phases["staged: commit"] = timed(lambda: store.commit(folder, generation=2, epoch=repeat, step=0))
            shutil.rmtree(folder)
            blob = root / "floor.bin"
            phases["floor: write"] = timed(lambda: floor_write(blob, size))
            phases["floor: sha256"] = timed(lambda: floor_hash(blob))
            blob.unlink()
            if repeat:
                for name, seconds in phases.items():
                    rows.setdefault(name, []).append(seconds)

    floor = sum(statistics.median(rows[f"floor: {name}"]) for name in ("write", "sha256"))
    print(f"variables: {size / 1e9:.2f} GB; medians of {args.repeats}; keras {keras.__version__}")
    print(f"{'phase':<18} {'seconds':>8} {'GB/s':>6}")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"{name:<18} {median:8.2f} {size / 1e9 / median:6.2f}")
    ours = sum(statistics.median(rows[name]) for name in ("capture", "commit", "prune"))
    staged = sum(statistics.median(rows[name]) for name in ("staged: local npz", "staged: commit", "prune"))
    print(f"checkpoint total {ours:.2f} s (staged, as before: {staged:.2f} s); floor (write + sha256) {floor:.2f} s; "
          f"ratio x{ours / floor:.2f}")
    print(f"blocking the training loop: {statistics.median(rows['capture']):.2f} s (capture; staged: "
          f"{statistics.median(rows['staged: local npz']):.2f} s)")


if __name__ == "__main__":
    main()
