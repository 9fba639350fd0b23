"""The job's network: a built-in one or the user's factory, checked against the labels and compiled from the spec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from rich.console import Console

from runner.errors import ModelError
from runner.networks import PRETRAINED, imagenet_weights, with_defaults
from runner.paths import default_cache_dir
from runner.spec import JobSpec, loss_label_problem
from runner.train.models.builtin import (
    InputShape,
    head_for,
    load_base_weights,
    pretrained_network,
    simple_cnn,
    weights_file,
)
from runner.train.models.factory import from_factory
from runner.train.models.imagenet import fetch_imagenet_weights

OPTIMIZERS: dict[str, Callable[..., keras.optimizers.Optimizer]] = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
    "adagrad": keras.optimizers.Adagrad,
    "nadam": keras.optimizers.Nadam,
}
"""``training.optimizer`` names and the Keras classes they stand for."""

# compile() resolves these by the loss and the output shape (binary, categorical or sparse accuracy);
# keras.metrics.get does not know the short forms.
_METRICS_COMPILE_RESOLVES = frozenset({"accuracy", "acc", "crossentropy", "ce"})


def check_loss_matches_labels(spec: JobSpec) -> None:
    """Refuse a loss that cannot train on the dataset's labels, before any data is read (the spec refuses it at
    submit; a job folder submitted by an older runner may still hold one)."""
    if (problem := loss_label_problem(spec.training.loss, spec.dataset.label_mode)) is not None:
        raise ModelError(problem)


def build_model(
    spec: JobSpec,
    *,
    input_shape: InputShape,
    num_classes: int,
    pretrained: bool = True,
    cache_dir: Path | None = None,
    console: Console | None = None,
) -> keras.Model:
    """The job's network for images of ``input_shape`` (height, width, channels) and ``num_classes`` classes.

    Seeds Python's, NumPy's and the backend's generators from ``training.seed`` first: layers built without a
    seed (the initializers, a factory's layers) draw theirs from Python's ``random``. With ``pretrained``, a
    base's ``params.weights`` are loaded too (:func:`load_pretrained_weights`); the trainer loads them only when
    training starts from the beginning, since a checkpoint replaces them.
    """
    _check_classes(spec, num_classes)
    seed = spec.training.seed
    keras.utils.set_random_seed(seed)
    if spec.model.factory is not None:
        return from_factory(spec.model.factory, spec.model.params, input_shape=input_shape, num_classes=num_classes)
    head = head_for(spec.dataset.label_mode, num_classes)
    if spec.model.builtin in PRETRAINED:
        model = pretrained_network(
            spec.model.builtin, spec.model.params, input_shape=input_shape, head=head, seed=seed
        )
        if pretrained:
            load_pretrained_weights(model, spec, cache_dir=cache_dir or default_cache_dir(), console=console)
        return model
    return simple_cnn(spec.model.params, input_shape=input_shape, head=head, seed=seed)


def load_pretrained_weights(
    model: keras.Model, spec: JobSpec, *, cache_dir: Path, console: Console | None = None
) -> Path | None:
    """Load ``params.weights`` into a pretrained network's base: ``imagenet`` (fetched into the cache once) or a
    file's path; the file loaded, ``None`` when the base starts from random weights."""
    builtin = spec.model.builtin
    if builtin not in PRETRAINED:
        return None
    params = with_defaults(builtin, spec.model.params)
    weights = params["weights"]
    if weights is None:
        return None
    if weights == "imagenet":
        published = imagenet_weights(builtin, alpha=params.get("alpha", 1.0), image_size=spec.dataset.image_size)
        path = fetch_imagenet_weights(published, cache_dir=cache_dir, console=console)
        named, fix = f"the ImageNet weights {path}", "delete that file and run again"
    else:
        path = weights_file(weights)
        named = f"model.params.weights {weights!r}"
        fix = "give the weights file saved for these settings (for mobilenet_v2, the same alpha)"
    load_base_weights(model, builtin, path, named=named, fix=fix)
    return path


@dataclass(frozen=True)
class Compiled:
    """How the model was compiled: by the spec, or by the factory that returned it compiled."""

    by: str
    """``"spec"`` or ``"factory"``."""
    optimizer: str
    learning_rate: float | None
    loss: str

    def describe(self) -> str:
        """For the console and runner.log."""
        rate = f", learning rate {self.learning_rate:g}" if self.learning_rate is not None else ""
        if self.by == "factory":
            return (
                f"model: compiled by its factory ({self.optimizer}{rate}, loss {self.loss}); the spec's "
                "training.optimizer, learning_rate, lr_schedule, reduce_lr_on_plateau, loss and metrics are not used"
            )
        return f"model: compiled from the spec ({self.optimizer}{rate}, loss {self.loss})"


def compile_model(
    model: keras.Model,
    spec: JobSpec,
    *,
    jit_compile: bool = False,
    steps_per_execution: int = 1,
    learning_rate: float | None = None,
) -> Compiled:
    """Compile with ``training``'s optimizer, learning rate, loss and metrics, or, for a factory that returned
    its model compiled, with the factory's own (under the mixed_float16 policy Keras wraps the optimizer in a
    ``LossScaleOptimizer``). Either way runner's steps per call and XLA apply. ``learning_rate`` replaces the
    spec's (a fine-tune's new optimizer starts at its own)."""
    own = _factory_compile_arguments(model) if spec.model.factory is not None else None
    if own is not None:
        model.compile(**own, jit_compile=jit_compile, steps_per_execution=steps_per_execution)
        return Compiled(
            "factory", _optimizer_name(model.optimizer), current_learning_rate(model.optimizer), _loss_name(own)
        )
    training = spec.training
    for metric in training.metrics:
        _check_metric(metric)
    rate = training.learning_rate if learning_rate is None else learning_rate
    optimizer = OPTIMIZERS[training.optimizer](learning_rate=rate)
    model.compile(
        optimizer=optimizer,
        loss=training.loss,
        metrics=list(training.metrics),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return Compiled("spec", training.optimizer, rate, training.loss)


def _factory_compile_arguments(model: keras.Model) -> dict[str, Any] | None:
    """What the factory passed to ``compile`` (``None`` if it did not compile): every Keras 3 keeps the arguments
    as given in ``_compile_config``; the optimizer and loss themselves where it does not."""
    if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
        return None
    given = getattr(getattr(model, "_compile_config", None), "config", None)
    if not isinstance(given, dict):
        return {"optimizer": model.optimizer, "loss": model.loss}
    wanted = ("optimizer", "loss", "loss_weights", "metrics", "weighted_metrics")
    return {key: given[key] for key in wanted if given.get(key) is not None}


def _optimizer_name(optimizer: Any) -> str:
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's
    return type(inner).__name__


def current_learning_rate(optimizer: Any) -> float | None:
    """The optimizer's learning rate now (``None`` where it cannot be read as one number)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    try:
        return float(keras.ops.convert_to_numpy(inner.learning_rate))
    except (TypeError, ValueError, AttributeError):  # a schedule
        return None


def model_weights(model: keras.Model) -> list[np.ndarray]:
    """Host copies of every variable of the model (weights, batch-norm statistics, seed states), in the order
    :func:`use_model_weights` takes them: how the best epoch's weights are kept."""
    return [np.array(variable.numpy()) for variable in model.variables]


def use_model_weights(model: keras.Model, values: list[np.ndarray]) -> None:
    """Give the model the variables :func:`model_weights` copied."""
    for variable, value in zip(model.variables, values, strict=True):
        variable.assign(value)
    finalize_layers(model)


def finalize_layers(model: keras.Model) -> None:
    """Let layers that compute from their variables once (a Normalization's mean and variance, as EfficientNet's
    base holds) compute again after variables were assigned, as ``load_weights`` does: otherwise they go on with
    the values they were built with."""
    for layer in model._flatten_layers(include_self=False):  # noqa: SLF001 (nested models' layers too)
        if hasattr(layer, "finalize_state") and layer.built:
            layer.finalize_state()


def use_learning_rate(model: keras.Model, rate: float) -> float | None:
    """Give the model's optimizer ``rate`` (restoring a checkpoint brought back the rate it was saved with, and
    `runner edit` may have changed it since); the rate it had, or ``None`` when it had this one already or follows
    a schedule."""
    before = current_learning_rate(model.optimizer)
    if before is None or np.float32(before) == np.float32(rate):
        return None
    getattr(model.optimizer, "inner_optimizer", model.optimizer).learning_rate = rate
    return before


def _loss_name(arguments: dict[str, Any]) -> str:
    loss = arguments.get("loss")
    if isinstance(loss, str):
        return loss
    return getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__


RESCALING_LAYERS = ("Rescaling", "Normalization", "Lambda")
"""Layers that (may) bring raw pixels to a small range; a Lambda is given the benefit of the doubt."""


def unscaled_input_warning(model: keras.Model, spec: JobSpec, first_batch_max: float) -> str | None:
    """One line when a factory's model has no layer that rescales and the images it gets reach far above 1: the
    pipeline feeds raw 0-255 pixels, on which most networks train badly (a loss in the hundreds)."""
    if spec.model.factory is None or first_batch_max <= 1.5:
        return None
    layers = model._flatten_layers(include_self=False)  # noqa: SLF001 (nested models' layers too)
    if any(type(layer).__name__ in RESCALING_LAYERS for layer in layers):
        return None
    return (
        f"model: the factory {spec.model.factory!r} has no Rescaling or Normalization layer, and the images it gets "
        f"are raw pixels up to {first_batch_max:.0f} (runner does not rescale them): add "
        "keras.layers.Rescaling(1 / 255) as its first layer, unless it expects 0-255"
    )


def _check_classes(spec: JobSpec, num_classes: int) -> None:
    if num_classes < 2:
        raise ModelError(
            f"the dataset has {num_classes} class(es): dataset.train needs one subfolder per class, at least 2"
        )
    if spec.dataset.label_mode == "binary" and num_classes != 2:
        raise ModelError(
            f"dataset.label_mode 'binary' needs exactly 2 classes, the dataset has {num_classes}: "
            f"use label_mode: categorical with loss categorical_crossentropy"
        )


def _check_metric(name: str) -> None:
    """Refuse an unknown metric now: compile() takes any string and fails only at the first batch."""
    if name in _METRICS_COMPILE_RESOLVES:
        return
    try:
        keras.metrics.get(name)
    except ValueError:
        raise ModelError(
            f"training.metrics: unknown metric {name!r}: use Keras metric names such as accuracy, auc, precision"
        ) from None
