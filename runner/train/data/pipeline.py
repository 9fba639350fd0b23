"""The dataset a job trains on: a folder per class of images, batched in an order that depends only on
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would have seen.

A dataset whose decoded images fit :data:`MEMORY_BUDGET_BYTES` is decoded once, in parallel, into memory, and
each epoch gathers its batches from there; a larger one is decoded from local disk every epoch. Both give the
same batches: images are rounded to uint8 after resizing on both paths, and every map keeps its input order.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tensorflow as tf
from rich.console import Console

from runner.errors import DatasetError
from runner.spec import AugmentSpec, DatasetSpec
from runner.train.data.augment import augmenter
from runner.train.data.common import (
    MEMORY_BUDGET_BYTES,
    decode_progress,
    epoch_order,
    first_sample,
    folder_fields,
    read_source,
)
from runner.train.data.download import is_transient_download
from runner.train.data.image_folder import Examples, find_images

__all__ = [
    "MEMORY_BUDGET_BYTES",
    "ImageFolderData",
    "epoch_order",
    "image_loader",
    "is_transient_download",
    "prepare_dataset",
]

AUTOTUNE = tf.data.AUTOTUNE

_DECODE_BATCH = 256


class _Batcher(Protocol):
    def batches(self, indices: np.ndarray, batch_size: int) -> tf.data.Dataset:
        """Batches of (uint8 images, int32 class indices, int64 ``indices``) of the examples at ``indices``, in
        that order."""
        ...

    def batches_of(self, indices: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
        """The same, of the examples a dataset of int64 indices names (known only when it is iterated)."""
        ...


@dataclass(frozen=True)
class ImageFolderData:
    """Training and validation batches of an image dataset, ready for Keras."""

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
    """Training images per class, in the order of :attr:`class_names`."""
    class_weights: tuple[float, ...] | None = None
    """A loss weight per class for the training batches (``training.class_weight``); ``None``: all 1."""
    augment: AugmentSpec | None = None
    """Random changes to the training images (``dataset.augment``)."""
    _train: _Batcher = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    _validation: _Batcher | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        """How many classes (subfolders of the train folder) there are."""
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image: (height, width, channels)."""
        return (*self.image_size, self.channels)

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one epoch; the last one may be partial."""
        return math.ceil(self.num_train / self.batch_size)

    @property
    def element_spec(self) -> Any:
        """The training batches' shapes and dtypes: what Keras builds the metrics from."""
        return self.train_batches(epoch=0).element_spec

    def largest_training_pixel(self) -> float:
        """The largest pixel value of the first training batch (to warn about unscaled input)."""
        images = next(iter(self.train_batches(epoch=0).take(1)))[0]
        return float(tf.reduce_max(images))

    def train_batches(self, *, epoch: int, start_step: int = 0, start_sample: int | None = None) -> tf.data.Dataset:
        """Batches of epoch ``epoch`` from batch ``start_step`` on: batch k is the same whatever the start.

        ``start_sample`` starts at that sample of the epoch's order instead: after the batch size changed mid-epoch,
        the samples done are no longer a multiple of the batch size.
        """
        start_sample = first_sample(self, epoch=epoch, start_step=start_step, start_sample=start_sample)
        order = epoch_order(self.seed, epoch, self.num_train)
        augment = None if self.augment is None else augmenter(self.augment, seed=self.seed, epoch=epoch)
        return self._finish(self._train.batches(order[start_sample:], self.batch_size), self.class_weights, augment)

    def train_batches_following(self, position: Callable[[], tuple[int, int]]) -> tf.data.Dataset:
        """Training batches whose epoch and first sample are asked of ``position`` each time an iterator over them
        starts: one dataset that ``model.fit`` iterates once per epoch, each time in that epoch's order."""
        seed, count = self.seed, self.num_train

        def order() -> np.ndarray:
            epoch, start = position()
            return epoch_order(seed, epoch, count)[start:].astype(np.int64)

        indices = (
            tf.data.Dataset.from_tensors(0)
            .map(lambda _: tf.ensure_shape(tf.py_function(order, [], tf.int64), [None]))
            .flat_map(tf.data.Dataset.from_tensor_slices)
        )
        return self._finish(self._train.batches_of(indices, self.batch_size), self.class_weights)

    def validation_batches(self) -> tf.data.Dataset | None:
        """Validation batches in a fixed order; ``None`` when the dataset has no validation images."""
        if self._validation is None:
            return None
        return self._finish(self._validation.batches(np.arange(self.num_validation), self.batch_size))

    def _finish(
        self,
        batches: tf.data.Dataset,
        class_weights: tuple[float, ...] | None = None,
        augment: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None,
    ) -> tf.data.Dataset:
        """Keras' (images, labels) batches; with ``class_weights``, (images, labels, sample weights), as ``fit``
        makes of its ``class_weight``: the loss is weighted, the metrics are not. ``augment`` changes the images."""
        mode, classes = self.label_mode, self.num_classes
        weights = None if class_weights is None else tf.constant(class_weights, dtype=tf.float32)

        def to_keras(images: tf.Tensor, labels: tf.Tensor, ids: tf.Tensor) -> tuple[tf.Tensor, ...]:
            images = tf.cast(images, tf.float32)
            if augment is not None:
                images = augment(images, ids)
            keras_batch = (images, _encode_labels(labels, mode, classes))
            if weights is None:
                return keras_batch
            return (*keras_batch, tf.gather(weights, tf.cast(labels, tf.int32)))

        options = tf.data.Options()
        options.deterministic = True
        finished = batches.map(to_keras, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)
        return finished.with_options(options)


def _encode_labels(labels: tf.Tensor, label_mode: str, num_classes: int) -> tf.Tensor:
    """Class indices as Keras' losses want them: (b, 1) floats, one-hot floats, or int32 indices."""
    if label_mode == "binary":
        return tf.cast(labels, tf.float32)[:, tf.newaxis]
    if label_mode == "categorical":
        return tf.one_hot(labels, num_classes, dtype=tf.float32)
    return labels


def prepare_dataset(
    spec: DatasetSpec,
    *,
    seed: int,
    cache_dir: Path | None = None,
    console: Console | None = None,
    memory_budget: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ImageFolderData:
    """Fetch, check and unpack the source into the local cache (once), find the classes, check every image.

    ``memory_budget`` (default :data:`MEMORY_BUDGET_BYTES`) bounds the decoded images kept in memory;
    ``sleep`` is the pause between download retries.
    """
    return read_source(
        spec,
        lambda root: _read_images(root, spec, seed=seed, console=console, memory_budget=memory_budget),
        cache_dir=cache_dir,
        console=console,
        sleep=sleep,
    )


def _read_images(
    root: Path, spec: DatasetSpec, *, seed: int, console: Console | None, memory_budget: int | None
) -> ImageFolderData:
    folder = find_images(root, spec, seed=seed)
    fields = folder_fields(folder, spec, seed=seed, memory_budget=memory_budget)
    load = image_loader(spec.image_size, fields["channels"])

    def batcher(examples: Examples) -> _Batcher:
        if fields["in_memory"]:
            return _DecodedImages(_decode_all(examples, root, load, console), examples.labels)
        return _ImageFiles(examples, load)

    return ImageFolderData(
        **fields,
        augment=spec.augment,
        _train=batcher(folder.train),
        _validation=batcher(folder.validation) if folder.validation is not None else None,
    )


def image_loader(image_size: tuple[int, int], channels: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """A function from a file path to its image: uint8, ``image_size``, ``channels``."""

    def load(path: tf.Tensor) -> tf.Tensor:
        # Decoded as RGB whatever the file: TensorFlow decodes GIF and BMP only to 3 (or 4) channels.
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image = tf.cast(tf.ensure_shape(image, [None, None, 3]), tf.float32)
        if channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        image = tf.image.resize(image, image_size, method="bilinear")  # as image_dataset_from_directory does
        # Rounded on both paths: memory holds uint8, and streamed batches must equal the ones gathered from it.
        return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)

    return load


class _DecodedImages:
    """Images decoded once and kept in (host) memory; a batch is a gather."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        with tf.device("/CPU:0"):  # not on the GPU: its memory is for the model
            self._images = tf.constant(images)
            self._labels = tf.constant(labels)

    def batches(self, indices: np.ndarray, batch_size: int) -> tf.data.Dataset:
        return self.batches_of(tf.data.Dataset.from_tensor_slices(indices.astype(np.int64)), batch_size)

    def batches_of(self, indices: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
        images, labels = self._images, self._labels

        def gather(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            return tf.gather(images, batch), tf.gather(labels, batch), batch

        return indices.batch(batch_size).map(gather, num_parallel_calls=AUTOTUNE, deterministic=True)


class _ImageFiles:
    """Image files on local disk, decoded in parallel (keeping their order) every time they are read."""

    def __init__(self, examples: Examples, load: Callable[[tf.Tensor], tf.Tensor]) -> None:
        self._paths = np.asarray([str(path) for path in examples.files], dtype=object)
        self._labels = examples.labels
        self._load = load

    def batches_of(self, indices: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
        load = self._load
        paths = tf.constant(list(self._paths), dtype=tf.string)
        labels = tf.constant(self._labels)

        def read(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            return load(tf.gather(paths, index)), tf.gather(labels, index), index

        return indices.map(read, num_parallel_calls=AUTOTUNE, deterministic=True).batch(batch_size)

    def batches(self, indices: np.ndarray, batch_size: int) -> tf.data.Dataset:
        load = self._load
        files = tf.data.Dataset.from_tensor_slices(
            (tf.constant(list(self._paths[indices]), dtype=tf.string), self._labels[indices], indices.astype(np.int64))
        )
        decoded = files.map(
            lambda path, label, index: (load(path), label, index), num_parallel_calls=AUTOTUNE, deterministic=True
        )
        return decoded.batch(batch_size)


def _decode_all(
    examples: Examples, root: Path, load: Callable[[tf.Tensor], tf.Tensor], console: Console | None
) -> np.ndarray:
    """Every image of ``examples`` decoded, in parallel and in order; a file that fails is named."""
    count = len(examples)
    paths = tf.constant([str(path) for path in examples.files], dtype=tf.string)
    indexed = tf.data.Dataset.from_tensor_slices((tf.range(count, dtype=tf.int64), paths))
    decoded = indexed.map(lambda index, path: (index, load(path)), num_parallel_calls=AUTOTUNE, deterministic=True)
    # ignore_errors drops a file that fails to decode; the index shows which one, to name it afterwards.
    batches = decoded.ignore_errors().batch(_DECODE_BATCH).prefetch(2)
    images: np.ndarray | None = None
    seen = np.zeros(count, dtype=bool)
    with decode_progress(console, count) as advance:
        for index, batch in batches:
            where = index.numpy()
            if images is None:
                images = np.empty((count, *batch.shape[1:]), dtype=np.uint8)
            images[where] = batch.numpy()
            seen[where] = True
            advance(len(where))
    if not seen.all():
        bad = examples.files[int(np.flatnonzero(~seen)[0])]
        raise DatasetError(
            f"image {bad.relative_to(root)} cannot be decoded ({_decode_problem(bad)}): replace or delete it"
        )
    assert images is not None
    return images


def _decode_problem(path: Path) -> str:
    """TensorFlow's own reason for refusing an image, without its graph decorations."""
    try:
        tf.io.decode_image(tf.io.read_file(str(path)), expand_animations=False)
    except tf.errors.OpError as error:
        message = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:\w+\]", "", error.message).strip()
        return message.splitlines()[0] if message else type(error).__name__
    return "it decodes on its own; it may be damaged part way"
