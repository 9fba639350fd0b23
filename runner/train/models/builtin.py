"""The built-in networks: ``simple_cnn`` (the tutorial's) and ``mobilenet_v2``, each checking its ``model.params``.

Inputs are float32 images in [0, 255] (the data pipeline does not rescale), so each network carries its own
rescaling layer and a saved model takes raw pixels.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras

from runner.errors import ModelError

InputShape = tuple[int, int, int]

SIMPLE_CNN_PARAMS: dict[str, Any] = {"filters": 32, "dense": 512, "dropout": 0.0, "augment": False}
"""``model.params`` of ``simple_cnn`` and their defaults (the tutorial's network)."""

MOBILENET_V2_PARAMS: dict[str, Any] = {"weights": None, "alpha": 1.0, "dropout": 0.2, "trainable_base": False}
"""``model.params`` of ``mobilenet_v2`` and their defaults."""

MOBILENET_V2_MIN_SIDE = 32
"""The smallest image side keras.applications.MobileNetV2 accepts."""

_RATE = "a number from 0 up to (not including) 1"


def simple_cnn(params: dict[str, Any], *, input_shape: InputShape, head: keras.layers.Layer, seed: int) -> keras.Model:
    """The tutorial's network: Rescaling, Conv2D, MaxPooling2D, Flatten, Dense, head."""
    p = _with_defaults("simple_cnn", params, SIMPLE_CNN_PARAMS)
    _check_param("filters", p["filters"], _is_positive_int(p["filters"]), "a positive integer")
    _check_param("dense", p["dense"], _is_positive_int(p["dense"]), "a positive integer")
    _check_param("dropout", p["dropout"], _is_rate(p["dropout"]), _RATE)
    _check_param("augment", p["augment"], isinstance(p["augment"], bool), "true or false")
    layers = keras.layers
    with _params_errors("simple_cnn", params):
        stack: list[Any] = [keras.Input(shape=input_shape)]
        if p["augment"]:
            stack += [
                layers.RandomFlip("horizontal", seed=_layer_seed(seed, "random_flip")),
                layers.RandomRotation(0.1, seed=_layer_seed(seed, "random_rotation")),
            ]
        stack += [
            layers.Rescaling(1.0 / 255),
            layers.Conv2D(p["filters"], 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(p["dense"], activation="relu"),
        ]
        if p["dropout"]:
            stack.append(layers.Dropout(p["dropout"], seed=_layer_seed(seed, "dropout")))
        return keras.Sequential([*stack, head], name="simple_cnn")


def mobilenet_v2(
    params: dict[str, Any], *, input_shape: InputShape, head: keras.layers.Layer, seed: int
) -> keras.Model:
    """MobileNetV2 without its top, on pixels scaled to [-1, 1], then pooling, dropout and the head."""
    p = _with_defaults("mobilenet_v2", params, MOBILENET_V2_PARAMS)
    _check_mobilenet_v2(p, input_shape)
    weights = _weights_file(p["weights"])
    with _params_errors("mobilenet_v2", params):
        base = keras.applications.MobileNetV2(
            include_top=False, input_shape=input_shape, weights=None, alpha=p["alpha"]
        )
    if weights is not None:
        _load_weights(base, weights, alpha=p["alpha"], input_shape=input_shape)
    # A frozen base also keeps its BatchNormalization layers in inference mode (Keras 3 ties the two).
    base.trainable = p["trainable_base"]
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(base(x))
    x = keras.layers.Dropout(p["dropout"], seed=_layer_seed(seed, "dropout"))(x)
    return keras.Model(inputs, head(x), name="mobilenet_v2")


def _check_mobilenet_v2(p: dict[str, Any], input_shape: InputShape) -> None:
    alpha = p["alpha"]
    _check_param("alpha", alpha, _is_number(alpha) and alpha > 0, "a positive number such as 0.35 or 1.0")
    _check_param("dropout", p["dropout"], _is_rate(p["dropout"]), _RATE)
    _check_param("trainable_base", p["trainable_base"], isinstance(p["trainable_base"], bool), "true or false")
    if min(input_shape[:2]) < MOBILENET_V2_MIN_SIDE:
        raise ModelError(
            f"mobilenet_v2 needs images of at least {MOBILENET_V2_MIN_SIDE}x{MOBILENET_V2_MIN_SIDE} pixels, "
            f"got {input_shape[0]}x{input_shape[1]}: raise dataset.image_size, or use builtin: simple_cnn"
        )


def _weights_file(weights: Any) -> str | None:
    """The local weights file to load into MobileNetV2, or None; nothing is ever downloaded at run time."""
    if weights is None:
        return None
    if not isinstance(weights, str) or not Path(weights).expanduser().is_file():
        raise ModelError(
            f"model.params.weights {weights!r} is not a file: runner downloads nothing at run time; "
            f"download the weights file (.h5) yourself and give its path, or use weights: null"
        )
    path = Path(weights).expanduser()
    if path.suffix != ".h5":
        raise ModelError(f"model.params.weights {weights!r} must be a Keras .h5 or .weights.h5 file")
    return str(path)


def _load_weights(base: keras.Model, path: str, *, alpha: float, input_shape: InputShape) -> None:
    """Load a weights file into the base, as keras.applications would, but with an error that says what to fix."""
    try:
        base.load_weights(path)
    except Exception as error:
        raise ModelError(
            f"model.params.weights {path!r} does not fit mobilenet_v2 with alpha {alpha} and input shape "
            f"{list(input_shape)} ({one_line(error)}): give the weights file saved for these settings"
        ) from error


def head_for(label_mode: str, num_classes: int) -> keras.layers.Layer:
    """One sigmoid unit for binary labels (as the tutorial), else a softmax over the classes.

    In float32 whatever the dtype policy: a float16 softmax or sigmoid loses the small probabilities the loss
    needs (Keras' mixed-precision guide does the same).
    """
    if label_mode == "binary":
        return keras.layers.Dense(1, activation="sigmoid", name="head", dtype="float32")
    return keras.layers.Dense(num_classes, activation="softmax", name="head", dtype="float32")


# --- params --------------------------------------------------------------------------------------------------


def _with_defaults(builtin: str, params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``params`` over ``defaults``; an unknown name is refused rather than silently ignored."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ModelError(
            f"model.params: {', '.join(map(repr, unknown))} not known to {builtin}; allowed: {', '.join(defaults)}"
        )
    return {**defaults, **params}


def _check_param(name: str, value: Any, valid: bool, expected: str) -> None:
    """Refuse a bad value up front: Keras's own complaint ("'<=' not supported ...") does not say which param."""
    if not valid:
        raise ModelError(f"model.params.{name} must be {expected}, got {value!r}")


def _is_number(value: Any) -> bool:
    # bool is an int in Python, but `dropout: true` is a mistake, not a rate of 1.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_rate(value: Any) -> bool:
    return _is_number(value) and 0 <= value < 1


def _layer_seed(seed: int, layer: str) -> int:
    """A seed for one random layer, derived from the job's seed and different for each layer."""
    return zlib.crc32(f"{seed}:{layer}".encode()) & 0x7FFFFFFF


@contextmanager
def _params_errors(builtin: str, params: dict[str, Any]) -> Iterator[None]:
    """Turn Keras's complaints about a value the checks above let through into a ModelError naming model.params."""
    try:
        yield
    except ModelError:
        raise
    except (ValueError, TypeError) as error:
        raise ModelError(f"model.params {params!r} do not build {builtin}: {one_line(error)}") from error


def one_line(error: BaseException, *, limit: int = 300) -> str:
    """An exception's message on one line and cut short: Keras's can run for pages (a tensor's values, say)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
