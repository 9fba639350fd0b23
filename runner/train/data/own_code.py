"""runner's image-folder pipeline offered to the user's own code (``runner.data.image_folder``).

The training batches come in the order a spec job's do: a pure function of (seed, epoch). One ``tf.data`` dataset
serves every epoch of a ``model.fit``: each time an iterator over it starts (``fit`` starts one per epoch), it
asks its :class:`Position` which epoch this is and from which sample. On its own the position counts the epochs
up; runner's ``Checkpointing`` callback sets it at each epoch's start, so a resumed run gets the epoch it resumes,
from the sample it stopped at.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import tensorflow as tf
from pydantic import ValidationError
from rich.console import Console

from runner.errors import UsageError
from runner.spec import DatasetSpec
from runner.train.data.pipeline import ImageFolderData, prepare_dataset


class Position:
    """Which epoch the next iterator over the training batches serves, and from which sample (thread-safe: it is
    read from tf.data's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.epoch, self.start = 0, 0

    def set(self, epoch: int, start: int = 0) -> None:
        """The next iterator serves ``epoch`` from its sample ``start``."""
        with self._lock:
            self.epoch, self.start = epoch, start

    def take(self) -> tuple[int, int]:
        """The position for an iterator starting now; the one after it serves the next epoch from its start."""
        with self._lock:
            taken = (self.epoch, self.start)
            self.epoch, self.start = self.epoch + 1, 0
            return taken


_POSITIONS: weakref.WeakValueDictionary[int, ImageFolder] = weakref.WeakValueDictionary()
"""The :class:`ImageFolder` of each training dataset handed out, by the dataset's id: how the callback finds the
position of the dataset ``fit`` was given."""


@dataclass(eq=False)
class ImageFolder:
    """A folder of class folders of images, as runner trains on them: ``train`` and ``validation`` datasets of
    (images, labels) batches for ``model.fit``, and the class names."""

    data: ImageFolderData
    position: Position = field(default_factory=Position)

    def __post_init__(self) -> None:
        self._train = self.data.train_batches_following(self.position.take)
        self._validation = self.data.validation_batches()
        _POSITIONS[id(self._train)] = self

    @property
    def train(self) -> tf.data.Dataset:
        """The training batches, each epoch in the order of (seed, epoch)."""
        return self._train

    @property
    def validation(self) -> tf.data.Dataset | None:
        """The validation batches in a fixed order; ``None`` without validation images."""
        return self._validation

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes, in the order of their label numbers."""
        return self.data.class_names

    @property
    def batch_size(self) -> int:
        """Images per training batch."""
        return self.data.batch_size

    @property
    def num_train(self) -> int:
        """Training images."""
        return self.data.num_train

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per epoch (the last one may be partial)."""
        return self.data.steps_per_epoch


def dataset_of(x: object) -> ImageFolder | None:
    """The :class:`ImageFolder` whose training batches ``x`` is (or which ``x`` is); ``None`` for other data."""
    if isinstance(x, ImageFolder):
        return x
    return _POSITIONS.get(id(x))


def image_folder(
    path: str | Path,
    *,
    image_size: tuple[int, int] = (150, 150),
    batch_size: int = 32,
    train: str = "train",
    validation: str | None = None,
    validation_split: float | None = None,
    label_mode: str = "binary",
    color_mode: str = "rgb",
    seed: int = 0,
    sha256: str | None = None,
    cache_dir: Path | None = None,
) -> ImageFolder:
    """runner's dataset for your own ``model.fit``: ``path`` (a folder, a .zip/.tar.gz or a URL, fetched once into
    the local cache) holds ``train`` with a subfolder per class, and ``validation`` likewise (or a
    ``validation_split`` of the training images is held out). Images come as float32 0-255 pixels, resized to
    ``image_size``; labels as ``label_mode`` says (binary, categorical, int)."""
    try:
        spec = DatasetSpec(
            source=str(path),
            sha256=sha256,
            train=train,
            validation=validation,
            validation_split=validation_split,
            image_size=image_size,
            color_mode=color_mode,
            label_mode=label_mode,
            batch_size=batch_size,
        )
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "path"
        raise UsageError(f"runner.data.image_folder: {where}: {first['msg']}") from None
    data = prepare_dataset(spec, seed=seed, cache_dir=cache_dir, console=Console(stderr=True))
    return ImageFolder(data)
