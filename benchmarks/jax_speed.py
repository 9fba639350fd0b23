"""runner's training speed on Keras' JAX backend against idiomatic Keras-on-JAX, side by side in one process.

Runs with ``KERAS_BACKEND=jax`` and needs no TensorFlow. The baseline is what a Keras user on JAX writes: the
images read into NumPy arrays once (Pillow, as runner's JAX pipeline reads them), then
``model.fit(x, y, batch_size, validation_data, steps_per_execution)``, no checkpoints. Against it, the same
network (runner's built-in ``simple_cnn``, built from the same seed), data and epochs through a real queue and
worker (claim, lease, a verified checkpoint every epoch, history, export), with ``steps_per_execution: auto``
and with 1. Each is timed end to end (images read, model built, training, validation, checkpoints) and by its
steady-state epoch (the median of epochs 2 on). Medians of the repeats, the order rotated between repeats.
Prints images per second too, so that the same script on a GPU gives the figures docs/performance.md asks for.

    KERAS_BACKEND=jax python benchmarks/jax_speed.py [--epochs 5] [--repeats 3] [--mixed-precision]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax
import keras
import numpy as np

import runner.train  # noqa: F401 (the engine's start)
from benchmarks.runner_timing import EpochClock, steady, time_runner
from runner.spec import JobSpec, parse_spec
from runner.train.data.arrays import prepare_dataset
from runner.train.engine.steps import resolve_steps_per_execution
from runner.train.models.build import build_model, compile_model

Way = Callable[[JobSpec, Path], tuple[float, list[float]]]


def digits_job(folder: Path, epochs: int, *, mixed_precision: bool) -> JobSpec:
    """The bundled digits (1,797 images of 32x32, grayscale, 10 classes), unpacked; a small CNN, batch 16."""
    with tarfile.open(REPO / "runner" / "datasets" / "digits.tar.gz") as archive:
        archive.extractall(folder, filter="data")
    spec = {
        "name": "bench-digits-jax",
        "dataset": {"source": str(folder / "digits"), "train": "train", "validation": "validation",
                    "image_size": [32, 32], "color_mode": "grayscale", "label_mode": "int", "batch_size": 16},
        "model": {"builtin": "simple_cnn", "params": {"filters": 16, "dense": 64}},
        "training": {"epochs": epochs, "loss": "sparse_categorical_crossentropy", "seed": 0,
                     "mixed_precision": mixed_precision},
    }  # fmt: skip
    return parse_spec(spec)


def plain_fit(spec: JobSpec, scratch: Path) -> tuple[float, list[float]]:
    """Images into NumPy arrays, then ``model.fit`` on them, as a Keras-on-JAX user writes it."""
    started = time.perf_counter()
    keras.config.set_dtype_policy("mixed_float16" if spec.training.mixed_precision else "float32")
    data = prepare_dataset(spec.dataset, seed=spec.training.seed, cache_dir=scratch / "cache")
    arrays = {
        split: [np.concatenate(parts) for parts in zip(*batches)]
        for split, batches in (
            ("train", list(data.train_batches(epoch=0))),
            ("validation", [data.validation_batches()[i] for i in range(len(data.validation_batches()))]),
        )
    }
    keras.utils.set_random_seed(spec.training.seed)
    model = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes)
    steps = resolve_steps_per_execution(spec.training.steps_per_execution, data.steps_per_epoch)
    compile_model(model, spec, jit_compile=True, steps_per_execution=steps)
    clock = EpochClock()
    (x, y), validation = arrays["train"], tuple(arrays["validation"])
    model.fit(x, y, batch_size=spec.dataset.batch_size, epochs=spec.training.epochs, validation_data=validation,
              shuffle=True, callbacks=[clock], verbose=0)  # fmt: skip
    return time.perf_counter() - started, steady(started, clock.ends)


def runner_auto(spec: JobSpec, scratch: Path) -> tuple[float, list[float]]:
    return time_runner(spec, scratch)


def runner_one_step(spec: JobSpec, scratch: Path) -> tuple[float, list[float]]:
    training = spec.training.model_copy(update={"steps_per_execution": 1})
    return time_runner(spec.model_copy(update={"training": training}), scratch)


WAYS: dict[str, Way] = {
    "fit on JAX (baseline)": plain_fit,
    "runner": runner_auto,
    "runner, 1 step per call": runner_one_step,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mixed-precision", action="store_true", help="mixed_float16 (needs a GPU)")
    args = parser.parse_args()
    names = list(WAYS)
    with tempfile.TemporaryDirectory(prefix="bench-jax-") as tmp:
        folder = Path(tmp)
        spec = digits_job(folder, args.epochs, mixed_precision=args.mixed_precision)
        totals: dict[str, list[float]] = {name: [] for name in names}
        epochs_s: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                keras.backend.clear_session()
                with tempfile.TemporaryDirectory(dir=folder) as scratch:
                    total, per_epoch = WAYS[name](spec, Path(scratch))
                totals[name].append(total)
                epochs_s[name].extend(per_epoch[1:])
                print(f"  repeat {repeat + 1} {name}: {total:.2f} s", file=sys.stderr, flush=True)
    images = 1442  # the digits' training images (80% of 1,797)
    baseline, baseline_epoch = statistics.median(totals[names[0]]), statistics.median(epochs_s[names[0]])
    device = jax.devices()[0]
    print(f"digits, {args.epochs} epochs, batch {spec.dataset.batch_size}, {args.repeats} repeats (medians); "
          f"keras {keras.__version__}, jax {jax.__version__} on {device.platform} ({device.device_kind}), "
          f"{'mixed_float16' if args.mixed_precision else 'float32'}, {os.cpu_count()} CPUs")  # fmt: skip
    print("| way | end to end | ratio | steady-state epoch | ratio | img/s |\n|---|---|---|---|---|---|")
    for name in names:
        total, epoch = statistics.median(totals[name]), statistics.median(epochs_s[name])
        print(f"| {name} | {total:.2f} s | x{total / baseline:.2f} | {epoch:.3f} s | x{epoch / baseline_epoch:.2f} "
              f"| {images / epoch:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
