"""The built-in networks' facts and their ``model.params``, without TensorFlow: what `runner submit` checks.

Each network's ``params`` (names, defaults, allowed values) and, for the pretrained ones, what Keras publishes
about their ImageNet weights (file, origin, hash) and how many layers the base has (the most ``fine_tune.layers``
can unfreeze). The TensorFlow side, :mod:`runner.train.models.builtin`, builds from the same tables; a test
builds every base and checks these numbers against Keras's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PRETRAINED = ("mobilenet_v2", "efficientnet_b0", "resnet50")
"""The networks built on a ``keras.applications`` base, which may start from ImageNet weights and fine-tune."""

SIMPLE_CNN_PARAMS: dict[str, Any] = {"filters": 32, "dense": 512, "dropout": 0.0, "augment": False}
"""``model.params`` of ``simple_cnn`` and their defaults (the tutorial's network)."""

MOBILENET_V2_PARAMS: dict[str, Any] = {
    "weights": None,
    "alpha": 1.0,
    "dropout": 0.2,
    "trainable_base": False,
    "fine_tune": None,
}
"""``model.params`` of ``mobilenet_v2`` and their defaults."""

BASE_PARAMS: dict[str, Any] = {"weights": None, "dropout": 0.2, "trainable_base": False, "fine_tune": None}
"""``model.params`` of ``efficientnet_b0`` and ``resnet50`` and their defaults."""

BUILTIN_PARAMS: dict[str, dict[str, Any]] = {
    "simple_cnn": SIMPLE_CNN_PARAMS,
    "mobilenet_v2": MOBILENET_V2_PARAMS,
    "efficientnet_b0": BASE_PARAMS,
    "resnet50": BASE_PARAMS,
}
"""Each built-in network's ``model.params`` and their defaults."""

FINE_TUNE_FIELDS: dict[str, Any] = {"at_epoch": None, "layers": "all", "learning_rate": None}
"""``model.params.fine_tune`` and its defaults (``at_epoch`` must be given; the rate defaults to a tenth of
``training.learning_rate``, as in Keras' transfer-learning guide)."""

BASE_LAYERS: dict[str, int] = {"mobilenet_v2": 153, "efficientnet_b0": 236, "resnet50": 174}
"""Layers of each base without its top, its input layer not counted: the most ``fine_tune.layers`` can be."""

MIN_SIDE = 32
"""The smallest image side keras.applications' bases accept."""

MOBILENET_V2_IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
"""The widths Keras publishes ImageNet weights of MobileNetV2 for."""

MOBILENET_V2_IMAGENET_SIDES = (96, 128, 160, 192, 224)
"""The square image sizes Keras publishes MobileNetV2 weights for; other sizes get the 224 ones, as in Keras."""

_KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications"


@dataclass(frozen=True)
class ImagenetWeights:
    """One weights file Keras publishes for a base without its top."""

    file: str
    """Its name, which the cache and a mirror (``$RUNNER_WEIGHTS_URL``) use too."""
    origin: str
    """Where Keras downloads it from."""
    md5: str | None
    """The hash Keras publishes for it (an md5; Keras publishes none for MobileNetV2)."""


def imagenet_weights(builtin: str, *, alpha: float = 1.0, image_size: tuple[int, int] = (224, 224)) -> ImagenetWeights:
    """The file ``weights: imagenet`` loads, the one ``keras.applications`` would download for these settings."""
    if builtin == "mobilenet_v2":
        rows, cols = image_size
        side = rows if rows == cols and rows in MOBILENET_V2_IMAGENET_SIDES else 224
        file = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{side}_no_top.h5"
        return ImagenetWeights(file, f"{_KERAS_APPLICATIONS}/mobilenet_v2/{file}", None)
    if builtin == "efficientnet_b0":
        file = "efficientnetb0_notop.h5"
        return ImagenetWeights(file, f"https://storage.googleapis.com/keras-applications/{file}", _MD5[file])
    if builtin == "resnet50":
        file = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
        return ImagenetWeights(file, f"{_KERAS_APPLICATIONS}/resnet/{file}", _MD5[file])
    raise ValueError(f"{builtin} has no ImageNet weights")


_MD5 = {
    "efficientnetb0_notop.h5": "50bc09e76180e00e4465e1a485ddc09d",
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5": "4d473c1dd8becc155b73f8504c6f6626",
}
"""As keras.applications publishes them (``WEIGHTS_HASHES`` of efficientnet.py and resnet.py)."""


def with_defaults(builtin: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` over the network's defaults (call :func:`params_problem` first)."""
    return {**BUILTIN_PARAMS[builtin], **params}


def fine_tune_of(params: dict[str, Any]) -> dict[str, Any] | None:
    """``params.fine_tune`` over its defaults, or ``None`` without one."""
    given = params.get("fine_tune")
    return None if given is None else {**FINE_TUNE_FIELDS, **given}


def params_problem(
    builtin: str,
    params: dict[str, Any],
    *,
    image_size: tuple[int, int],
    color_mode: str,
    epochs: int,
    learning_rate: float,
) -> str | None:
    """Why ``params`` cannot build ``builtin`` for these images and this training, as one line naming the field;
    ``None`` when they can."""
    defaults = BUILTIN_PARAMS[builtin]
    if unknown := sorted(set(params) - set(defaults), key=str):
        return f"model.params: {', '.join(map(repr, unknown))} not known to {builtin}; allowed: {', '.join(defaults)}"
    p = {**defaults, **params}
    checks: list[tuple[str, bool, str]] = [("dropout", _is_rate(p["dropout"]), _RATE)]
    if builtin == "simple_cnn":
        checks += [
            ("filters", _is_positive_int(p["filters"]), "a positive integer"),
            ("dense", _is_positive_int(p["dense"]), "a positive integer"),
            ("augment", isinstance(p["augment"], bool), "true or false"),
        ]
    else:
        checks += [("trainable_base", isinstance(p["trainable_base"], bool), "true or false")]
        weights = p["weights"]
        is_file = isinstance(weights, str) and weights != "imagenet" and weights.endswith(".h5")
        checks += [("weights", weights in (None, "imagenet") or is_file, _WEIGHTS)]
    if builtin == "mobilenet_v2":
        checks += [("alpha", _is_number(p["alpha"]) and p["alpha"] > 0, "a positive number such as 0.35 or 1.0")]
    for name, valid, expected in checks:
        if not valid:
            return f"model.params.{name} must be {expected}, got {p[name]!r}"
    if builtin == "simple_cnn":
        return None
    if builtin == "resnet50" and color_mode != "rgb":
        return (
            f"resnet50 takes color images (its input subtracts the ImageNet mean of each of 3 channels), and "
            f"dataset.color_mode is {color_mode!r}: set color_mode: rgb, or use efficientnet_b0 or mobilenet_v2"
        )
    if min(image_size) < MIN_SIDE:
        return (
            f"{builtin} needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, got {image_size[0]}x{image_size[1]}: "
            "raise dataset.image_size, or use builtin: simple_cnn"
        )
    return _imagenet_problem(builtin, p, color_mode) or _fine_tune_problem(builtin, p, epochs, learning_rate)


def _imagenet_problem(builtin: str, p: dict[str, Any], color_mode: str) -> str | None:
    if p["weights"] is None:
        return None
    if color_mode != "rgb":
        return (
            f"model.params.weights {p['weights']!r} needs color images: ImageNet weights take 3 channels, and "
            f"dataset.color_mode is {color_mode!r}; set color_mode: rgb, or weights: null"
        )
    if builtin == "mobilenet_v2" and p["weights"] == "imagenet" and p["alpha"] not in MOBILENET_V2_IMAGENET_ALPHAS:
        allowed = ", ".join(f"{alpha:g}" for alpha in MOBILENET_V2_IMAGENET_ALPHAS)
        return (
            f"model.params.alpha {p['alpha']!r} has no ImageNet weights: Keras publishes them for alpha {allowed}; "
            "pick one of those, or weights: null"
        )
    return None


def _fine_tune_problem(builtin: str, p: dict[str, Any], epochs: int, learning_rate: float) -> str | None:
    given = p["fine_tune"]
    if given is None:
        return None
    where = "model.params.fine_tune"
    if not isinstance(given, dict):
        return f"{where} must be a mapping such as {{at_epoch: 5, layers: 30}}, got {given!r}"
    if unknown := sorted(set(given) - set(FINE_TUNE_FIELDS), key=str):
        return f"{where}: {', '.join(map(repr, unknown))} not known; allowed: {', '.join(FINE_TUNE_FIELDS)}"
    tune = {**FINE_TUNE_FIELDS, **given}
    at, layers, rate = tune["at_epoch"], tune["layers"], tune["learning_rate"]
    if p["trainable_base"]:
        return f"{where} unfreezes layers of a base that model.params.trainable_base already trains whole: drop one"
    if not _is_positive_int(at):
        return f"{where}.at_epoch must be a positive integer (the epochs trained before the base is unfrozen), got {at!r}"
    if at >= epochs:
        return (
            f"{where}.at_epoch ({at}) must be less than training.epochs ({epochs}): fine-tuning would never start"
        )
    most = BASE_LAYERS[builtin]
    if layers != "all" and not _is_positive_int(layers):
        return f"{where}.layers must be a positive integer or all, got {layers!r}"
    if layers != "all" and layers > most:
        return f"{where}.layers ({layers}) is more than {builtin}'s {most} layers: give at most {most}, or all"
    if rate is not None and not (_is_number(rate) and 0 < rate <= 10):
        return f"{where}.learning_rate must be a number above 0 (at most 10), got {rate!r}"
    if rate is not None and rate > learning_rate:
        return (
            f"{where}.learning_rate ({rate:g}) is above training.learning_rate ({learning_rate:g}): fine-tuning "
            "takes a lower rate, or the pretrained layers are undone in a few steps; leave it out for a tenth"
        )
    return None


_RATE = "a number from 0 up to (not including) 1"
_WEIGHTS = "imagenet, null, or the path of a Keras .h5 weights file"


def _is_number(value: Any) -> bool:
    # bool is an int in Python, but `dropout: true` is a mistake, not a rate of 1.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_rate(value: Any) -> bool:
    return _is_number(value) and 0 <= value < 1
