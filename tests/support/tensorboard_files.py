"""Reading TensorBoard event files in tests: the raw records, and what TensorBoard's own loader shows."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2


def raw_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every (step, value) of each tag, in file order, duplicates included (TensorBoard's reader would hide them)."""
    (path,) = sorted(folder.iterdir())
    series: dict[str, list[tuple[int, float]]] = {}
    for record in RawEventFileLoader(str(path)).Load():  # TensorBoard's own reader: no TensorFlow needed
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            series.setdefault(value.tag, []).append((event.step, value.simple_value))
    return series


def tensorboard_scalars(folder: Path, accumulator: event_accumulator.EventAccumulator | None = None) -> dict:
    """What TensorBoard shows: (step, value) of each tag, read with its own loader."""
    accumulator = accumulator or event_accumulator.EventAccumulator(
        str(folder), size_guidance={event_accumulator.SCALARS: 0}
    )
    accumulator.Reload()
    return {tag: [(s.step, s.value) for s in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
