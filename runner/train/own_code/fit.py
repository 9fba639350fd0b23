"""``runner.fit``: the user's ``model.fit``, resumable, in one call.

It is ``model.fit`` with runner's :class:`Checkpointing` callback last (so that a checkpoint holds what every other
callback made of the epoch), plus what only a wrapper can do: take runner's dataset whole (training and
validation batches), give a seeded ``tf.data`` shuffle the order it would have had at the resumed epoch, let go
of the job when ``fit`` raises, and return the history of every epoch of the job, not only this session's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from runner import defaults
from runner.errors import UsageError
from runner.train.data.own_code import ImageFolder, dataset_of
from runner.train.own_code.checkpointing import Checkpointing


def replayable(dataset: tf.data.Dataset) -> tuple[tf.data.Dataset, Callable[[int], None]]:
    """``dataset`` as ``fit`` is given it, and what puts its seeded shuffles where an uninterrupted run had them
    after a number of epochs.

    ``Dataset.shuffle(seed=...)`` (what ``image_dataset_from_directory`` does) draws a new seed for each iterator
    started over it, from a generator kept in the dataset: a new process's first iterator gets epoch 0's order
    again, and Keras starts iterators it never reads. Wrapped in a ``flat_map``, the dataset's own iterator starts
    only when the wrapper is read, once per epoch; reading ``epochs`` of them (one batch each) before a resumed
    ``fit`` draws the seeds the epochs before drew."""
    wrapped = tf.data.Dataset.from_tensors(0).flat_map(lambda _: dataset)
    if (length := int(dataset.cardinality())) >= 0:
        wrapped = wrapped.apply(tf.data.experimental.assert_cardinality(length))  # fit shows its progress

    def replay(epochs: int) -> None:
        for _ in range(epochs):
            next(iter(wrapped), None)

    return wrapped, replay


def fit(
    model: keras.Model,
    x: Any = None,
    y: Any = None,
    *,
    job: str,
    queue: str | None = None,
    epochs: int = 1,
    validation_data: Any = None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    every_epochs: int = 1,
    every_minutes: float | None = None,
    keep: int = defaults.CHECKPOINT_KEEP,
    **fit_kwargs: Any,
) -> keras.callbacks.History:
    """Train ``model`` as ``model.fit(x, y, epochs=..., validation_data=..., callbacks=..., **fit_kwargs)`` would,
    resumable: the job ``job`` in the queue keeps its checkpoints, and calling this again (in a new session)
    continues from the newest one. On a job that is done, the model gets its final weights and nothing trains.

    ``x`` may be ``runner.data.image_folder(...)``'s dataset (its validation batches are used unless
    ``validation_data`` is given): with it a resume is exact even part way through an epoch. Returns a History of
    every epoch of the job."""
    if getattr(model, "optimizer", None) is None:
        raise UsageError("runner.fit: compile the model first (model.compile(optimizer=..., loss=...)), as fit needs")
    if not isinstance(epochs, int) or epochs < 1:
        raise UsageError(f"runner.fit: epochs={epochs!r}: give a whole number of epochs, 1 or more")
    if "initial_epoch" in fit_kwargs:
        raise UsageError("runner.fit: leave out initial_epoch: runner starts at the epoch its checkpoint holds")
    data = dataset_of(x)
    if isinstance(x, ImageFolder):
        validation_data = validation_data if validation_data is not None else x.validation
        x = x.train
    replay = None
    if data is None and isinstance(x, tf.data.Dataset):
        x, replay = replayable(x)
    checkpointing = Checkpointing(
        job, queue, every_epochs, every_minutes, keep, data=data, _kind="runner.fit", _replay=replay
    )
    listed = [*(callbacks or ()), checkpointing]
    try:
        history = model.fit(x, y, epochs=epochs, validation_data=validation_data, callbacks=listed, **fit_kwargs)
    except BaseException as error:
        checkpointing.abandon(error)
        raise
    return _whole_history(history, checkpointing)


def _whole_history(history: keras.callbacks.History, checkpointing: Checkpointing) -> keras.callbacks.History:
    """``history`` with every epoch of the job (a done job's too), as one uninterrupted ``fit`` would return it."""
    rows = checkpointing.state.history
    if checkpointing.done_already:
        rows = _final_history(checkpointing)
    if not rows:
        return history
    names = [name for name in rows[-1] if name != "epoch"]
    history.epoch = [int(row["epoch"]) for row in rows]
    history.history = {name: [row.get(name) for row in rows] for name in names}
    return history


def _final_history(checkpointing: Checkpointing) -> list[dict[str, float]]:
    from runner.history import read_history
    from runner.paths import QueuePaths, queue_choice

    root, _ = queue_choice(checkpointing.queue)
    try:
        rows = read_history(QueuePaths(root).job(checkpointing.job).history)
    except (OSError, ValueError):
        return []
    return [{name: float(value) for name, value in row.items() if value not in ("", None)} for row in rows]
