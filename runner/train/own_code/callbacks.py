"""The state of the Keras callbacks a user's ``fit`` runs beside runner's, kept in every checkpoint.

Keras' own callbacks keep what they have counted (EarlyStopping's patience, ReduceLROnPlateau's best value, the
best weights) in Python attributes, which a disconnect loses: a resumed ``fit`` would start counting again.
runner reads those attributes into the snapshot and sets them back once every callback has run its
``on_train_begin`` (which resets them). A callback of the user's own keeps its state where runner cannot see it,
unless it offers ``get_state()`` and ``set_state(state)`` (JSON values): runner says so, once.

``CSVLogger`` writes a file of its own: on a resume its rows are cut back to the epochs the checkpoint holds
(rebuilt from runner's history when ``append=False`` emptied it), so each epoch is in it once.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from runner.errors import UsageError

SAVED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "EarlyStopping": ("wait", "stopped_epoch", "best", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "ModelCheckpoint": ("best", "_batches_seen_since_last_saving", "_last_batch_seen"),
    "TensorBoard": ("_global_train_batch", "_previous_epoch_iterations"),
}
"""What each of Keras' callbacks counts across epochs, by class name (attributes a Keras release lacks are skipped)."""

SAVED_ARRAYS: dict[str, str] = {"EarlyStopping": "best_weights"}
"""A list of arrays a callback holds (the best epoch's weights, for ``restore_best_weights``)."""

STATELESS = frozenset(
    {
        "History",
        "ProgbarLogger",
        "LearningRateScheduler",
        "LambdaCallback",
        "TerminateOnNaN",
        "RemoteMonitor",
        "SwapEMAWeights",
        "CSVLogger",
        "Checkpointing",
    }
)
"""Keras' callbacks whose behaviour is a function of the epoch and the logs (or, CSVLogger, handled apart)."""


def _is_keras_own(callback: keras.callbacks.Callback) -> bool:
    return type(callback).__module__.startswith("keras.")


def keys_of(callbacks: Sequence[keras.callbacks.Callback]) -> list[tuple[str, keras.callbacks.Callback]]:
    """Each callback with the key its state is saved under: its class name, numbered from the second of a class."""
    seen: dict[str, int] = {}
    keyed = []
    for callback in callbacks:
        name = type(callback).__name__
        seen[name] = seen.get(name, 0) + 1
        keyed.append((name if seen[name] == 1 else f"{name}.{seen[name]}", callback))
    return keyed


def check_callbacks(callbacks: Sequence[keras.callbacks.Callback]) -> list[str]:
    """Refuse what cannot work beside runner; the names of the user's callbacks whose state runner cannot keep."""
    unseen = []
    for callback in callbacks:
        name = type(callback).__name__
        if isinstance(callback, keras.callbacks.BackupAndRestore):
            raise UsageError(
                "keras.callbacks.BackupAndRestore restores the model too, from its own folder: remove it, runner's "
                "checkpoints take its place"
            )
        if _is_keras_own(callback):
            continue
        if name in STATELESS or (callable(getattr(callback, "get_state", None)) and hasattr(callback, "set_state")):
            continue
        unseen.append(name)
    return unseen


def capture(callbacks: Sequence[keras.callbacks.Callback]) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    """The callbacks' state: JSON values by key, and lists of arrays by key."""
    values: dict[str, Any] = {}
    arrays: dict[str, list[np.ndarray]] = {}
    for key, callback in keys_of(callbacks):
        name = type(callback).__name__
        if _is_keras_own(callback) and name in SAVED_ATTRIBUTES:
            values[key] = {
                attribute: _json_value(getattr(callback, attribute))
                for attribute in SAVED_ATTRIBUTES[name]
                if hasattr(callback, attribute)
            }
            held = getattr(callback, SAVED_ARRAYS.get(name, ""), None)
            if held is not None:
                arrays[key] = [np.array(array, copy=True) for array in held]
        elif not _is_keras_own(callback) and callable(getattr(callback, "get_state", None)):
            values[key] = callback.get_state()
    return values, arrays


def restore(
    callbacks: Sequence[keras.callbacks.Callback],
    values: dict[str, Any],
    arrays: dict[str, list[np.ndarray]],
) -> list[str]:
    """Give each callback the state saved under its key; the keys restored."""
    restored = []
    for key, callback in keys_of(callbacks):
        if key not in values:
            continue
        name = type(callback).__name__
        if _is_keras_own(callback) and name in SAVED_ATTRIBUTES:
            for attribute, value in values[key].items():
                setattr(callback, attribute, value)
            if (attribute := SAVED_ARRAYS.get(name)) is not None:
                setattr(callback, attribute, arrays.get(key))
        elif callable(getattr(callback, "set_state", None)):
            callback.set_state(values[key])
        restored.append(key)
    return restored


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if value is None or isinstance(value, (str, bool)):
        return value
    if hasattr(value, "numpy"):  # a Keras or TensorFlow scalar variable
        return _json_value(np.asarray(value.numpy()).item())
    if isinstance(value, np.ndarray) and value.size == 1:
        return _json_value(value.item())
    return None


def cut_csv_logs(callbacks: Sequence[keras.callbacks.Callback], history: list[dict[str, float]]) -> list[Path]:
    """Make each CSVLogger's file hold exactly the epochs of ``history`` (the checkpoint's), and append after them:
    rows of epochs trained after the checkpoint are dropped; a file ``append=False`` emptied is rebuilt."""
    cut = []
    for callback in callbacks:
        if not isinstance(callback, keras.callbacks.CSVLogger):
            continue
        path = Path(callback.filename)
        handle = getattr(callback, "csv_file", None)
        if handle is not None:
            handle.close()
        text = _kept_rows(path, len(history)) if path.exists() else None
        if text is None:
            text = _rows_of(history, separator=callback.sep)
        path.write_text(text)
        callback.csv_file = open(path, "a")  # noqa: SIM115 (CSVLogger closes it at the end of training)
        callback.append = True
        callback.append_header = not text
        callback.writer = None
        callback.keys = None
        cut.append(path)
    return cut


def _kept_rows(path: Path, epochs: int) -> str | None:
    """The file's header and its rows of epochs before ``epochs``; ``None`` when it lacks some of them."""
    lines = path.read_text().splitlines(keepends=True)
    if not lines:
        return None
    kept, numbers = [lines[0]], []
    for line in lines[1:]:
        first = line.split(",", 1)[0].split(";", 1)[0].strip()
        try:
            epoch = int(first)
        except ValueError:
            continue
        if epoch < epochs:
            kept.append(line)
            numbers.append(epoch)
    return "".join(kept) if sorted(numbers) == list(range(epochs)) else None


def _rows_of(history: list[dict[str, float]], *, separator: str) -> str:
    """Rows as CSVLogger writes them (``epoch`` then the logs' keys sorted), from runner's history."""
    if not history:
        return ""
    keys = sorted(key for key in history[0] if key != "epoch")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["epoch", *keys], delimiter=separator, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({"epoch": int(row["epoch"]), **{key: row.get(key, "NA") for key in keys}})
    return buffer.getvalue()
