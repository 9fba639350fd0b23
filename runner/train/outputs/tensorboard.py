"""TensorBoard logs of a job, derived from its checkpoint's history, that a live TensorBoard follows across resumes.

The layout and tags are those of Keras' TensorBoard callback: runs ``tensorboard/train`` and
``tensorboard/validation``, one ``epoch_<metric>`` scalar per epoch (``val_`` stripped in validation), step = the
epoch, 0-based. Like history.csv the files are derived from the history stored in the committed checkpoint, so
they are right after any number of kills. How they are written follows from how TensorBoard reads them (checked
against TensorBoard 2.21, both its Python loader and its fast Rust data server):

- A reader keeps each event file open and goes on from where it stopped. A file replaced by a rename is never read
  again by a live TensorBoard; a file that grows in place is. So one claim generation's file is written on local
  disk and the job folder's copy is only ever extended: what the local file holds beyond it is appended. A torn
  append is completed by the next one (readers stop before an incomplete record and retry from there). Only a copy
  that is not a prefix of the local file is replaced whole.
- Each generation writes its own file, named to sort after the older ones (TensorBoard reads files in name order),
  starting with the restored history replayed, so it holds each epoch once. Older generations' files are deleted
  once it is published: a fresh TensorBoard sees one file.
- A live TensorBoard has read the older file already. The new file starts with a ``SessionLog.START`` at step 0:
  the Python loader then drops what it had (with ``file_version`` 2 it ignores steps that go back), and the Rust
  data server drops a series' later points whenever a step comes again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from runner import storage
from runner.paths import TEMP_PREFIX, JobPaths, event_file_generation, event_file_name, is_temp_name, temp_sibling

log = logging.getLogger(__name__)


def _tensorflows_writer() -> tuple[Any, Any, Callable[[Path], Any]] | None:
    """Event protos and a record writer from TensorFlow; ``None`` without TensorFlow (the JAX backend's machines)."""
    try:
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2
        from tensorflow.core.util import event_pb2
    except ImportError:
        return None
    return event_pb2, summary_pb2, lambda path: tf.io.TFRecordWriter(str(path))


class _FileRecordWriter:
    """TensorBoard's own record writer (on a file it is given) over a file it opens: TFRecordWriter's shape."""

    def __init__(self, path: Path, writer_class: Any) -> None:
        self._handle = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._writer = writer_class(self._handle)

    def write(self, record: bytes) -> None:
        self._writer.write(record)

    def close(self) -> None:
        self._writer.close()  # flushes, and closes the file


def _tensorboards_writer() -> tuple[Any, Any, Callable[[Path], Any]] | None:
    """The same from the TensorBoard package, which runs without TensorFlow; ``None`` without it."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        return None
    return event_pb2, summary_pb2, lambda path: _FileRecordWriter(path, RecordWriter)


_FOUND = _tensorboards_writer() or _tensorflows_writer()  # the same bytes; the first loads no TensorFlow
AVAILABLE = _FOUND is not None
"""Whether event files can be written here: with TensorFlow, or with the TensorBoard package (on the JAX backend
without either, a job trains without TensorBoard logs, and its log says so)."""
event_pb2, summary_pb2, _record_writer = _FOUND if _FOUND is not None else (None, None, None)

RETRY_BUDGET_S = 30.0
"""Seconds one publish keeps retrying a flaky job folder; past that it waits for the next checkpoint, so that
TensorBoard files never hold up publishing checkpoints for long."""

FILE_VERSION = "brain.Event:2"
"""The first record of every event file TensorFlow writes; TensorBoard reads the version from it."""

VALIDATION_PREFIX = "val_"


class TensorBoardLog:
    """One claim generation's TensorBoard event files: written on local disk, then published to the job folder."""

    def __init__(
        self,
        paths: JobPaths,
        *,
        generation: int,
        local_folder: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.paths, self.generation, self.local_folder, self.clock = paths, generation, local_folder, clock
        self.name = event_file_name(generation)
        self._runs = {"train": paths.tensorboard_train, "validation": paths.tensorboard_validation}
        self._started_at = clock()
        # A row's wall time is kept once chosen, so that rewriting the local file only ever extends it.
        self._wall_times: list[float] | None = None
        self._published: dict[str, bytes] = {}
        self._older_removed = False

    def publish(self, history: Sequence[Mapping[str, float]], *, fence: Callable[[], None]) -> None:
        """Bring the job folder's event files up to ``history``, then delete older generations' files.

        Safe to call again after any failure: it compares what the job folder holds with what it should hold.
        """
        if self._wall_times is None:
            self._wall_times = self._recorded_wall_times(len(history))
        self._wall_times += [self.clock()] * (len(history) - len(self._wall_times))
        files = self._write_local(history)
        for run, data in files.items():
            if self._published.get(run) != data:
                _extend(self._runs[run] / self.name, data, self._published.get(run), fence)
                self._published[run] = data
        if not self._older_removed:
            self._remove_older(fence)
            self._older_removed = True

    # --- local files ------------------------------------------------------------------------------------------

    def _write_local(self, history: Sequence[Mapping[str, float]]) -> dict[str, bytes]:
        """Write each run's event file on local disk; return the bytes of each (a run without values has none)."""
        assert self._wall_times is not None
        files: dict[str, bytes] = {}
        for run in self._runs:
            events = [
                _scalars_event(int(row.get("epoch", index)), wall_time, _run_values(row, run))
                for index, (row, wall_time) in enumerate(zip(history, self._wall_times))
            ]
            events = [event for event in events if event is not None]
            if not events:
                continue
            path = self.local_folder / run / self.name
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_records(path, [event.SerializeToString() for event in [*self._header(), *events]])
            files[run] = path.read_bytes()
        return files

    def _header(self) -> list[event_pb2.Event]:
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        return [
            event_pb2.Event(wall_time=self._started_at, file_version=FILE_VERSION),
            # Step 0: a live TensorBoard's Python loader drops every point it read from older files.
            event_pb2.Event(wall_time=self._started_at, step=0, session_log=start),
        ]

    def _recorded_wall_times(self, rows: int) -> list[float]:
        """When the restored epochs ended, from the older generations' files, so that TensorBoard's time axes
        show when they were trained rather than when they were replayed; now, where no file tells."""
        recorded: dict[int, float] = {}
        try:
            for name in self._older_names(self._runs["train"]):
                data = _read(self._runs["train"] / name)
                recorded |= {event.step: event.wall_time for event in _read_events(data) if event.HasField("summary")}
        except OSError as error:
            log.debug("no recorded epoch times (%s): the replayed epochs get the time of the resume", error)
        now = self.clock()
        return [recorded.get(epoch, now) for epoch in range(rows)]

    # --- the job folder ---------------------------------------------------------------------------------------

    def _older_names(self, folder: Path) -> list[str]:
        """Older generations' event files, and the temporary copies a kill in their replace left behind."""
        names = _list(folder)
        return [n for n in names if (g := _generation_of(n)) is not None and g < self.generation]

    def _remove_older(self, fence: Callable[[], None]) -> None:
        """Delete the older generations' files, which this one's file replaces (newer ones are not ours to touch)."""
        for folder in self._runs.values():
            older = self._older_names(folder)
            if older:
                fence()
            for name in older:
                _remove(folder / name)


def _temporary_label(generation: int) -> str:
    """The name a generation's file has while it is written beside the real one: without ``tfevents``, which
    would make TensorBoard read it (a kill can leave it behind; a later generation deletes it)."""
    return f"tensorboard-g{generation:06d}"


def _generation_of(name: str) -> int | None:
    """The claim generation of an event file, or of a temporary copy of one; ``None`` for any other name."""
    if is_temp_name(name):
        label = name[len(TEMP_PREFIX) :]
        digits = label.removeprefix(_temporary_label(0)[:-6])[:6]
        return int(digits) if label.startswith(_temporary_label(0)[:-6]) and digits.isdigit() else None
    return event_file_generation(name)


def _write_records(path: Path, records: list[bytes]) -> None:
    """An event file of ``records``, in TFRecord framing (length, its CRC, data, its CRC)."""
    assert _record_writer is not None
    writer = _record_writer(path)
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()


def _run_values(row: Mapping[str, float], run: str) -> dict[str, float]:
    """The metrics of one history row that belong to ``run``, named as Keras' TensorBoard callback names them."""
    values: dict[str, float] = {}
    for key, value in row.items():
        if key == "epoch" or value is None:
            continue
        is_validation = key.startswith(VALIDATION_PREFIX)
        if is_validation == (run == "validation"):
            values[f"epoch_{key.removeprefix(VALIDATION_PREFIX)}"] = float(value)
    return values


def _scalars_event(step: int, wall_time: float, values: Mapping[str, float]) -> event_pb2.Event | None:
    if not values:
        return None
    summary = summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()]
    )
    return event_pb2.Event(wall_time=wall_time, step=step, summary=summary)


def _read_events(data: bytes) -> list[event_pb2.Event]:
    """The whole records of an event file's bytes (TFRecord framing: length, its CRC, data, its CRC); a torn or
    damaged tail ends the list. The CRCs are not checked: the times read here are a nicety, not data."""
    events, offset = [], 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        end = offset + 12 + length + 4
        if end > len(data):
            break
        event = event_pb2.Event()
        try:
            event.ParseFromString(data[offset + 12 : end - 4])
        except Exception:  # noqa: BLE001 (protobuf's DecodeError, from whichever package provides the protos)
            break
        events.append(event)
        offset = end
    return events


_retried = storage.retrying(budget_s=RETRY_BUDGET_S)


@_retried
def _extend(target: Path, data: bytes, published: bytes | None, fence: Callable[[], None]) -> None:
    """Make the job folder's ``target`` hold ``data``, in place when it holds a prefix of it.

    Retrying is safe: each try looks at what the file holds now (a failed append may have written part of its
    bytes) and writes only what is missing. The file is read back only when its size is not the one last published.
    """
    size = _size(target)
    if size is None:
        prefix = False
    elif published is not None and size == len(published) and data.startswith(published):
        prefix = True
    else:
        prefix = data.startswith(target.read_bytes())
    fence()
    if not prefix:
        _replace(target, data)
    elif size is not None and size < len(data):
        _append(target, data[size:])


@_retried
def _read(path: Path) -> bytes:
    return path.read_bytes()


@_retried
def _list(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


@_retried
def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _append(path: Path, data: bytes) -> None:
    # No O_CREAT: a file deleted meanwhile (by a newer claim) must not come back.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes) -> None:
    """A new file, or one that is not a prefix of what it should hold: written beside it and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, label=_temporary_label(event_file_generation(path.name) or 0))
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    storage.fsync_dir(path.parent)
