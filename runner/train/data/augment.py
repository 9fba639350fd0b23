"""``dataset.augment``: random flips, turns, zooms, shifts, contrast and brightness for the training images.

Every image's random draws are a pure function of (seed, epoch, the image's place in the dataset), made with
TensorFlow's stateless random ops: a resumed job augments each image exactly as an uninterrupted one, whatever
batch it lands in (also after a batch size was halved), and there is no generator state to keep in a checkpoint.
Keras' preprocessing layers (``RandomFlip``, ``RandomRotation``...) draw from a ``SeedGenerator`` whose state would
have to travel with every snapshot, and they run in the model, where the export would carry them too.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from runner.spec import AugmentSpec
from runner.train.data.augment_transform import DRAWS, EPOCH_STRIDE, transform_rows


def augmenter(spec: AugmentSpec, *, seed: int, epoch: int) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A function of a batch of images (float32, 0-255, (b, h, w, c)) and their indices in the dataset that returns
    them augmented, still in 0-255."""

    def augment(images: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
        seeds = tf.stack(
            [tf.fill(tf.shape(ids), tf.constant(seed, tf.int64)), tf.cast(ids, tf.int64) + epoch * EPOCH_STRIDE], 1
        )
        draws = tf.map_fn(
            lambda pair: tf.random.stateless_uniform([DRAWS], seed=pair), seeds, fn_output_signature=tf.float32
        )
        spread = 2.0 * draws - 1.0  # each in [-1, 1)
        if spec.flip in ("horizontal", "both"):
            images = _flip(images, draws[:, 0] < 0.5, axis=2)
        if spec.flip in ("vertical", "both"):
            images = _flip(images, draws[:, 1] < 0.5, axis=1)
        if spec.rotation or spec.zoom or spec.translation:
            images = _transform(images, spec, spread)
        if spec.contrast:
            factor = (1.0 + spec.contrast * spread[:, 6])[:, tf.newaxis, tf.newaxis, tf.newaxis]
            mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
            images = (images - mean) * factor + mean
        if spec.brightness:
            images = images + (spec.brightness * 255.0 * spread[:, 7])[:, tf.newaxis, tf.newaxis, tf.newaxis]
        return tf.clip_by_value(images, 0.0, 255.0)

    return augment


def _flip(images: tf.Tensor, which: tf.Tensor, *, axis: int) -> tf.Tensor:
    return tf.where(which[:, tf.newaxis, tf.newaxis, tf.newaxis], tf.reverse(images, [axis]), images)


def _transform(images: tf.Tensor, spec: AugmentSpec, spread: tf.Tensor) -> tf.Tensor:
    """Turn about the centre, zoom and shift in one resampling (bilinear, edges reflected, as Keras' layers)."""
    shape = tf.shape(images)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    transforms = transform_rows(spec, spread, height, width, tf)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
