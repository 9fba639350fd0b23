"""runner's training speed against idiomatic Keras, side by side in one process, the order rotated.

The baseline is what a Keras user writes: ``keras.utils.image_dataset_from_directory`` + ``cache()`` +
``prefetch()`` + ``model.fit``, no checkpoints. Against it, on the same image folders, the same network (runner's
built-in ``simple_cnn``, built from the same seed) and the same epochs:

- ``fit + BackupAndRestore``: Keras' own resumable training, the same pipeline;
- ``fit + BackupAndRestore + model.save``: the same, then the trained model saved as ``.keras``, which is what
  runner's export to ``final/`` gives (neither row above writes a model at the end);
- ``tutorial script``: the tutorial's ``ImageDataGenerator.flow_from_directory`` + ``fit`` with a
  ``ModelCheckpoint`` to an ``.h5`` file every epoch;
- ``runner``: a real queue and worker (claim, lease, a verified checkpoint every epoch, history, export), with
  the default ``steps_per_execution: auto``;
- ``runner, 1 step per call``: the same with ``steps_per_execution: 1`` (what a per-batch loop costs).

Each is timed end to end (dataset read from local disk, model build, training, validation, checkpoints); also
the steady-state epoch (the median of epochs 2 on, from one epoch's end to the next). Medians of the repeats.
Then the time to resume: a real ``runner work`` process from its start to its first resumed step, against the
floor (a process that imports TensorFlow, builds the model and loads the checkpoint's variables).

    python benchmarks/training_speed.py --job digits [--epochs 5] [--repeats 3]
    python benchmarks/training_speed.py --job tutorial [--epochs 3] [--repeats 3] [--images 400]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import keras
import tensorflow as tf

from benchmarks.runner_timing import EpochClock, steady, time_runner
from runner.queue import Queue
from runner.spec import JobSpec, parse_spec
from runner.train.models.build import build_model, compile_model

Way = Callable[[JobSpec, Path, Path], tuple[float, list[float]]]


# --- the jobs -----------------------------------------------------------------------------------------------


def digits_job(folder: Path, epochs: int) -> tuple[JobSpec, Path]:
    """The bundled digits (1,797 images of 32x32, grayscale, 10 classes), unpacked; a small CNN, batch 16."""
    with tarfile.open(REPO / "runner" / "datasets" / "digits.tar.gz") as archive:
        archive.extractall(folder, filter="data")
    root = folder / "digits"
    spec = {
        "name": "bench-digits",
        "dataset": {
            "source": str(root),
            "train": "train",
            "validation": "validation",
            "image_size": [32, 32],
            "color_mode": "grayscale",
            "label_mode": "int",
            "batch_size": 16,
        },
        "model": {"builtin": "simple_cnn", "params": {"filters": 16, "dense": 64}},
        "training": {"epochs": epochs, "loss": "sparse_categorical_crossentropy", "seed": 0},
    }
    return parse_spec(spec), root


def tutorial_job(folder: Path, epochs: int, images: int) -> tuple[JobSpec, Path]:
    """The tutorial's network at 150x150 (89.7 M parameters) on a look-alike of its cats-and-dogs archive."""
    from tests.support.keras_jobs_archives import TUTORIAL_ROOT, tutorial_lookalike_zip

    per_class = images // 2
    data = tutorial_lookalike_zip(train_per_class=per_class, validation_per_class=max(1, per_class // 4))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        archive.extractall(folder)
    root = folder / TUTORIAL_ROOT
    spec = {
        "name": "bench-tutorial",
        "dataset": {
            "source": str(root),
            "train": "train",
            "validation": "validation",
            "image_size": [150, 150],
            "label_mode": "binary",
            "batch_size": 20,
        },
        "model": {"builtin": "simple_cnn", "params": {"filters": 32, "dense": 512}},
        "training": {"epochs": epochs, "loss": "binary_crossentropy", "seed": 0},
    }
    return parse_spec(spec), root


# --- the ways -----------------------------------------------------------------------------------------------


def _model(spec: JobSpec, input_shape: tuple[int, int, int], classes: int) -> keras.Model:
    model = build_model(spec, input_shape=input_shape, num_classes=classes)
    compile_model(model, spec)
    return model


def _folders(
    spec: JobSpec, root: Path, callbacks: list, *, started: float, save_to: Path | None = None
) -> tuple[float, list[float]]:
    d = spec.dataset
    color = d.color_mode

    def load(split: str) -> tf.data.Dataset:
        return (
            keras.utils.image_dataset_from_directory(
                root / split,
                image_size=tuple(d.image_size),
                color_mode=color,
                label_mode=d.label_mode,
                batch_size=d.batch_size,
                shuffle=split == "train",
                seed=spec.training.seed,
                verbose=False,
            )
            .cache()
            .prefetch(tf.data.AUTOTUNE)
        )

    train, validation = load("train"), load("validation")
    channels = 1 if color == "grayscale" else 3
    classes = len([p for p in (root / "train").iterdir() if p.is_dir()])
    model = _model(spec, (*d.image_size, channels), classes)
    clock = EpochClock()
    model.fit(train, validation_data=validation, epochs=spec.training.epochs, callbacks=[*callbacks, clock], verbose=0)
    if save_to is not None:
        model.save(str(save_to))
    return time.perf_counter() - started, steady(started, clock.ends)


def plain_fit(spec: JobSpec, root: Path, scratch: Path) -> tuple[float, list[float]]:
    return _folders(spec, root, [], started=time.perf_counter())


def backup_and_restore(spec: JobSpec, root: Path, scratch: Path) -> tuple[float, list[float]]:
    started = time.perf_counter()
    return _folders(spec, root, [keras.callbacks.BackupAndRestore(backup_dir=str(scratch / "backup"))], started=started)


def backup_and_restore_then_save(spec: JobSpec, root: Path, scratch: Path) -> tuple[float, list[float]]:
    """BackupAndRestore, then ``model.save`` of the trained model: the deliverable runner's ``final/`` is."""
    started = time.perf_counter()
    backup = keras.callbacks.BackupAndRestore(backup_dir=str(scratch / "backup"))
    return _folders(spec, root, [backup], started=started, save_to=scratch / "final.keras")


def tutorial_script(spec: JobSpec, root: Path, scratch: Path) -> tuple[float, list[float]]:
    """As the tutorial: ImageDataGenerator.flow_from_directory, fit, a ModelCheckpoint .h5 every epoch."""
    started = time.perf_counter()
    d = spec.dataset
    # Keras 3 keeps the tutorial's ImageDataGenerator only in its legacy module.
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator()
    mode = {"int": "sparse", "binary": "binary", "categorical": "categorical"}[d.label_mode]
    color = "grayscale" if d.color_mode == "grayscale" else "rgb"

    def flow(split: str):
        return generator.flow_from_directory(
            root / split,
            target_size=tuple(d.image_size),
            color_mode=color,
            class_mode=mode,
            batch_size=d.batch_size,
            seed=spec.training.seed,
        )

    with _quiet():
        train, validation = flow("train"), flow("validation")
    channels = 1 if d.color_mode == "grayscale" else 3
    model = _model(spec, (*d.image_size, channels), train.num_classes)
    clock = EpochClock()
    checkpoint = keras.callbacks.ModelCheckpoint(str(scratch / "model.h5"))
    model.fit(train, validation_data=validation, epochs=spec.training.epochs, callbacks=[checkpoint, clock], verbose=0)
    return time.perf_counter() - started, steady(started, clock.ends)


def runner_auto(spec: JobSpec, root: Path, scratch: Path) -> tuple[float, list[float]]:
    return time_runner(spec, scratch)


def runner_one_step(spec: JobSpec, root: Path, scratch: Path) -> tuple[float, list[float]]:
    training = spec.training.model_copy(update={"steps_per_execution": 1})
    return time_runner(spec.model_copy(update={"training": training}), scratch)


WAYS: dict[str, Way] = {
    "fit (baseline)": plain_fit,
    "fit + BackupAndRestore": backup_and_restore,
    "fit + BackupAndRestore + model.save": backup_and_restore_then_save,
    "tutorial script": tutorial_script,
    "runner": runner_auto,
    "runner, 1 step per call": runner_one_step,
}


class _quiet:
    def __enter__(self) -> None:
        self._stdout = sys.stdout
        sys.stdout = io.StringIO()

    def __exit__(self, *exc: object) -> None:
        sys.stdout = self._stdout


# --- time to resume -----------------------------------------------------------------------------------------

FLOOR = """
import os, sys, time, json
started = float(sys.argv[1])
import numpy as np, keras
from runner.spec import load_spec
from runner.train.data.pipeline import prepare_dataset
from runner.train.models.build import build_model, compile_model
spec = load_spec(sys.argv[2])
data = prepare_dataset(spec.dataset, seed=spec.training.seed, cache_dir=__import__("pathlib").Path(sys.argv[3]))
model = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes)
compile_model(model, spec)
model.optimizer.build(model.trainable_variables)
with np.load(sys.argv[4]) as arrays:
    names = sorted(n for n in arrays.files if n.startswith("model/"))
    for variable, name in zip(model.variables, names):
        variable.assign(arrays[name])
print(time.time() - started)
"""


def time_to_resume(spec: JobSpec, scratch: Path) -> tuple[float, float]:
    """Seconds from `runner work`'s start to its first resumed step, and the floor for the same job."""
    queue_root = scratch / "queue"
    queue = Queue(queue_root)
    job, _ = queue.submit(spec.model_copy(update={"training": spec.training.model_copy(update={"epochs": 2})}))
    env = {**os.environ, "RUNNER_CACHE": str(scratch / "cache"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    first = subprocess.run(
        [sys.executable, "-m", "runner", "work", "--queue", str(queue_root)],
        env={**env, "RUNNER_KILL_AT": "export-written:1", "RUNNER_KILL_LOG": str(scratch / "kills.jsonl")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert first.returncode != 0, "the first session was meant to die before the export"
    started = time.time()
    resumed = subprocess.run(
        [sys.executable, "-m", "runner", "work", "--queue", str(queue_root)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    resumed_at = next(e for e in map(json.loads, job.paths.events.read_text().splitlines()) if e["event"] == "resumed")
    seconds = resumed_at["time"] - started
    checkpoint = sorted(job.paths.checkpoints.glob("g*"))[-1]
    spec_file = scratch / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    started = time.time()
    floor = subprocess.run(
        [
            sys.executable,
            "-c",
            FLOOR,
            str(started),
            str(spec_file),
            str(scratch / "cache"),
            str(checkpoint / "variables.npz"),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return seconds, float(floor.stdout.strip().splitlines()[-1])


# --- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=["digits", "tutorial"], default="digits")
    parser.add_argument("--epochs", type=int, default=None, help="default: 5 (digits), 3 (tutorial)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=400, help="training images of the tutorial look-alike")
    parser.add_argument("--ways", default=";".join(WAYS), help="names of the ways to run, separated by ';'")
    args = parser.parse_args()
    epochs = args.epochs or (5 if args.job == "digits" else 3)
    names = [name for name in WAYS if name in args.ways.split(";")]
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        folder = Path(tmp)
        spec, root = digits_job(folder, epochs) if args.job == "digits" else tutorial_job(folder, epochs, args.images)
        plain_fit(spec.model_copy(update={"training": spec.training.model_copy(update={"epochs": 1})}), root, folder)
        totals: dict[str, list[float]] = {name: [] for name in names}
        epochs_s: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                keras.backend.clear_session()  # else each run's graphs slow the next ones down
                with tempfile.TemporaryDirectory(dir=folder) as scratch:
                    total, per_epoch = WAYS[name](spec, root, Path(scratch))
                totals[name].append(total)
                epochs_s[name].extend(per_epoch[1:])
                print(f"  repeat {repeat + 1} {name}: {total:.2f} s", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            resume, floor = time_to_resume(spec, Path(scratch))
    baseline, baseline_epoch = statistics.median(totals[names[0]]), statistics.median(epochs_s[names[0]])
    print(
        f"job: {args.job}, {epochs} epochs, batch {spec.dataset.batch_size}, {args.repeats} repeats (medians); "
        f"keras {keras.__version__}, tensorflow {tf.__version__}, {os.cpu_count()} CPUs"
    )
    print("| way | end to end | ratio | steady-state epoch | ratio |\n|---|---|---|---|---|")
    for name in names:
        total, epoch = statistics.median(totals[name]), statistics.median(epochs_s[name])
        print(f"| {name} | {total:.2f} s | x{total / baseline:.2f} | {epoch:.3f} s | x{epoch / baseline_epoch:.2f} |")
    print(
        f"time to resume (start of `runner work` to its resumed event): {resume:.2f} s; "
        f"floor (import + build + load): {floor:.2f} s; x{resume / floor:.2f}"
    )


if __name__ == "__main__":
    main()
