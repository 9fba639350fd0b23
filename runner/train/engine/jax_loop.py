"""The training loop on Keras' JAX backend: several steps per call, nothing read back inside it.

The same design as the TensorFlow loop (:mod:`runner.train.engine.loop`), in JAX's terms. Keras' JAX
``train_step`` is a pure function of the model's state (trainable, non-trainable, optimizer and metric variables)
and a batch; it is compiled once (``jax.jit``, the state's buffers donated so the model's memory is not held
twice) with the learning rate of the step computed inside from the optimizer's own step count (as the TensorFlow
loop does in its graph). A call runs it on ``steps`` batches in turn from Python, as Keras' own JAX trainer does:
JAX dispatches asynchronously, so nothing waits for the device between steps, and each step's state feeds the
next without a copy. The state is written back into the model's variables once per call, as ``fit`` does at its
end (``jax_state_sync``).

Why not one compiled call for all ``steps``, as on TensorFlow: unrolled, its program grows with the steps and
takes seconds to compile (and a ``lax.scan`` over them needs the batches stacked, and split across devices, in
one array); measured on the digits job (docs/performance.md), per-step dispatch is the faster of the two.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import keras

from runner.train.engine.schedule import LearningRate


class JaxStepLoop:
    """Runs ``steps`` training steps per call on one model, with no host sync inside."""

    def __init__(
        self, model: keras.Model, *, jit_compile: bool, learning_rate: LearningRate | None = None, placement: Any = None
    ) -> None:
        from runner.train.backends.jax import JaxPlacement

        self.model = model
        self.jit_compile = jit_compile
        self.placement = placement or JaxPlacement(devices=())
        self.learning_rate = learning_rate if learning_rate is not None and learning_rate.moves else None
        self._function: Any = None

    def reset(self) -> None:
        """Compile again on the next call (after a new optimizer, or running out of memory)."""
        self._function = None

    def batches(self, dataset: Any) -> Iterator[Any]:
        """An iterator over ``dataset``'s batches, each placed on the devices (split between them, on several)."""
        return (self.placement.put(batch) for batch in dataset)

    def run(self, iterator: Iterator[Any], steps: int) -> None:
        """Train on the next ``steps`` batches of ``iterator``; returns without reading anything back."""
        if self._function is None:
            self._function = self._make()
        model = self.model
        state = (
            [variable.value for variable in model.trainable_variables],
            [variable.value for variable in model.non_trainable_variables],
            [variable.value for variable in model.optimizer.variables],
            [variable.value for variable in model.metrics_variables],
        )
        rates = self._rate_values()
        for _ in range(steps):  # the next batch is prepared while the device runs the step before
            state = self._function(state, next(iterator), rates)
        trainable, non_trainable, optimizer, metrics = state
        for variables, values in (
            (model.trainable_variables, trainable),
            (model.non_trainable_variables, non_trainable),
            (model.optimizer.variables, optimizer),
            (model.metrics_variables, metrics),
        ):
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)

    def metrics(self) -> dict[str, float]:
        """The epoch's metrics so far, as ``fit`` would log them (one host read)."""
        return {name: float(value) for name, value in self.model.get_metrics_result().items()}

    def _rate_variables(self) -> list[keras.Variable]:
        rate = self.learning_rate
        return [] if rate is None else [rate.scale, rate.factor, rate.offset]

    def _rate_values(self) -> list[Any]:
        """The schedule's own variables (a plateau's scale, a fine-tune's factor and offset), passed into the call
        so that setting them between calls needs no new compile."""
        return [variable.value for variable in self._rate_variables()]

    def _make(self) -> Any:
        model, rate = self.model, self.learning_rate
        rate_at = step_at = 0
        if rate is not None:  # the spec's rate (a factory's own optimizer may have a schedule, and no such variable)
            optimizer = model.optimizer
            inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's
            variables = list(optimizer.variables)
            rate_at = next(index for index, variable in enumerate(variables) if variable is inner._learning_rate)
            step_at = next(index for index, variable in enumerate(variables) if variable is inner.iterations)
        rate_variables = self._rate_variables()

        def one_step(state: Any, batch: Any, rate_values: list[Any]) -> Any:
            if rate is not None:
                trainable, non_trainable, optimizer_values, metrics = state
                with keras.StatelessScope(state_mapping=list(zip(rate_variables, rate_values, strict=True))):
                    value = rate.at(optimizer_values[step_at])
                optimizer_values = list(optimizer_values)
                optimizer_values[rate_at] = value.astype(optimizer_values[rate_at].dtype)
                state = (trainable, non_trainable, optimizer_values, metrics)
            _, state = model.train_step(state, batch)
            return state

        return jax.jit(one_step, donate_argnums=0) if self.jit_compile else one_step


class JaxEvaluateLoop:
    """Validation on JAX: the model's ``test_step`` over every batch, in one compiled function per batch shape.

    Keras' own ``evaluate`` under a ``DataParallel`` distribution shards every batch evenly between the devices,
    and fails on one that does not split (an epoch's last, smaller batch); this loop places batches as the
    training loop does (:meth:`JaxPlacement.put`).
    """

    def __init__(self, model: keras.Model, placement: Any) -> None:
        self.model, self.placement = model, placement
        self._function: Any = None

    def reset(self) -> None:
        """Compile again on the next call."""
        self._function = None

    def run(self, dataset: Any) -> dict[str, float]:
        """The model's metrics over ``dataset`` (a sequence of batches), as ``evaluate(..., return_dict=True)``."""
        model = self.model
        if self._function is None:
            self._function = jax.jit(model.test_step) if model.jit_compile is not False else model.test_step
        model.reset_metrics()
        trainable = [variable.value for variable in model.trainable_variables]
        non_trainable = [variable.value for variable in model.non_trainable_variables]
        metrics = [variable.value for variable in model.metrics_variables]
        for number in range(len(dataset)):
            _, (_, _, metrics) = self._function((trainable, non_trainable, metrics), self.placement.put(dataset[number]))
        for variable, value in zip(model.metrics_variables, metrics, strict=True):
            variable.assign(value)
        results = model.get_metrics_result()
        return {name: float(results[name]) for name in sorted(results)}  # in evaluate's order: its logs are sorted
