"""A training snapshot on local disk: every variable plus where training stood, enough for an exact continuation.

``variables.npz`` holds the model's variables (weights, batch-norm statistics, and the state of every Keras
``SeedGenerator``: Dropout and augmentation layers) and the optimizer's (iteration count, learning rate,
moments; with mixed precision, the loss scale) and of every metric (the loss tracker's total and count, each
metric's state: this epoch's running metrics, exactly as Keras holds them). ``state.json`` holds the position
(epoch, step, global step, samples of the epoch seen), the metrics history, the best value so far, the claim
generation and the batch size in effect. The data order is a pure function of (seed, epoch), so the position is
the whole data state.

Format 1 (before the metric variables were saved) held the epoch's metrics as sums in ``state.json``; such a
snapshot still loads, with the epoch's running metrics starting again from the resume point. Format 3 added the
dtype policy a snapshot was trained under (``precision``). A snapshot of a newer format than this runner reads is
refused in one line that says so, never reported as a damaged one.
"""

from __future__ import annotations

import contextlib
import json
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import keras
import numpy as np

from runner.errors import CheckpointCorrupt, TrainerError
from runner.train.models.build import finalize_layers

STATE_FILE = "state.json"
VARIABLES_FILE = "variables.npz"
SNAPSHOT_FORMAT = 3
BEST = "best"
"""The prefix of the best epoch's model variables in ``variables.npz`` (only when the spec keeps them)."""
PER_DEVICE = "per_device"
"""The prefix of each device's own part of the metrics' totals when the model trains on several devices
(``per_device/<metric variable>/<device>``). ``metrics/`` holds their sums, which a restore on any number of
devices can use; on as many devices as before, each gets its own part back, so the epoch's sums go on bit for bit."""
CALLBACKS = "callbacks"
"""The prefix of the arrays the Keras callbacks of the user's own code hold (``callbacks/<key>/<index>``)."""


@dataclass
class TrainingState:
    """Where training stands; JSON floats round-trip exactly, so resumed sums continue bit for bit."""

    epoch: int = 0
    """Completed epochs."""
    step: int = 0
    """Batches done in the current epoch (of two sizes if the batch size was halved in it: ``seen`` is the position)."""
    global_step: int = 0
    seen: int = 0
    """Samples seen in this epoch so far."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per completed epoch: ``epoch`` and its metrics."""
    best: dict[str, Any] | None = None
    """``{"monitor": "val_loss", "value": ..., "epoch": ...}``."""
    elapsed_s: float = 0.0
    """Seconds of training over all sessions."""
    generation: int = 0
    steps_per_epoch: int = 0
    batch_size: int | None = None
    """The batch size training goes on with (halved after running out of memory); ``None`` in snapshots written
    before it was recorded, which means the spec's."""
    lr_scale: float = 1.0
    """What a plateau has lowered the learning rate to, as a factor of the schedule's."""
    plateau: dict[str, Any] | None = None
    """ReduceLROnPlateau's state: ``best``, ``wait``, ``cooldown``."""
    early_stopping: dict[str, Any] | None = None
    """EarlyStopping's state: ``best``, ``best_epoch``, ``wait``."""
    step_offset: int = 0
    """Optimizer steps taken before the optimizer in use was built (a fine-tune builds a new one, whose own count
    starts at 0): the learning-rate schedule counts from their sum."""
    stopped_early: dict[str, Any] | None = None
    """Set when the early stop ended training: ``epoch`` (1-based, the last trained), ``monitor``, ``best``,
    ``best_epoch`` (1-based)."""
    devices: int = 1
    """Replicas that trained in step when the snapshot was taken: a resume on another count goes on along another
    trajectory (the batch is split, and summed, another way)."""
    backend: str = "tensorflow"
    """The Keras backend that took the snapshot."""
    precision: str | None = None
    """Keras' dtype policy the model trained under (``float32``, ``mixed_float16``, ``mixed_bfloat16``); ``None`` in
    snapshots written before it was recorded."""
    callbacks: dict[str, Any] | None = None
    """The state of the Keras callbacks of a job of the user's own code (``runner.fit``), by callback."""
    callback_arrays: dict[str, list[np.ndarray]] | None = field(default=None, repr=False, compare=False)
    """Arrays those callbacks hold (EarlyStopping's best weights): in the variables file, not in state.json."""
    best_weights: list[np.ndarray] | None = field(default=None, repr=False, compare=False)
    """The model's variables at the best epoch (see :attr:`best`), kept when the spec restores or exports them:
    in the snapshot's variables file, not in its state.json."""

    def advance(self, steps: int, samples: int) -> None:
        """Account for ``steps`` trained batches holding ``samples`` images."""
        self.seen += samples
        self.step += steps
        self.global_step += steps

    def end_epoch(self, metrics: dict[str, float], monitor: str | None, mode: str = "min") -> bool:
        """Close the epoch: record its metrics, update the best value (unless ``monitor`` is ``None``: an early
        stop judges it), move to the next epoch's start; whether this epoch is the best so far."""
        self.history.append({"epoch": self.epoch, **metrics})
        value = metrics.get(monitor) if monitor is not None else None
        best = self.best is None or self.best.get("monitor") != monitor
        if value is not None and not best:
            best = value > self.best["value"] if mode == "max" else value < self.best["value"]  # type: ignore[index]
        if value is not None and best:
            self.best = {"monitor": monitor, "value": value, "epoch": self.epoch}
        self.epoch, self.step, self.seen = self.epoch + 1, 0, 0
        return value is not None and best

    def document(self) -> dict[str, Any]:
        """What ``state.json`` holds: every field but the arrays."""
        arrays = ("best_weights", "callback_arrays")
        return {field.name: getattr(self, field.name) for field in fields(self) if field.name not in arrays}


def _model_variables(model: keras.Model) -> list[Any]:
    return list(model.variables)


def _optimizer_variables(model: keras.Model) -> list[Any]:
    return list(model.optimizer.variables)


def _metric_variables(model: keras.Model) -> list[Any]:
    return [variable for metric in model.metrics for variable in metric.variables]


def _named_arrays(prefix: str, variables: list[Any]) -> dict[str, np.ndarray]:
    """``{"<prefix>/00000": value, ...}``: the names :func:`_assign` reads back, in the variables' order.

    ``numpy()`` is a copy of the variable's value that the next training step does not change (a test pins it),
    so a captured snapshot can wait for its write while training goes on."""
    return {f"{prefix}/{index:05d}": np.asarray(variable.numpy()) for index, variable in enumerate(variables)}


class CapturedSnapshot:
    """A snapshot taken in memory (host copies of every variable, and the state), not yet on any disk.

    Taking it is the training loop's only wait. The publisher's thread writes its files straight into the job
    folder (:attr:`files`: one write of the bytes, hashed as they go); only a snapshot that cannot be published
    (the job folder failing, the claim ending first) is written to local disk (:meth:`write`), to wait or be
    kept. It holds a copy of the variables until it is committed or dropped (for the tutorial's network,
    1.08 GB), and a second one while a newer snapshot waits behind it."""

    def __init__(self, arrays: dict[str, np.ndarray], document: dict[str, Any]) -> None:
        self._arrays: dict[str, np.ndarray] | None = arrays
        self._state = json.dumps(document, indent=1).encode()
        self._lock = threading.Lock()  # the publisher's thread and, at the end, the trainer may both use it

    @property
    def held(self) -> bool:
        """Whether its variables are still in memory (not yet released after a commit, a drop or a write)."""
        return self._arrays is not None

    @property
    def files(self) -> dict[str, Callable[[BinaryIO], None]]:
        """The snapshot's files, each name with what writes its bytes (the variables first): what the checkpoint
        store's commit writes into the job folder, and :meth:`write` to local disk."""
        arrays = self._arrays
        if arrays is None:
            raise RuntimeError("the snapshot was released")
        state = self._state
        return {
            VARIABLES_FILE: lambda handle: _write_npz(handle, arrays),
            STATE_FILE: lambda handle: handle.write(state),
        }

    def release(self) -> None:
        """Let go of the variables' copies (once committed, or when a newer snapshot replaces this one)."""
        with self._lock:
            self._arrays = None

    def write(self, folder: Path) -> None:
        """Write the snapshot into ``folder`` on local disk, the variables then the state, and let go of the copies;
        nothing if it was released already. Not fsynced: the folder is a staging copy on the VM's own disk, and
        the zip format's CRC of every array catches a torn file when it is loaded."""
        with self._lock:
            if self._arrays is None:
                return
            folder.mkdir(parents=True, exist_ok=True)
            for name, put in self.files.items():  # the variables, then the state
                with open(folder / name, "wb") as handle:
                    put(handle)
            self._arrays = None


def capture_snapshot(model: keras.Model, state: TrainingState) -> CapturedSnapshot:
    """Copy every variable (model, optimizer, metrics) and the state to host memory, to be written later."""
    arrays = _named_arrays("model", _model_variables(model))
    arrays |= _named_arrays("optimizer", _optimizer_variables(model))
    arrays |= _named_arrays("metrics", _metric_variables(model))
    arrays |= _per_device_arrays(model)
    if state.best_weights is not None:
        arrays |= {f"{BEST}/{index:05d}": value for index, value in enumerate(state.best_weights)}
    for key, values in (state.callback_arrays or {}).items():
        arrays |= {f"{CALLBACKS}/{key}/{index:05d}": value for index, value in enumerate(values)}
    return CapturedSnapshot(arrays, {"format": SNAPSHOT_FORMAT, **state.document()})  # serialised at once


def _per_device_arrays(model: keras.Model) -> dict[str, np.ndarray]:
    """Each device's part of each metric variable, under ``training.distribute`` (see :data:`PER_DEVICE`)."""
    if getattr(model, "_distribute_strategy", None) is None:  # one device (or a backend without strategies)
        return {}
    from runner.train.backends.devices import local_values

    return {
        f"{PER_DEVICE}/{index:05d}/{device}": value
        for index, variable in enumerate(_metric_variables(model))
        for device, value in enumerate(local_values(variable))
    }


def save_snapshot(model: keras.Model, state: TrainingState, folder: Path) -> None:
    """Write a snapshot into ``folder`` (local disk) now: the variables, then the state."""
    capture_snapshot(model, state).write(folder)


def _write_npz(handle: Any, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes (one ``.npy`` per array in an uncompressed zip), but a write that fails (a full
    disk) leaves no half-closed zip for the garbage collector: numpy 2.1's would print a traceback from
    ``ZipFile.__del__`` ("seek of closed file") after the one-line error."""
    archive = zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)
    try:
        for name, value in arrays.items():
            with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                _write_npy(member, np.asanyarray(value))
        archive.close()
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            archive.close()
        archive.fp = None  # closed or not, it must not be closed again once the file is
        raise


def _write_npy(member: Any, value: np.ndarray) -> None:
    """The bytes ``np.save`` writes for ``value`` (a Fortran-ordered one is written in C order), with the data handed
    over in one piece: ``np.lib.format.write_array`` copies a zip member's data twice, 16 MB at a time, which for
    a gigabyte costs seconds the bytes themselves do not."""
    if not value.flags.c_contiguous:
        value = value.copy(order="C")  # not np.ascontiguousarray: it makes a 0-d array (a step counter) 1-d
    header = np.lib.format.header_data_from_array_1_0(value)
    try:
        np.lib.format.write_array_header_1_0(member, header)
    except ValueError:  # a header too long for format 1.0 (millions of dimensions): what np.save falls back to
        np.lib.format.write_array_header_2_0(member, header)
    if value.size:
        member.write(memoryview(value.reshape(-1)).cast("B"))


def load_snapshot(
    model: keras.Model,
    folder: Path,
    *,
    checkpoint: str,
    prepare: Callable[[TrainingState], None] | None = None,
) -> TrainingState:
    """Assign a snapshot's variables to a built, compiled model (optimizer built) and return its state.

    ``prepare`` is given the state before any variable is assigned: the trainer makes the model what it was when
    the snapshot was taken (a fine-tune's unfrozen layers and new optimizer)."""
    error: Exception | None = None
    try:
        document = json.loads((folder / STATE_FILE).read_text())
        written = document.pop("format", 1)
        if isinstance(written, int) and written > SNAPSHOT_FORMAT:
            raise TrainerError(
                f"checkpoint {checkpoint} was written by a newer runner (snapshot format {written}; this runner "
                f"reads up to {SNAPSHOT_FORMAT}): install the runner that trained the job on this machine too"
            )
        document.pop("sums", None)  # format 1: the epoch's metrics were sums here
        state = TrainingState(**document)
    except (OSError, ValueError, TypeError) as failure:
        error = failure
    else:
        if prepare is not None:
            prepare(state)  # outside the try: its own errors are not a damaged snapshot
        try:
            _load_variables(model, folder, state, checkpoint)
        except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as failure:  # BadZipFile: a torn array
            error = failure
    if error is not None:
        raise CheckpointCorrupt(checkpoint, f"cannot load the training snapshot ({error})") from None
    return state


def _load_variables(model: keras.Model, folder: Path, state: TrainingState, checkpoint: str) -> None:
    with np.load(folder / VARIABLES_FILE) as arrays:
        _check_same_optimizer(model, arrays, state, checkpoint)  # before any variable changes
        _assign(_model_variables(model), arrays, "model", checkpoint)
        finalize_layers(model)
        _assign(_optimizer_variables(model), arrays, "optimizer", checkpoint)
        model.reset_metrics()
        # Not built yet: a user's fit of data runner cannot describe; its epoch starts with fresh metrics anyway.
        built = bool(_metric_variables(model))
        if built and any(name.startswith("metrics/") for name in arrays.files):
            _assign(_metric_variables(model), arrays, "metrics", checkpoint)
            _assign_per_device(model, arrays)
        best = sorted(name for name in arrays.files if name.startswith(f"{BEST}/"))
        state.best_weights = [arrays[name] for name in best] or None
        held: dict[str, list[np.ndarray]] = {}
        for name in sorted(name for name in arrays.files if name.startswith(f"{CALLBACKS}/")):
            held.setdefault(name.split("/")[1], []).append(arrays[name])
        state.callback_arrays = held or None


def _check_same_optimizer(model: keras.Model, arrays: Any, state: TrainingState, checkpoint: str) -> None:
    """Refuse, in one line naming both, a snapshot trained under another dtype policy whose optimizer has other
    variables: mixed precision's float16 keeps a loss scale (Keras' ``LossScaleOptimizer``), a TPU's bfloat16
    none. The checkpoint is sound, so this is not :class:`CheckpointCorrupt`, whose message would call it
    damaged and blame a changed model."""
    held = sum(name.startswith("optimizer/") for name in arrays.files)
    here = len(_optimizer_variables(model))
    backend, policy = keras.backend.backend(), keras.config.dtype_policy().name
    if held == here or state.precision == policy or (state.precision is None and state.backend == backend):
        return  # the same optimizer, or a difference that is not the policy's: the count check says it
    then = f"the {state.precision} policy" if state.precision else "another dtype policy"
    raise TrainerError(
        f"checkpoint {checkpoint} was trained on Keras' {state.backend} backend under {then}, whose "
        f"optimizer has {held} variables, and this session runs {backend} under {policy}, whose optimizer has "
        f"{here} (float16 keeps a loss scale, a TPU's bfloat16 none): resume the job on {state.backend} under "
        f"{then} (KERAS_BACKEND={state.backend}, on the same kind of accelerator), or `runner edit` it with another "
        "training.mixed_precision to train again from the start"
    )


def _assign_per_device(model: keras.Model, arrays: Any) -> None:
    """Give each device its own part of the metrics' totals, when the snapshot was taken on as many devices."""
    names = [name for name in arrays.files if name.startswith(f"{PER_DEVICE}/")]
    if not names or getattr(model, "_distribute_strategy", None) is None:
        return
    from runner.train.backends.devices import assign_local_values

    parts: dict[int, list[np.ndarray]] = {}
    by_variable_then_device = sorted(names, key=lambda name: tuple(int(word) for word in name.split("/")[1:]))
    for name in by_variable_then_device:  # per_device/<variable>/<device>
        parts.setdefault(int(name.split("/")[1]), []).append(arrays[name])
    variables = _metric_variables(model)
    for index, values in parts.items():
        if index < len(variables):
            assign_local_values(variables[index], values)


def _assign(variables: list[Any], arrays: Any, prefix: str, checkpoint: str) -> None:
    names = sorted(name for name in arrays.files if name.startswith(f"{prefix}/"))
    if len(names) != len(variables):
        raise CheckpointCorrupt(
            checkpoint,
            f"it holds {len(names)} {prefix} variables but the model has {len(variables)}: "
            "was the model (its spec, or the code that builds it) changed after training started?",
        )
    for variable, name in zip(variables, names):
        value = arrays[name]
        if tuple(value.shape) != tuple(variable.shape):
            raise CheckpointCorrupt(
                checkpoint, f"{variable.path} has shape {tuple(variable.shape)}, the checkpoint {tuple(value.shape)}"
            )
        variable.assign(value)
