"""``runner.keras.Checkpointing``: runner's lease, checkpoints and restore inside the user's own ``model.fit``.

At the start of ``fit`` the callback takes the job (made on first use), restores its newest verified checkpoint
(model, optimizer, metric state, the random generators' state of Dropout and augmentation layers, the callbacks'
state) and makes ``fit`` start at the checkpoint's epoch, as Keras' ``BackupAndRestore`` does. A checkpoint is
taken once every callback has seen an epoch's end (at the next epoch's start, or the end of training): an early
stop's counters and a plateau's lowered rate are then in it. The publisher thread writes it into the job folder
while training goes on.

Part way through an epoch a checkpoint is taken only with runner's own dataset (``runner.data.image_folder``),
whose order is a function of (seed, epoch): it is the only data whose position runner knows and can give back.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
from rich.console import Console

from runner import defaults
from runner.errors import UsageError
from runner.train.data.own_code import ImageFolder, dataset_of
from runner.train.engine.loop import build_metrics
from runner.train.own_code import callbacks as callback_state
from runner.train.own_code.session import OwnCodeSession, Restored
from runner.train.snapshots.snapshot import TrainingState

_WARNED: set[str] = set()
"""The user's callbacks whose unseen state was warned about in this process (once each)."""


class Checkpointing(keras.callbacks.Callback):
    """Make a ``model.fit`` resumable: ``model.fit(..., callbacks=[runner.keras.Checkpointing(job="name")])``.

    ``job`` names the job folder (``<queue>/jobs/<job>/``; the queue is ``$RUNNER_QUEUE``, Drive on Colab, else
    ``./runner-queue``). A checkpoint is taken every ``every_epochs`` epochs and, with ``runner.data.image_folder``'s
    dataset, every ``every_minutes`` minutes part way through an epoch too; the newest ``keep`` are kept.
    """

    def __init__(
        self,
        job: str,
        queue: str | None = None,
        every_epochs: int = 1,
        every_minutes: float | None = None,
        keep: int = defaults.CHECKPOINT_KEEP,
        *,
        data: ImageFolder | None = None,
        console: Console | None = None,
        _kind: str = "Checkpointing",
        _replay: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(every_epochs, int) or every_epochs < 1:
            raise UsageError(f"every_epochs={every_epochs!r}: give a whole number of epochs, 1 or more")
        if every_minutes is not None and not (isinstance(every_minutes, (int, float)) and every_minutes > 0):
            raise UsageError(f"every_minutes={every_minutes!r}: give a number of minutes above 0, or None")
        self.job, self.queue, self.keep = job, queue, keep
        self.every_epochs, self.every_minutes = every_epochs, every_minutes
        self.data, self.console, self.kind = data, console, _kind
        self._replay = _replay
        """Puts the user's own data where an uninterrupted run had it after the epochs given (runner.fit's)."""
        self.replayed = 0
        """Iterators started over the user's data before a resumed fit (see :func:`_replay_keras_iterators`)."""
        self.session: OwnCodeSession | None = None
        self.state = TrainingState()
        self.done_already = False
        """Whether the job was done before this ``fit``: the model was given its final weights, nothing trained."""
        self._restored: Restored | None = None
        self._siblings: list[keras.callbacks.Callback] = []
        self._first_epoch = True
        self._due = False
        self._stopping: str | None = None
        self._epoch_first_step = 0
        self._epoch_iterator: Any = None
        self._last_snapshot_at = time.monotonic()

    # --- the start ----------------------------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        found = _fit_arguments(self.model)
        self._siblings = [callback for callback in found.get("callbacks", ()) if callback is not self]
        if self.data is None:
            self.data = dataset_of(found.get("x"))
        for name in callback_state.check_callbacks(self._siblings):
            if name not in _WARNED:
                _WARNED.add(name)
                self._say(
                    f"warning: callback {name} keeps its state where runner cannot see it: after a resume it starts "
                    "as new (give it get_state() and set_state(state) methods, with JSON values, and runner keeps it)"
                )
        epochs = int(self.params.get("epochs") or 1)
        _build(self.model, found.get("x"), found.get("y"))
        self.session = OwnCodeSession(self.job, kind=self.kind, queue=self.queue, keep=self.keep, console=self.console)
        restored = self.session.open(self.model, epochs=epochs)
        if restored is None:
            self.done_already = True
            self.model._initial_epoch = epochs
            return
        self._restored, self.state = restored, restored.state
        if self.state.step and self.data is None:
            self.session.close()
            raise UsageError(
                f"job {self.job!r} was checkpointed part way through epoch {self.state.epoch + 1}, with "
                "runner.data.image_folder's dataset: give fit that dataset again to resume it there"
            )
        if self.data is not None:
            self.state.steps_per_epoch = self.data.steps_per_epoch
            self._epoch_iterator = found.get("epoch_iterator")
        elif self.state.epoch:
            self._replay_data(found)
        self.model._initial_epoch = self.state.epoch

    def _replay_data(self, found: dict[str, Any]) -> None:
        """Give the user's seeded ``tf.data`` shuffle the state it had at the resumed epoch."""
        epochs_done = self.state.epoch
        if self._replay is not None:
            self._replay(epochs_done)
            self.replayed = epochs_done
            return
        x = found.get("x")
        if isinstance(x, tf.data.Dataset) and found.get("steps_per_epoch") is None and int(x.cardinality()) > 0:
            self.replayed = _replay_keras_iterators(x, epochs_done)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.session is None or self.done_already:
            return
        if self._first_epoch:
            self._first_epoch = False
            self._give_back(epoch)
        elif self._due:
            self._snapshot()
        self._epoch_first_step = self.state.step if epoch == self.state.epoch else 0
        if self.data is not None:
            start = self.state.seen if epoch == self.state.epoch else 0
            self.data.position.set(epoch, start)
            self._tell_keras_the_epoch_length(math.ceil((self.data.num_train - start) / self.data.batch_size))

    def _tell_keras_the_epoch_length(self, steps: int) -> None:
        """How many batches this epoch of runner's dataset has: its length is unknown to tf.data (the order is made
        when an epoch starts), and a resumed epoch is shorter than the others. Keras would otherwise learn the
        length from the first epoch, or run a step past the data, which still counts an optimizer step."""
        iterator = self._epoch_iterator
        if iterator is not None and hasattr(iterator, "_num_batches"):
            iterator._num_batches = steps

    def _give_back(self, epoch: int) -> None:
        """What a resume restores once every callback has begun (their on_train_begin resets it): their state, the
        epoch's running metrics, the CSV logs' rows."""
        restored, state = self._restored, self.state
        if restored is None or restored.checkpoint is None:
            return
        if state.callbacks:
            callback_state.restore(self._siblings, state.callbacks, state.callback_arrays or {})
        callback_state.cut_csv_logs(self._siblings, state.history)
        if state.step and restored.metric_values is not None and epoch == state.epoch:
            variables = [variable for metric in self.model.metrics for variable in metric.variables]
            for variable, value in zip(variables, restored.metric_values, strict=True):
                variable.assign(value)

    # --- during an epoch ----------------------------------------------------------------------------------

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        session, state = self.session, self.state
        if session is None or self.done_already or self._stopping:
            return
        steps = self._epoch_first_step + batch + 1 - state.step
        samples = 0
        if self.data is not None:
            samples = min(steps * self.data.batch_size, self.data.num_train - state.seen)
        state.advance(steps, samples=samples)
        session.check()
        if session.should_stop():
            self._stopping = "cancelled" if session.claim and session.claim.job.cancel_requested() else "stopped"
            self.model.stop_training = True
            if self.data is not None and state.seen < self.data.num_train:
                self._snapshot()  # exact part way: runner knows where in the epoch its own dataset is
            return
        minutes = self.every_minutes
        part_way = self.data is not None and state.seen < self.data.num_train
        if minutes and part_way and time.monotonic() - self._last_snapshot_at >= minutes * 60:
            self._snapshot()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.session is None or self.done_already or self._stopping:
            return  # a stopped epoch's logs are of part of it: the epoch is not over
        if self.data is not None and self.state.seen < self.data.num_train:
            raise UsageError(
                f"epoch {epoch + 1} ended after {self.state.seen} of {self.data.num_train} training images of "
                "runner.data.image_folder's dataset: leave out steps_per_epoch, runner's dataset ends each epoch itself"
            )
        metrics = {name: float(value) for name, value in (logs or {}).items() if _is_number(value)}
        self.state.end_epoch(metrics, None)
        minutes = self.every_minutes
        timely = bool(minutes) and time.monotonic() - self._last_snapshot_at >= (minutes or 0) * 60
        self._due = self.state.epoch % self.every_epochs == 0 or timely

    # --- the end ------------------------------------------------------------------------------------------

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.model._initial_epoch = None
        session = self.session
        if session is None or self.done_already:
            return
        self.session = None
        try:
            if self._stopping:
                session.stop_here(reason=self._stopping)
                return
            self._snapshot(session)  # the last epoch's, always
            session.finish(self.state, stopped_early=self._early_stop_reason())
        except BaseException as error:
            session.close(error=error)
            raise

    def abandon(self, error: BaseException) -> None:
        """``fit`` raised: let go of the job, keeping it resumable from its newest checkpoint."""
        session, self.session = self.session, None
        if self.model is not None:
            self.model._initial_epoch = None
        if session is not None:
            session.close(error=error)

    def _early_stop_reason(self) -> str | None:
        if self.state.epoch >= int(self.params.get("epochs") or 0):
            return None
        for callback in self._siblings:
            if isinstance(callback, keras.callbacks.EarlyStopping) and getattr(callback, "stopped_epoch", 0):
                return (
                    f"stopped early after epoch {self.state.epoch}: keras.callbacks.EarlyStopping ({callback.monitor})"
                )
        return f"stopped after epoch {self.state.epoch} of {self.params.get('epochs')}: a callback stopped training"

    def _snapshot(self, session: OwnCodeSession | None = None) -> None:
        session = session or self.session
        assert session is not None
        self.state.callbacks, self.state.callback_arrays = callback_state.capture(self._siblings)
        session.snapshot(self.model, self.state)
        self._due = False
        self._last_snapshot_at = time.monotonic()

    def _say(self, line: str) -> None:
        console = self.console or Console(stderr=True)
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


KERAS_ITERATORS_PER_EPOCH = 2
"""Iterators Keras' ``fit`` starts over a dataset of known length per epoch (3.10 to 3.15: the epoch's own, and at
the epoch's end the next one's, which the next epoch does not use). Each start draws a new seed from a seeded
``Dataset.shuffle``'s generator, whether or not it is read; tests/test_own_code.py checks that a resume at an epoch
boundary ends bit-identical, on every Keras CI runs."""


def _replay_keras_iterators(dataset: tf.data.Dataset, epochs_done: int) -> int:
    """Start (and drop) the iterators an uninterrupted ``fit`` had started over ``dataset`` before the epoch
    ``epochs_done``; how many."""
    count = epochs_done * KERAS_ITERATORS_PER_EPOCH
    for _ in range(count):
        iter(dataset)
    return count


def _build(model: keras.Model, x: Any, y: Any) -> None:
    """Create the optimizer's and the compiled metrics' variables, which ``fit`` otherwise makes at its first step,
    so that a checkpoint can be loaded into them."""
    spec: Any = None
    if isinstance(x, tf.data.Dataset):
        spec = x.element_spec
    elif x is not None and hasattr(x, "shape") and hasattr(x, "dtype"):
        spec = tuple(
            tf.TensorSpec((None, *array.shape[1:]), tf.as_dtype(array.dtype))
            for array in (x, y)
            if array is not None and hasattr(array, "shape")
        )
    if spec is not None:
        build_metrics(model, spec)
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _fit_arguments(model: keras.Model) -> dict[str, Any]:
    """What the ``fit`` of ``model`` that is running was given: its frame's ``x``, ``y``, ``steps_per_epoch`` and
    ``callbacks`` (a CallbackList by now), and its ``epoch_iterator``. A callback is not given them; they are found
    on the stack, and are empty where not found (a custom training loop)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model:
            found = frame.f_locals
            listed = found.get("callbacks")
            callbacks: Sequence[keras.callbacks.Callback] = getattr(listed, "callbacks", listed) or ()
            names = ("x", "y", "steps_per_epoch", "epoch_iterator")
            return {"callbacks": list(callbacks)} | {name: found.get(name) for name in names}
        frame = frame.f_back
    warnings.warn("runner could not find the fit this callback runs in", stacklevel=2)
    return {}
