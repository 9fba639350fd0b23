"""A stand-in for a GPU's memory limit on Keras' JAX backend, so its out-of-memory path runs without a GPU.

``oom_model`` is a model factory (``model.factory: tests.support.jax_memory_limit:oom_model``) whose first layer,
:class:`MemoryLimit`, raises JAX's real runtime error type, ``jax.errors.JaxRuntimeError``, with the text XLA
gives when a GPU's memory is full (``RESOURCE_EXHAUSTED: Out of memory while trying to allocate ...``), from
the compiled call of any step whose batch holds more than ``max_batch`` images. JAX traces each batch shape
when it is first called, which is where XLA's real error is raised too. No TensorFlow is imported.
"""

from __future__ import annotations

from typing import Any

import jax
import keras


class MemoryLimit(keras.layers.Layer):
    """Passes images through; a batch of more than ``max_batch`` runs out of "memory", as on a small GPU."""

    def __init__(self, max_batch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_batch = max_batch

    def call(self, images: Any) -> Any:
        batch = images.shape[0]  # symbolic while Keras infers shapes; a number when JAX traces a step
        if isinstance(batch, int) and batch > self.max_batch:
            size = 4 * batch * 2**20
            raise jax.errors.JaxRuntimeError(
                f"RESOURCE_EXHAUSTED: Out of memory while trying to allocate {size} bytes (a GPU's stand-in: "
                f"batches of more than {self.max_batch} images)"
            )
        return images

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "max_batch": self.max_batch}


def oom_model(input_shape: tuple[int, int, int], num_classes: int, *, max_batch: int) -> keras.Model:
    """A tiny classifier behind :class:`MemoryLimit` (its first layer, so it sees the images as they come)."""
    inputs = keras.Input(shape=input_shape)
    x = MemoryLimit(max_batch)(inputs)
    x = keras.layers.Rescaling(1.0 / 255)(x)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)
