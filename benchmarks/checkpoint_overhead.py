"""How much checkpointing costs: the same small job three ways, side by side in one process.

1. plain ``model.fit`` with no checkpoints (the baseline);
2. ``model.fit`` with ``keras.callbacks.BackupAndRestore`` (Keras' own resumable training);
3. ``runner``: the Keras trainer through a real worker and queue, with verified, published checkpoints.

Each way is timed end to end (data from the local cache, model build, training; runner also claims the job,
publishes checkpoints, exports the model and records the outcome), builds the same model from the same seed on
the same data (the bundled digits), and the order of the three is rotated between repeats. Prints seconds and
the ratio to the baseline.

    python benchmarks/checkpoint_overhead.py [--epochs 5] [--repeats 2] [--every-minutes 0.05]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from rich.console import Console  # noqa: E402

from runner.demo import demo_spec  # noqa: E402
from runner.queue import Queue  # noqa: E402
from runner.spec import JobSpec  # noqa: E402
from runner.train.data.pipeline import prepare_dataset  # noqa: E402
from runner.train.models.build import build_model, compile_model  # noqa: E402
from runner.train.trainer import KerasTrainer  # noqa: E402
from runner.worker import Worker  # noqa: E402


def job_spec(epochs: int, every_minutes: float | None) -> JobSpec:
    spec = demo_spec()
    return spec.model_copy(
        update={
            "training": spec.training.model_copy(update={"epochs": epochs, "deterministic": False}),
            "checkpoint": spec.checkpoint.model_copy(update={"every_minutes": every_minutes}),
        }
    )


def fit(spec: JobSpec, cache: Path, callbacks: list) -> float:
    # Timed end to end, as runner's run is: data from the cache, model build, training.
    started = time.perf_counter()
    data = prepare_dataset(spec.dataset, seed=spec.training.seed, cache_dir=cache)
    keras.utils.set_random_seed(spec.training.seed)
    model = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes)
    compile_model(model, spec)
    model.fit(
        data.train_batches(epoch=0),
        validation_data=data.validation_batches(),
        epochs=spec.training.epochs,
        callbacks=callbacks,
        verbose=0,
    )
    return time.perf_counter() - started


def plain_fit(spec: JobSpec, cache: Path) -> float:
    return fit(spec, cache, [])


def backup_and_restore(spec: JobSpec, cache: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-backup-") as backup:
        return fit(spec, cache, [keras.callbacks.BackupAndRestore(backup_dir=backup)])


def runner_work(spec: JobSpec, cache: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as root:
        queue = Queue(root)
        queue.submit(spec)
        worker = Worker(
            queue, lambda: KerasTrainer(cache_dir=cache), console=Console(file=io.StringIO()), only=spec.name
        )
        started = time.perf_counter()
        result = worker.run()
        elapsed = time.perf_counter() - started
        assert result.done == [spec.name], result
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--every-minutes", type=float, default=None, help="also snapshot mid-epoch (runner only)")
    args = parser.parse_args()
    spec = job_spec(args.epochs, args.every_minutes)
    ways = {"model.fit (no checkpoints)": plain_fit, "model.fit + BackupAndRestore": backup_and_restore,
            "runner work": runner_work}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        cache = Path(cache_dir)
        prepare_dataset(spec.dataset, seed=spec.training.seed, cache_dir=cache)  # unpack once, outside the timing
        plain_fit(job_spec(1, None), cache)  # warm up TensorFlow
        times: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                times[name].append(ways[name](spec, cache))
    baseline = statistics.median(times[names[0]])
    print(f"job: digits, {args.epochs} epochs, batch {spec.dataset.batch_size}, "
          f"every_minutes={args.every_minutes}, {args.repeats} repeats (median)")
    for name in names:
        median = statistics.median(times[name])
        print(f"{name:32s} {median:7.2f} s   x{median / baseline:.2f}")


if __name__ == "__main__":
    main()
