"""Model factories for the Keras job tests, imported by `runner work` through ``model.factory``."""

from __future__ import annotations

from typing import Any


def not_a_model(input_shape: Any, num_classes: int) -> Any:
    """A factory that returns something other than a keras.Model."""
    return 42


def compiled_with_rmsprop(input_shape: Any, num_classes: int) -> Any:
    """A small CNN that rescales its input and compiles itself with RMSprop 1e-4, as tutorials' models do."""
    import keras  # noqa: PLC0415 (only `runner work` imports this module, after TensorFlow)

    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=1e-4),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def without_rescaling(input_shape: Any, num_classes: int) -> Any:
    """A small CNN, not compiled, that takes its input as it comes (no Rescaling layer)."""
    import keras  # noqa: PLC0415

    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
