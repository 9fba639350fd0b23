"""The learning rate of every optimizer step: the spec's schedule, times what a plateau has lowered it to.

It is computed inside the compiled loop, before each step, from the optimizer's own step count (which every
checkpoint holds), so a resumed job goes on along the same curve at the same step, and no value comes back to the
host for it. The plateau's factor is a variable that the trainer sets between calls, from the state that every
checkpoint holds too. Keras' own ``LearningRateSchedule`` objects are not used: the optimizer would then have no
learning-rate variable, and checkpoints written with and without a schedule would not load into each other, so
``runner edit`` could not add one to a job in progress.

A fine-tune (``model.params.fine_tune``) builds a new optimizer, whose own step count starts at 0: the schedule
then counts from the steps taken before it too (``offset``, in every checkpoint's state), and the curve is scaled
by the fine-tune's rate over the spec's (``factor``), so the schedule's shape goes on at the lower rate.

The curves, with ``s`` the optimizer step, ``W`` the warm-up steps, ``T`` the steps of the whole training and
``r`` the spec's learning rate (``t = s - W`` and ``D = T - W`` after the warm-up):

=============  ===========================================================
warm-up        ``r * (s + 1) / W``
constant       ``r``
cosine         ``r * (alpha + (1 - alpha) * (1 + cos(pi * t / D)) / 2)``
exponential    ``r * decay_rate ** (t / decay_steps)``
step           ``r * factor ** floor(t / decay_steps)``
polynomial     ``end + (r - end) * (1 - t / D) ** power``
=============  ===========================================================
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from runner.spec import JobSpec


class LearningRate:
    """The learning rate as a function of the optimizer's step, for one job at one batch size."""

    def __init__(self, spec: JobSpec, *, steps_per_epoch: int, fine_tunes: bool = False) -> None:
        training = spec.training
        self.fine_tunes = fine_tunes
        self.schedule = training.lr_schedule
        self.base = training.learning_rate
        plateau = training.reduce_lr_on_plateau
        self.min_lr = plateau.min_lr if plateau is not None else None
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = training.epochs * steps_per_epoch
        # Whole steps, at least one when there is a warm-up: a fraction of a step would overshoot the rate.
        self.warmup_steps = math.ceil(self.schedule.warmup_epochs * steps_per_epoch)
        self.decay_steps = self.schedule.decay_epochs * steps_per_epoch
        self.scale = keras.Variable(1.0, dtype="float32", trainable=False, name="lr_scale")
        """What a plateau has lowered the rate to, as a factor (1 until it does); set between compiled calls."""
        self.factor = keras.Variable(1.0, dtype="float32", trainable=False, name="lr_factor")
        """The fine-tune's rate over the spec's once it has begun, else 1."""
        self.offset = keras.Variable(0, dtype="int32", trainable=False, name="lr_step_offset")
        """Optimizer steps taken before the optimizer in use was built (by a fine-tune)."""

    @property
    def moves(self) -> bool:
        """Whether the rate changes during training (a schedule, a plateau that may lower it, a fine-tune)."""
        return self.schedule.moves or self.min_lr is not None or self.fine_tunes

    def at(self, step: Any) -> Any:
        """The rate for step ``step`` (0-based; a tensor or a number) of the optimizer in use, as a float32 tensor."""
        step = ops.cast(step, "float32") + ops.cast(ops.convert_to_tensor(self.offset), "float32")
        rate = self._after_warmup(step - self.warmup_steps)
        if self.warmup_steps > 0:
            warming = ops.minimum(self.base * (step + 1.0) / self.warmup_steps, self.base)
            rate = ops.where(step < self.warmup_steps, warming, rate)
        rate = rate * ops.convert_to_tensor(self.scale) * ops.convert_to_tensor(self.factor)
        if self.min_lr is not None:
            # Keras' ReduceLROnPlateau never lowers the rate below min_lr; a schedule alone may go lower.
            rate = ops.where(self.scale < 1.0, ops.maximum(rate, self.min_lr), rate)
        return ops.cast(rate, "float32")

    def _after_warmup(self, elapsed: Any) -> Any:
        schedule, base = self.schedule, self.base
        span = max(self.total_steps - self.warmup_steps, 1.0)
        progress = ops.clip(elapsed / span, 0.0, 1.0)
        if schedule.kind == "cosine":
            return base * (schedule.alpha + (1 - schedule.alpha) * 0.5 * (1 + ops.cos(math.pi * progress)))
        if schedule.kind == "exponential":
            return base * ops.power(schedule.decay_rate, ops.maximum(elapsed, 0.0) / self.decay_steps)
        if schedule.kind == "step":
            return base * ops.power(schedule.factor, ops.floor(ops.maximum(elapsed, 0.0) / self.decay_steps))
        if schedule.kind == "polynomial":
            end = schedule.end_learning_rate
            return end + (base - end) * ops.power(1.0 - progress, schedule.power)
        return base * ops.ones_like(elapsed)
