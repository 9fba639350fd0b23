"""A stand-in for a GPU's memory limit, so the out-of-memory tests run without a GPU.

``oom_model`` is a model factory (``model.factory: tests.support.oom_model:oom_model``) whose first layer,
:class:`MemoryLimit`, makes TensorFlow raise its real out-of-memory error, ``tf.errors.ResourceExhaustedError``,
from inside ``train_on_batch`` and ``evaluate`` when a batch holds more images than ``max_batch``: a GPU whose
memory holds only that many.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf


class MemoryLimit(keras.layers.Layer):
    """Passes images through; a batch of more than ``max_batch`` runs out of "memory", as on a small GPU.

    A batch dimension known while Keras traces its step (static) raises ``tf.errors.ResourceExhaustedError``
    there; an unknown one (dynamic) is checked when the step runs, by a ``py_function`` whose ``MemoryError``
    TensorFlow turns into ``ResourceExhaustedError`` at the real call site. ``fits_first`` lets that many
    training batches through whatever their size, and the validation batches between them (memory that fragments
    as training goes: the error then strikes mid-epoch, or in a validation). ``pause_s`` slows each training
    batch, so a test can kill the worker mid-run. ``record_to`` appends a JSON line per batch that went through:
    ``training`` and a fingerprint of each image.
    """

    def __init__(
        self,
        max_batch: int,
        *,
        fits_first: int = 0,
        pause_s: float = 0.0,
        record_to: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_batch, self.fits_first, self.pause_s, self.record_to = max_batch, fits_first, pause_s, record_to
        self.supports_jit = False  # XLA cannot compile a py_function
        self._batches_trained = 0

    def call(self, images: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        batch = images.shape[0]
        if batch is not None and batch > self.max_batch and not self.fits_first:
            raise tf.errors.ResourceExhaustedError(
                None, None, f"OOM when allocating tensor with shape{list(images.shape)} (a GPU's stand-in)"
            )
        check = functools.partial(self._check, bool(training))
        passed = tf.py_function(check, [images], tf.float32)
        passed.set_shape([])
        return images + passed  # keeps the check in the step's graph

    def _check(self, training: bool, images: tf.Tensor) -> np.float32:
        if images.shape[0] > self.max_batch and self._batches_trained >= self.fits_first:
            raise MemoryError(f"OOM when allocating tensor with shape{list(images.shape)} (a GPU's stand-in)")
        if training:
            self._batches_trained += 1
        if training and self.pause_s:
            time.sleep(self.pause_s)
        if self.record_to:
            prints = [hashlib.sha1(image.tobytes()).hexdigest()[:12] for image in images.numpy()]
            with open(self.record_to, "a") as record:
                record.write(json.dumps({"training": training, "images": prints}) + "\n")
        return np.float32(0.0)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "max_batch": self.max_batch,
            "fits_first": self.fits_first,
            "pause_s": self.pause_s,
            "record_to": self.record_to,
        }


def oom_model(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    max_batch: int,
    fits_first: int = 0,
    pause_s: float = 0.0,
    record_to: str | None = None,
) -> keras.Model:
    """A tiny classifier behind :class:`MemoryLimit` (its first layer, so it sees the images as they come)."""
    inputs = keras.Input(shape=input_shape)
    x = MemoryLimit(max_batch, fits_first=fits_first, pause_s=pause_s, record_to=record_to)(inputs)
    x = keras.layers.Rescaling(1.0 / 255)(x)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)
