"""Tiny real Keras jobs for the training-engine tests: a few real digit images from the bundled archive."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import yaml

from runner.job import Job
from runner.paths import QueuePaths
from tests.conftest import merge_sections, run_cli, runner_env

REPO = Path(__file__).resolve().parent.parent.parent
DIGITS_ARCHIVE = REPO / "runner" / "datasets" / "digits.tar.gz"


def make_digit_folders(root: Path, *, classes: int = 3, train_per_class: int = 12, val_per_class: int = 4) -> Path:
    """``root/train/<digit>/*.png`` and ``root/validation/<digit>/*.png``, copied from the bundled archive."""
    wanted = {split: {str(label): 0 for label in range(classes)} for split in ("train", "validation")}
    limits = {"train": train_per_class, "validation": val_per_class}
    with tarfile.open(DIGITS_ARCHIVE) as archive:
        for member in archive:
            parts = Path(member.name).parts  # digits/<split>/<label>/<n>.png
            if len(parts) != 4 or parts[1] not in wanted or parts[2] not in wanted[parts[1]]:
                continue
            split, label = parts[1], parts[2]
            if wanted[split][label] >= limits[split]:
                continue
            wanted[split][label] += 1
            target = root / split / label / parts[3]
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())
    return root


def keras_spec(name: str, data: Path, **overrides: Any) -> dict[str, Any]:
    """A small deterministic job with Dropout and random augmentation on ``data``."""
    spec: dict[str, Any] = {
        "name": name,
        "dataset": {
            "source": str(data),
            "train": "train",
            "validation": "validation",
            "image_size": [16, 16],
            "color_mode": "grayscale",
            "label_mode": "int",
            "batch_size": 8,
        },
        "model": {"builtin": "simple_cnn", "params": {"filters": 4, "dense": 16, "dropout": 0.25, "augment": True}},
        "training": {
            "epochs": 4,
            "learning_rate": 0.01,
            "loss": "sparse_categorical_crossentropy",
            "metrics": ["accuracy"],
            "seed": 7,
            "deterministic": True,
        },
        "checkpoint": {"every_epochs": 1, "keep": 2},
    }
    return merge_sections(spec, overrides)


def write_keras_spec(folder: Path, name: str, data: Path, **overrides: Any) -> Path:
    """The spec of :func:`keras_spec` as a YAML file."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(keras_spec(name, data, **overrides)))
    return path


def submit_keras_spec(folder: Path, queue: Path, data: Path, name: str, env: dict[str, str], **overrides: Any) -> None:
    """Write the spec of :func:`keras_spec` into ``folder`` and submit it to ``queue`` with a real `runner submit`."""
    spec = write_keras_spec(folder, name, data, **overrides)
    result = run_cli("submit", str(spec), "--queue", str(queue), env=env)
    assert result.returncode == 0, result.stderr


def keras_env(cache: Path) -> dict[str, str]:
    """A `runner` environment with the real Keras trainer, a private cache, quiet TensorFlow and no GPU."""
    env = runner_env(RUNNER_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.pop("RUNNER_TRAINER")
    return env


def job_of(queue: Path, name: str) -> Job:
    """The job called ``name`` in the queue folder ``queue``."""
    return Job(QueuePaths(queue).job(name))
