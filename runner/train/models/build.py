"""The job's network: a built-in one or the user's factory, checked against the labels and compiled from the spec."""

from __future__ import annotations

from collections.abc import Callable

import keras

from runner.errors import ModelError
from runner.spec import JobSpec, loss_label_problem
from runner.train.models.builtin import InputShape, head_for, mobilenet_v2, simple_cnn
from runner.train.models.factory import from_factory

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


def build_model(spec: JobSpec, *, input_shape: InputShape, num_classes: int) -> keras.Model:
    """The job's network for images of ``input_shape`` (height, width, channels) and ``num_classes`` classes.

    Seeds Python's, NumPy's and the backend's generators from ``training.seed`` first: layers built without a
    seed (the initializers, a factory's layers) draw theirs from Python's ``random``.
    """
    _check_classes(spec, num_classes)
    seed = spec.training.seed
    keras.utils.set_random_seed(seed)
    if spec.model.factory is not None:
        return from_factory(spec.model.factory, spec.model.params, input_shape=input_shape, num_classes=num_classes)
    head = head_for(spec.dataset.label_mode, num_classes)
    if spec.model.builtin == "mobilenet_v2":
        return mobilenet_v2(spec.model.params, input_shape=input_shape, head=head, seed=seed)
    return simple_cnn(spec.model.params, input_shape=input_shape, head=head, seed=seed)


def compile_model(
    model: keras.Model, spec: JobSpec, *, jit_compile: bool = False, steps_per_execution: int = 1
) -> None:
    """Compile with ``training``'s optimizer, learning rate, loss and metrics (under the mixed_float16 policy
    Keras wraps the optimizer in a ``LossScaleOptimizer``)."""
    training = spec.training
    for metric in training.metrics:
        _check_metric(metric)
    optimizer = OPTIMIZERS[training.optimizer](learning_rate=training.learning_rate)
    model.compile(
        optimizer=optimizer,
        loss=training.loss,
        metrics=list(training.metrics),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
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
