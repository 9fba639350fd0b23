"""The compiled training loop: several steps per call, and metrics read from Keras' own state, only when needed.

Why not ``train_on_batch``: it is one call, one device-to-host copy of every metric, per step, and what it
returns differs between Keras versions (up to 3.14 its metrics accumulate across calls until reset; from 3.15
each call resets them). Why not ``model.fit``: a resumed run must go on at the next batch of the same epoch with
the epoch's running metrics, and ``fit`` restarts the epoch's data and resets its metrics.

So runner calls the model's own ``train_step`` (the function ``fit`` runs; it never resets metrics) from a loop
of its own: one ``tf.function`` that pulls ``steps`` batches from a ``tf.data`` iterator and runs the step on
each, inside one graph (``tf.while_loop``), with the step itself XLA-compiled when ``jit_compile`` is on. Nothing
comes back to the host during the loop. Epoch metrics are read from the metrics' variables, as ``fit`` reads
them; they are reset where ``fit`` resets them, at the start of each epoch; and their variables (the loss
tracker's total and count, each metric's state) travel in the snapshot, so a resumed epoch ends with the numbers
an uninterrupted one has.

On several devices (:mod:`runner.train.backends.devices`) the same loop runs each step on every replica
(``strategy.run``, as ``fit`` does under a strategy), pulling from the dataset as the strategy distributes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from runner.train.backends.devices import Placement
from runner.train.engine.schedule import LearningRate
from runner.train.engine.steps import AUTO_STEPS_PER_EXECUTION, build_metrics, resolve_steps_per_execution

__all__ = ["AUTO_STEPS_PER_EXECUTION", "EvaluateLoop", "StepLoop", "build_metrics", "resolve_steps_per_execution"]


class StepLoop:
    """Runs ``steps`` training steps per call on one model, with no host sync inside."""

    def __init__(
        self,
        model: keras.Model,
        *,
        jit_compile: bool,
        learning_rate: LearningRate | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.model = model
        self.placement = placement or Placement(devices=())
        self.jit_compile = jit_compile
        self.learning_rate = learning_rate if learning_rate is not None and learning_rate.moves else None
        """Sets the optimizer's rate before every step, in the graph; ``None`` when the rate never changes."""
        self._function: Any = None

    def reset(self) -> None:
        """Trace again on the next call (after running out of memory, a failed trace cannot be reused)."""
        self._function = None

    def batches(self, dataset: tf.data.Dataset) -> Iterator[Any]:
        """An iterator over ``dataset`` for :meth:`run`: on several devices, each batch split between them."""
        return iter(self.placement.distribute(dataset))

    def run(self, iterator: Iterator[Any], steps: int) -> None:
        """Train on the next ``steps`` batches of ``iterator``; returns without reading anything back."""
        if self._function is None:
            self._function = self._make()
        self._function(iterator, tf.constant(steps, dtype=tf.int32))

    def metrics(self) -> dict[str, float]:
        """The epoch's metrics so far, as ``fit`` would log them (one host read)."""
        return {name: float(value) for name, value in self.model.get_metrics_result().items()}

    def _make(self) -> Any:
        model, rate = self.model, self.learning_rate
        one_step = tf.function(model.train_step, reduce_retracing=True, jit_compile=self.jit_compile)
        if (strategy := self.placement.strategy) is not None:
            on_one_device = one_step

            def one_step(batch: Any) -> None:
                strategy.run(on_one_device, args=(batch,))

        optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # a LossScaleOptimizer's

        @tf.function
        def run_steps(iterator: Any, steps: tf.Tensor) -> None:
            for _ in tf.range(steps):
                if rate is not None:
                    optimizer.learning_rate.assign(rate.at(optimizer.iterations))
                one_step(next(iterator))

        return run_steps


class EvaluateLoop:
    """Validation on several devices: the model's ``test_step`` on every replica, batch by batch.

    Keras' own ``evaluate`` under a strategy first builds the model from the first batch averaged over the
    replicas, which fails (``AddN`` of unequal shapes) whenever a batch does not split evenly between them. On one
    device the trainer calls ``evaluate`` itself.
    """

    def __init__(self, model: keras.Model, placement: Placement) -> None:
        self.model, self.placement = model, placement
        self._function: Any = None

    def reset(self) -> None:
        """Trace again on the next call."""
        self._function = None

    def run(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """The model's metrics over ``dataset``, as ``evaluate(..., return_dict=True)`` gives them."""
        strategy = self.placement.strategy
        assert strategy is not None
        if self._function is None:
            test_step = self.model.test_step
            self._function = tf.function(lambda batch: strategy.run(test_step, args=(batch,)), reduce_retracing=True)
        self.model.reset_metrics()
        for batch in self.placement.distribute(dataset):
            self._function(batch)
        results = self.model.get_metrics_result()
        return {name: float(results[name]) for name in sorted(results)}  # in evaluate's order: its logs are sorted
