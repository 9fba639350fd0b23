"""Running out of GPU memory while training: fail with advice, or go back to the last checkpoint with half the batch.

Halving changes the training trajectory (more optimizer steps, each on fewer images), so it happens only when the
spec asks for it (``training.on_oom: halve_batch``). The batch size in effect is kept in every snapshot, so a later
session goes on with it instead of the spec's, which would run out of memory again.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import keras

from runner.errors import OutOfMemory
from runner.spec import JobSpec
from runner.train import backends
from runner.train.snapshots.snapshot import TrainingState, load_snapshot
from runner.training import RunContext


def halved_batch_size(batch_size: int, spec: JobSpec, error: BaseException) -> int:
    """The batch size to go on with after ``error`` at ``batch_size``; :class:`OutOfMemory` (one line saying what
    to change) when the spec says fail, or when there is nothing left to halve."""
    if spec.training.on_oom == "halve_batch" and batch_size > 1:
        return batch_size // 2
    halved_from = spec.dataset.batch_size if batch_size != spec.dataset.batch_size else None
    size = tuple(spec.dataset.image_size)
    raise OutOfMemory(
        batch_size, gpu=backends.current().sees_an_accelerator(), halved_from=halved_from, image_size=size
    ) from error


def out_of_memory_building(spec: JobSpec, error: BaseException) -> OutOfMemory:
    """The one line for a model whose weights (and optimizer state) do not fit, mostly from a large image size
    before a Flatten: no batch size change can help."""
    size = tuple(spec.dataset.image_size)
    failure = OutOfMemory(
        spec.dataset.batch_size, gpu=backends.current().sees_an_accelerator(), image_size=size, building=True
    )
    failure.__cause__ = error
    return failure


def go_back(
    context: RunContext,
    model: keras.Model,
    *,
    scratch: Path,
    initial: Path,
    prepare: Callable[[TrainingState], None] | None = None,
) -> tuple[TrainingState, str | None]:
    """Load the newest committed checkpoint into ``model`` (the snapshot at ``initial`` when there is none yet);
    return its state and id (``None`` for the initial one). ``prepare`` as for :func:`load_snapshot`."""
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        info = context.store.restore(scratch)
        if info is not None:
            return load_snapshot(model, scratch, checkpoint=info.id, prepare=prepare), info.id
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return load_snapshot(model, initial, checkpoint="initial weights", prepare=prepare), None


def report_halving(
    context: RunContext, *, at: TrainingState, during: str, back_to: TrainingState, checkpoint: str | None, old: int
) -> None:
    """Tell the console, the job log and events.jsonl (an ``oom`` event) that the batch size was halved after
    running out of memory at ``at``, and where training went back to."""
    new = back_to.batch_size
    epoch = at.epoch + 1
    when = f"epoch {epoch}, step {at.step + 1}" if during == "training" else f"validation of epoch {epoch}"
    where = f"checkpoint {checkpoint}" if checkpoint else "the start (no checkpoint yet)"
    message = (
        f"out of {'GPU ' if backends.current().sees_an_accelerator() else ''}memory at batch size {old} ({when}): going back to {where} and on "
        f"with batch size {new} (training.on_oom: halve_batch; this changes the training trajectory)"
    )
    context.warn(message)
    context.job.events.append(
        "oom",
        generation=context.generation,
        batch_size_from=old,
        batch_size_to=new,
        during=during,
        epoch=at.epoch,
        step=at.step,
        back_to={"checkpoint": checkpoint, "epoch": back_to.epoch, "step": back_to.step, "sample": back_to.seen},
    )
