"""``dataset.augment`` for the JAX backend's NumPy batches: the changes of the TensorFlow pipeline's augmenter
(:mod:`runner.train.data.augment`), in the same order, with the same geometry
(:mod:`~runner.train.data.augment_transform`), without TensorFlow.

Every image's draws come from its own Philox stream, keyed by (seed, epoch x stride + the image's index), so they
are a pure function of (seed, epoch, image), as on TensorFlow: a resumed job augments each image as an
uninterrupted one would, in whatever batch it lands (after a halved batch too), with no generator state to keep.
The numbers differ from TensorFlow's stateless ones, as the decoded pixels already do (a job is best kept on one
backend). The turn, zoom and shift resample with ``keras.ops.image.affine_transform`` (bilinear, edges
reflected), on the host's CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import keras
import numpy as np

from runner.spec import AugmentSpec
from runner.train.data.augment_transform import DRAWS, EPOCH_STRIDE, transform_rows


def draws_of(ids: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
    """(len(ids), DRAWS) uniform numbers in [0, 1): each row depends only on (seed, epoch, that id)."""
    rows = np.empty((len(ids), DRAWS), dtype=np.float32)
    for row, image in enumerate(ids):
        key = np.array([seed, int(image) + epoch * EPOCH_STRIDE], dtype=np.uint64)
        rows[row] = np.random.Generator(np.random.Philox(key=key)).random(DRAWS, dtype=np.float32)
    return rows


def array_augmenter(spec: AugmentSpec, *, seed: int, epoch: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function of a batch of images (float32, 0-255, (b, h, w, c)) and their indices in the dataset that returns
    them augmented, still in 0-255."""

    def augment(images: np.ndarray, ids: np.ndarray) -> np.ndarray:
        spread = 2.0 * draws_of(ids, seed=seed, epoch=epoch) - 1.0  # each in [-1, 1)
        if spec.flip in ("horizontal", "both"):
            images = _flip(images, spread[:, 0] < 0.0, axis=2)
        if spec.flip in ("vertical", "both"):
            images = _flip(images, spread[:, 1] < 0.0, axis=1)
        if spec.rotation or spec.zoom or spec.translation:
            height, width = (np.float32(size) for size in images.shape[1:3])
            images = resample(images, transform_rows(spec, spread, height, width, np))
        if spec.contrast:
            factor = (1.0 + spec.contrast * spread[:, 6])[:, np.newaxis, np.newaxis, np.newaxis]
            mean = images.mean(axis=(1, 2), keepdims=True)
            images = (images - mean) * factor + mean
        if spec.brightness:
            images = images + (spec.brightness * 255.0 * spread[:, 7])[:, np.newaxis, np.newaxis, np.newaxis]
        return np.clip(images, 0.0, 255.0).astype(np.float32)

    return augment


def resample(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``images`` turned, zoomed and shifted by one projective transform row each: bilinear, edges reflected, as
    TensorFlow's ``ImageProjectiveTransformV3`` on the other pipeline.

    On JAX this runs on the host's CPU, as tf.data's augmentation does: the batch is a NumPy array on the host
    already, an accelerator's default matmul precision (bfloat16 on a TPU) would move the sampling points, and
    the coordinates' temporary arrays (about 1 GB for 128 images of 224x224x3) would compete with training for
    the accelerator's memory."""
    with _on_the_host():
        transformed = keras.ops.image.affine_transform(
            images, rows.astype(np.float32), interpolation="bilinear", fill_mode="reflect", data_format="channels_last"
        )
        return keras.ops.convert_to_numpy(transformed)


def _on_the_host() -> contextlib.AbstractContextManager[object]:
    if keras.backend.backend() != "jax":
        return contextlib.nullcontext()
    import jax  # noqa: PLC0415 (only on the JAX backend)

    return jax.default_device(jax.devices("cpu")[0])


def _flip(images: np.ndarray, which: np.ndarray, *, axis: int) -> np.ndarray:
    return np.where(which[:, np.newaxis, np.newaxis, np.newaxis], np.flip(images, axis=axis), images)
