"""Predictions with a finished job's exported model, on images prepared exactly as the job's own were.

The model in ``final/`` takes what training fed it: raw 0-255 pixels, resized bilinearly to the job's size, in
its colour mode (``final/model.json`` says so). Images are decoded here by the same function as the training
pipeline's, so a prediction is what the job itself computed on that image during validation.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from runner import storage
from runner.errors import DatasetError, NoExport, StorageError, UsageError
from runner.images import IMAGE_EXTENSIONS, first_bytes, is_image
from runner.job import Job
from runner.train import backends
from runner.train.models.factory import import_factory
from runner.train.outputs.export import BEST_FILE, DESCRIPTION_FILE, DESCRIPTION_FORMAT, FILE_NAMES
from runner.words import counted

BATCH = 32
"""Images per call of the model: small enough for the tutorial's network on a CPU, large enough to be quick."""


@dataclass(frozen=True)
class Prediction:
    """One image's class and the probability of every class, and which export gave them (``best`` or ``last``)."""

    image: str
    label: str
    probabilities: dict[str, float]
    model: str

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.image, "class": self.label, "probabilities": self.probabilities, "model": self.model}


def predict_images(job: Job, images: Sequence[str | Path], *, last: bool = False) -> list[Prediction]:
    """Classify ``images`` (files, or folders searched for images) with ``job``'s exported model: the best epoch's
    when the job exported one, unless ``last`` asks for the last epoch's."""
    description = _description(job)
    files = list(_image_files(images))
    if not files:
        raise UsageError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, images))}")
    model, which = _load_model(job, last=last)
    logits = _gives_logits(model)
    classes: list[str] = description["classes"]
    size = (int(description["input"]["height"]), int(description["input"]["width"]))
    backend = backends.current()
    read = backend.image_reader(size, int(description["input"]["channels"]))
    predictions = []
    for start in range(0, len(files), BATCH):
        chunk = files[start : start + BATCH]
        batch = np.stack([_decoded(read, path, backend.DECODE_ERRORS) for path in chunk]).astype(np.float32)
        outputs = np.asarray(model(batch, training=False), dtype=np.float64)
        rows = _probabilities(outputs, description["label_mode"], len(classes), logits=logits)
        for path, row in zip(chunk, rows, strict=True):
            chances = {name: float(value) for name, value in zip(classes, row, strict=True)}
            predictions.append(Prediction(str(path), classes[int(np.argmax(row))], chances, which))
    return predictions


def _description(job: Job) -> dict[str, Any]:
    final = job.paths.final
    if not storage.is_dir(final):
        state = job.read_state()
        raise NoExport(job.name, f"it is {state.status.value}, {counted(state.epoch, 'epoch')} done")
    try:
        description = json.loads(storage.read_bytes(final / DESCRIPTION_FILE))
    except StorageError as error:
        if error.errno_ == 2:
            raise NoExport(job.name, f"{final} has no {DESCRIPTION_FILE} (it was exported by an older runner)") from None
        raise
    if not isinstance(description, dict) or description.get("format") != DESCRIPTION_FORMAT:
        raise NoExport(job.name, f"{final / DESCRIPTION_FILE} is not a model description this runner reads")
    return description


def _load_model(job: Job, *, last: bool) -> tuple[keras.Model, str]:
    """The exported model and which one it is (``best`` or ``last``), read from a local copy: Keras reads a zip
    by seeking, which Drive serves slowly.

    A factory's module is imported first, so that the custom layers it registers load; ``safe_mode`` is off, so
    that a ``Lambda`` layer loads too: the file is this job's own export, not someone else's download."""
    factory = job.read_spec().model.factory
    if factory is not None:
        import_factory(factory)
    candidates = [("last", FILE_NAMES["keras"]), ("last", FILE_NAMES["h5"])]
    if not last:
        candidates.insert(0, ("best", BEST_FILE))
    for which, name in candidates:
        exported = job.paths.final / name
        if storage.is_file(exported):
            return _loaded(job, exported), which
    raise NoExport(job.name, "its export.formats has neither keras nor h5, which Keras loads (saved_model is for serving)")


def _loaded(job: Job, exported: Path) -> keras.Model:
    with tempfile.TemporaryDirectory(prefix="runner-predict-") as scratch:
        local = Path(scratch) / exported.name
        storage.copy_file(exported, local, durable=False)
        try:
            return keras.models.load_model(local, compile=False, safe_mode=False)
        except (ValueError, TypeError, KeyError, OSError) as error:
            reason = " ".join(str(error).split())[:300]
            raise NoExport(job.name, f"Keras cannot load {exported}: {reason}") from None


def _image_files(images: Sequence[str | Path]) -> Iterator[Path]:
    for given in map(Path, images):
        if given.is_dir():
            yield from sorted(
                path
                for path in given.rglob("*")
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
            )
        elif given.is_file():
            yield given  # named on purpose: decoded whatever its suffix, and named if that fails
        else:
            raise UsageError(f"no such image or folder: {given}")


def _decoded(read: Any, path: Path, errors: tuple[type[BaseException], ...]) -> np.ndarray:
    try:
        return read(path)
    except errors:
        if not is_image(first_bytes(path)):
            wrong = f"{path} is not a JPEG, PNG, GIF or BMP image: pass image files, or folders of them"
            raise UsageError(wrong) from None
        raise DatasetError(f"image {path} cannot be decoded: it is damaged or cut short; pass a whole image") from None


def _gives_logits(model: keras.Model) -> bool:
    """Whether the model ends without its sigmoid or softmax (a factory's, trained ``from_logits``): decided once
    for the model, from its last layer, so that an image's answer never depends on the images beside it."""
    activation = getattr(model.layers[-1], "activation", None) if model.layers else None
    name = getattr(activation, "__name__", "")
    return name not in ("sigmoid", "softmax")


def _probabilities(outputs: np.ndarray, label_mode: str, classes: int, *, logits: bool) -> np.ndarray:
    """One row of class probabilities per image; logits made into them."""
    if label_mode == "binary":
        second = outputs.reshape(len(outputs), -1)[:, 0]
        if logits:
            second = 1 / (1 + np.exp(-second))
        return np.stack([1 - second, second], axis=1)
    rows = outputs.reshape(len(outputs), classes)
    if logits:
        shifted = np.exp(rows - rows.max(axis=1, keepdims=True))
        rows = shifted / shifted.sum(axis=1, keepdims=True)
    return rows

