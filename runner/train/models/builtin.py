"""The built-in networks: ``simple_cnn`` (the tutorial's) and three on a ``keras.applications`` base
(``mobilenet_v2``, ``efficientnet_b0``, ``resnet50``), which may start from ImageNet weights.

Inputs are float32 images in [0, 255] (the data pipeline does not rescale), so each network carries its own
preprocessing, and a saved model takes raw pixels: MobileNetV2 scales to [-1, 1]; EfficientNet rescales and
normalises inside its base; ResNet50 subtracts the ImageNet mean. The params are checked at submit by
:mod:`runner.networks`; a spec submitted by an older runner is checked again here.

ImageNet weights are Keras' own files, loaded into a base built without them and adjusted where Keras' own
``weights="imagenet"`` model differs from one built without weights: ResNet50's files expect BGR images (Keras'
``preprocess_input`` swaps the channels), so its first convolution's kernel takes the channels in the other order
instead; EfficientNet's ``imagenet`` model divides by the ImageNet standard deviation once more than its
Normalization layer does (keras-team/keras, tensorflow#49930), which goes into that layer's variance. A test
checks both against Keras' own ``weights="imagenet"`` model.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
import numpy as np

from runner.errors import ModelError
from runner.networks import params_problem, with_defaults

InputShape = tuple[int, int, int]

_BASES = {
    "mobilenet_v2": "MobileNetV2",
    "efficientnet_b0": "EfficientNetB0",
    "resnet50": "ResNet50",
}
"""Each pretrained network's ``keras.applications`` class."""

IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
"""What ResNet50's ``preprocess_input`` subtracts (caffe mode), in RGB order."""

IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
"""What Keras' EfficientNet ``imagenet`` model divides by once more (its ``IMAGENET_STDDEV_RGB``)."""


def check_params(spec_builtin: str, params: dict[str, Any], input_shape: InputShape) -> dict[str, Any]:
    """The params over their defaults, refused as at submit (a job folder of an older runner may hold others)."""
    color_mode = "rgb" if input_shape[2] == 3 else "grayscale"
    problem = params_problem(
        spec_builtin, params, image_size=input_shape[:2], color_mode=color_mode, epochs=2**31, learning_rate=10.0
    )
    if problem is not None:
        raise ModelError(problem)
    return with_defaults(spec_builtin, params)


def simple_cnn(params: dict[str, Any], *, input_shape: InputShape, head: keras.layers.Layer, seed: int) -> keras.Model:
    """The tutorial's network: Rescaling, Conv2D, MaxPooling2D, Flatten, Dense, head."""
    p = check_params("simple_cnn", params, input_shape)
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


def pretrained_network(
    builtin: str, params: dict[str, Any], *, input_shape: InputShape, head: keras.layers.Layer, seed: int
) -> keras.Model:
    """The ``keras.applications`` base without its top (its weights not loaded yet: :func:`load_base_weights`),
    after the preprocessing its weights expect, then pooling, dropout and the head."""
    p = check_params(builtin, params, input_shape)
    options = {"alpha": p["alpha"]} if builtin == "mobilenet_v2" else {}
    with _params_errors(builtin, params):
        base = getattr(keras.applications, _BASES[builtin])(
            include_top=False, input_shape=input_shape, weights=None, **options
        )
    # A frozen base also keeps its BatchNormalization layers in inference mode (Keras 3 ties the two).
    base.trainable = p["trainable_base"]
    inputs = keras.Input(shape=input_shape)
    x = inputs
    if builtin == "mobilenet_v2":
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(x)
    elif builtin == "resnet50":
        x = keras.layers.Normalization(mean=list(IMAGENET_MEAN_RGB), variance=[1.0, 1.0, 1.0])(x)
    x = keras.layers.GlobalAveragePooling2D()(base(x))
    x = keras.layers.Dropout(p["dropout"], seed=_layer_seed(seed, "dropout"))(x)
    return keras.Model(inputs, head(x), name=builtin)


def base_of(model: keras.Model) -> keras.Model:
    """The ``keras.applications`` base inside a pretrained network."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def load_base_weights(model: keras.Model, builtin: str, path: Path, *, named: str, fix: str) -> None:
    """Load a Keras ImageNet weights file (downloaded, or ``params.weights``: a copy of it) into the base, as
    ``keras.applications`` would, then adjust it to runner's input (see the module's notes). ``named`` and ``fix``
    begin and end the error for a file that does not fit."""
    base = base_of(model)
    try:
        base.load_weights(str(path))
    except Exception as error:
        shape = list(base.input_shape[1:])
        raise ModelError(f"{named} does not fit {builtin} with input shape {shape} ({one_line(error)}): {fix}") from error
    if builtin == "resnet50":
        conv = base.get_layer("conv1_conv")
        conv.kernel.assign(np.flip(conv.kernel.numpy(), axis=2))  # (height, width, input channels, filters)
    if builtin == "efficientnet_b0":
        normalization = next(layer for layer in base.layers if isinstance(layer, keras.layers.Normalization))
        stddev = np.asarray(IMAGENET_STDDEV_RGB, dtype="float32")
        normalization.adapt_variance.assign(normalization.adapt_variance.numpy() * stddev)
        normalization.finalize_state()


def weights_file(weights: str) -> Path:
    """``params.weights`` given as a path: the file, which must exist on this machine."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(
            f"model.params.weights {weights!r} is not a file on this machine: give the path of the Keras .h5 "
            "weights file (on Drive: /content/drive/MyDrive/...), or weights: imagenet to download it"
        )
    return path


def head_for(label_mode: str, num_classes: int) -> keras.layers.Layer:
    """One sigmoid unit for binary labels (as the tutorial), else a softmax over the classes.

    In float32 whatever the dtype policy: a float16 softmax or sigmoid loses the small probabilities the loss
    needs (Keras' mixed-precision guide does the same).
    """
    if label_mode == "binary":
        return keras.layers.Dense(1, activation="sigmoid", name="head", dtype="float32")
    return keras.layers.Dense(num_classes, activation="softmax", name="head", dtype="float32")


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
