"""The input pipeline of the JAX backend: NumPy batches of images that Pillow decodes, with no TensorFlow.

Colab's TPU runtime (and a JAX-only machine) has no TensorFlow, so no ``tf.data``. Why NumPy and Pillow rather
than Grain: both are already there wherever Keras is (Keras needs NumPy; Pillow comes with every Colab and
Kaggle image and with matplotlib, a dependency of runner), the images of a job are a folder decoded once into
memory (the tutorial's 3,000 cats and dogs are 200 MB), and each epoch is a gather in the epoch's order, which
is all Grain's sampler would give. A dataset larger than :data:`MEMORY_BUDGET_BYTES` is decoded batch by batch
from local disk, on threads (Pillow's decoders release the GIL), one batch ahead of training.

The order of each epoch is :func:`~runner.train.data.common.epoch_order`'s, as on the TensorFlow path, so a
resumed run sees the batches an uninterrupted one would have. The pixels themselves differ from TensorFlow's
(Pillow's bilinear filter smooths when it shrinks an image, TensorFlow's does not), so a job is best kept on one
backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from PIL import Image, UnidentifiedImageError
from rich.console import Console

from runner.errors import DatasetError
from runner.spec import AugmentSpec, DatasetSpec
from runner.train.data.array_augment import array_augmenter
from runner.train.data.common import (
    decode_progress,
    epoch_order,
    first_sample,
    folder_fields,
    read_source,
)
from runner.train.data.image_folder import Examples, find_images

_THREADS = min(16, os.cpu_count() or 2)

DECODE_ERRORS: tuple[type[BaseException], ...] = (UnidentifiedImageError, OSError, ValueError)
"""What Pillow raises for a file that is not an image it can decode."""


@dataclass(frozen=True)
class _Images:
    """Examples as uint8 arrays: decoded once into memory, or read from their files for each batch."""

    labels: np.ndarray
    decoded: np.ndarray | None = None
    files: tuple[Path, ...] = ()
    load: Callable[[Path], np.ndarray] | None = None

    def take(self, indices: np.ndarray, pool: ThreadPoolExecutor) -> tuple[np.ndarray, np.ndarray]:
        if self.decoded is not None:
            return self.decoded[indices], self.labels[indices]
        assert self.load is not None
        load = self.load

        def read(path: Path) -> np.ndarray:
            try:
                return load(path)
            except DECODE_ERRORS as error:
                raise DatasetError(f"image {path} cannot be decoded ({error}): replace or delete it") from None

        return np.stack(list(pool.map(read, [self.files[i] for i in indices]))), self.labels[indices]


class Batches:
    """One pass over some examples in a given order, as Keras batches (float32 images, encoded labels, and sample
    weights with ``class_weight``), prepared one batch ahead on a thread."""

    def __init__(
        self,
        data: ArrayFolderData,
        images: _Images,
        order: np.ndarray,
        weights: np.ndarray | None,
        augment: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.data, self.images, self.order, self.weights, self.augment = data, images, order, weights, augment

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.data.batch_size)

    def batch(self, number: int, pool: ThreadPoolExecutor) -> tuple[np.ndarray, ...]:
        """Batch ``number`` (0-based) of this pass."""
        size = self.data.batch_size
        ids = self.order[number * size : (number + 1) * size]
        images, labels = self.images.take(ids, pool)
        pixels = images.astype(np.float32)
        if self.augment is not None:
            pixels = self.augment(pixels, ids)
        batch = (pixels, encode_labels(labels, self.data.label_mode, self.data.num_classes))
        return batch if self.weights is None else (*batch, self.weights[labels])

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        with ThreadPoolExecutor(_THREADS) as pool, ThreadPoolExecutor(1) as ahead:
            coming: Future[tuple[np.ndarray, ...]] | None = ahead.submit(self.batch, 0, pool) if len(self) else None
            for number in range(len(self)):
                assert coming is not None
                batch = coming.result()
                coming = ahead.submit(self.batch, number + 1, pool) if number + 1 < len(self) else None
                yield batch

    @property
    def element_spec(self) -> tuple[keras.KerasTensor, ...]:
        """The batches' shapes and dtypes, with any batch size: what Keras builds the metrics from."""
        return self.data.element_spec


class _ValidationBatches(keras.utils.PyDataset):
    """The validation batches in their fixed order, as Keras' ``evaluate`` reads a dataset of NumPy batches."""

    def __init__(self, batches: Batches) -> None:
        super().__init__()
        self.batches = batches
        self._pool = ThreadPoolExecutor(_THREADS)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, number: int) -> tuple[np.ndarray, ...]:
        return self.batches.batch(number, self._pool)


def encode_labels(labels: np.ndarray, label_mode: str, num_classes: int) -> np.ndarray:
    """Class indices as Keras' losses want them: (b, 1) floats, one-hot floats, or int32 indices."""
    if label_mode == "binary":
        return labels.astype(np.float32)[:, np.newaxis]
    if label_mode == "categorical":
        return np.eye(num_classes, dtype=np.float32)[labels]
    return labels.astype(np.int32)


@dataclass(frozen=True)
class ArrayFolderData:
    """Training and validation batches of an image dataset as NumPy arrays (the JAX backend's); the same fields
    and methods as the TensorFlow pipeline's ``ImageFolderData``."""

    class_names: tuple[str, ...]
    image_size: tuple[int, int]
    channels: int
    label_mode: str
    batch_size: int
    num_train: int
    num_validation: int
    seed: int
    in_memory: bool
    train_counts: tuple[int, ...] = ()
    class_weights: tuple[float, ...] | None = None
    augment: AugmentSpec | None = None
    """Random changes to the training images (``dataset.augment``)."""
    _train: _Images = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    _validation: _Images | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (*self.image_size, self.channels)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_train / self.batch_size)

    @property
    def element_spec(self) -> tuple[keras.KerasTensor, ...]:
        labels = {
            "binary": keras.KerasTensor((None, 1), "float32"),
            "categorical": keras.KerasTensor((None, self.num_classes), "float32"),
        }.get(self.label_mode, keras.KerasTensor((None,), "int32"))
        spec = (keras.KerasTensor((None, *self.input_shape), "float32"), labels)
        return spec if self.class_weights is None else (*spec, keras.KerasTensor((None,), "float32"))

    def train_batches(self, *, epoch: int, start_step: int = 0, start_sample: int | None = None) -> Batches:
        """Batches of epoch ``epoch`` from batch ``start_step`` (or sample ``start_sample``) on."""
        start_sample = first_sample(self, epoch=epoch, start_step=start_step, start_sample=start_sample)
        order = epoch_order(self.seed, epoch, self.num_train)[start_sample:]
        weights = None if self.class_weights is None else np.asarray(self.class_weights, dtype=np.float32)
        augment = None if self.augment is None else array_augmenter(self.augment, seed=self.seed, epoch=epoch)
        return Batches(self, self._train, order, weights, augment)

    def validation_batches(self) -> keras.utils.PyDataset | None:
        """Validation batches in a fixed order; ``None`` when the dataset has no validation images."""
        if self._validation is None:
            return None
        return _ValidationBatches(Batches(self, self._validation, np.arange(self.num_validation), None))

    def largest_training_pixel(self) -> float:
        """The largest pixel value of the first training batch (to warn about unscaled input)."""
        with ThreadPoolExecutor(_THREADS) as pool:
            return float(np.max(self.train_batches(epoch=0).batch(0, pool)[0]))


def image_reader(image_size: tuple[int, int], channels: int) -> Callable[[Path], np.ndarray]:
    """A function from an image file to its pixels: uint8, ``image_size``, ``channels``."""
    height, width = image_size

    def read(path: Path) -> np.ndarray:
        with Image.open(path) as opened:
            image = opened.convert("RGB")  # the first frame of an animation, as on the TensorFlow path
        if channels == 1:
            image = image.convert("L")  # ITU-R 601-2 luma, the weights of tf.image.rgb_to_grayscale
        pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
        return pixels[..., np.newaxis] if channels == 1 else pixels

    return read


def _decode_all(
    examples: Examples, root: Path, read: Callable[[Path], np.ndarray], console: Console | None
) -> np.ndarray:
    """Every image of ``examples`` decoded on threads, in order; a file that fails is named."""

    def read_or_none(path: Path) -> np.ndarray | str:
        try:
            return read(path)
        except DECODE_ERRORS as error:
            return str(error).splitlines()[0] if str(error) else type(error).__name__

    images: np.ndarray | None = None
    with decode_progress(console, len(examples)) as advance, ThreadPoolExecutor(_THREADS) as pool:
        for index, (path, image) in enumerate(zip(examples.files, pool.map(read_or_none, examples.files), strict=True)):
            if isinstance(image, str):
                raise DatasetError(f"image {path.relative_to(root)} cannot be decoded ({image}): replace or delete it")
            if images is None:
                images = np.empty((len(examples), *image.shape), dtype=np.uint8)
            images[index] = image
            advance(1)
    assert images is not None
    return images


def prepare_dataset(
    spec: DatasetSpec,
    *,
    seed: int,
    cache_dir: Path | None = None,
    console: Console | None = None,
    memory_budget: int | None = None,
    **_: Any,
) -> ArrayFolderData:
    """Fetch and unpack the source into the local cache (once), find the classes, check and decode the images."""
    return read_source(
        spec,
        lambda root: _read_images(root, spec, seed=seed, console=console, memory_budget=memory_budget),
        cache_dir=cache_dir,
        console=console,
    )


def _read_images(
    root: Path, spec: DatasetSpec, *, seed: int, console: Console | None, memory_budget: int | None
) -> ArrayFolderData:
    folder = find_images(root, spec, seed=seed)
    fields = folder_fields(folder, spec, seed=seed, memory_budget=memory_budget)
    read = image_reader(spec.image_size, fields["channels"])

    def images(examples: Examples) -> _Images:
        if fields["in_memory"]:
            return _Images(examples.labels, decoded=_decode_all(examples, root, read, console))
        return _Images(examples.labels, files=examples.files, load=read)

    return ArrayFolderData(
        **fields,
        augment=spec.augment,
        _train=images(folder.train),
        _validation=images(folder.validation) if folder.validation is not None else None,
    )
