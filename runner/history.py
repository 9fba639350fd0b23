"""history.csv: one row per completed epoch, rewritten whole from a checkpoint's history, never appended to.

Appending after a resume is how hand-made logs get duplicate epochs; writing the whole file from the history
stored in the checkpoint makes it right after any number of kills and resumes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner import storage


def history_csv(history: Sequence[dict[str, Any]]) -> str:
    """CSV text: ``epoch`` (0-based), then ``loss``, then the other metrics in first-seen order."""
    columns: list[str] = []
    for row in history:
        for key in row:
            if key != "epoch" and key not in columns:
                columns.append(key)
    # sort() is stable: within each group the columns keep their first-seen order.
    columns.sort(key=lambda name: (name.startswith("val_"), name not in ("loss", "val_loss")))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch", *columns])
    for index, row in enumerate(history):
        writer.writerow([row.get("epoch", index), *(_cell(row.get(column)) for column in columns)])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


def write_history(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """Replace history.csv atomically."""
    storage.atomic_write_text(path, history_csv(history))


def check_history(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """Read history.csv back: :class:`StorageError` unless it holds exactly ``history`` (a job is done only then)."""
    if storage.read_bytes(path).decode("utf-8", errors="replace") != history_csv(history):
        raise storage.StorageError(
            f"{path} does not hold the training history after it was written: run `runner work` again",
            path=str(path),
            transient=True,
        )


def read_history(path: Path) -> list[dict[str, str]]:
    """Rows of history.csv as dicts of strings; empty when there is none."""
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except storage.StorageError as error:
        if error.errno_ == 2:
            return []
        raise
    return list(csv.DictReader(io.StringIO(text)))
