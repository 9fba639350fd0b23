"""Fixing a job: replacing its spec, or deleting it.

A job's spec is frozen when it is submitted, so that every session trains the same thing. A failed job is often
fixed by changing it (a dataset URL, a learning rate, more epochs). :func:`replace_spec` does that under the job's
lease, and keeps the checkpoints only while they still fit the new spec: when nothing that shapes the weights, the
optimizer's state or the order of the batches has changed (see :data:`SHAPES_CHECKPOINTS`).

Both take the job's lease first, so a job that a live worker runs is refused, and both fence out a worker that lost
its lease without knowing it: a replacement takes a claim generation of its own, a deletion moves the folder away
(its state.json with it). A deletion renames the folder aside in one step before removing it, so the job is gone
from the queue at once and a kill midway leaves only a temporary folder, which the next submit collects.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import storage
from runner.errors import DamagedFile, Fenced, InvalidTransition, RunnerError
from runner.job import Job, JobState, JobStatus, worker_identity
from runner.lease import JobLease
from runner.paths import is_temp_name, temp_sibling
from runner.queue import Queue
from runner.spec import JobSpec

SHAPES_CHECKPOINTS = (
    "dataset",
    "model",
    "training.optimizer",
    "training.loss",
    "training.metrics",
    "training.seed",
    "training.mixed_precision",
)
"""Spec fields (and sections) whose change makes the old checkpoints unusable: the images, their size, order and
batches; the network; the optimizer's and the metrics' variables; the loss being minimised. Everything else (the
learning rate, epochs, checkpoint and export settings, priority) may change and training goes on from the newest
checkpoint."""

KEPT_ON_DELETE = ("checkpoints", "final", "spec.yaml", "history.csv")
"""What ``runner delete --keep-checkpoints`` keeps of a job folder: the trained variables and models, and the spec
and history that say what they are."""


@dataclass(frozen=True)
class Replacement:
    """What :func:`replace_spec` did."""

    name: str
    changed: tuple[str, ...]
    """Dotted paths of the spec fields that differ; empty when the new spec is the same."""
    discarded_because: tuple[str, ...]
    """The changed fields that made the checkpoints unusable; empty when they were kept (or there were none)."""
    checkpoint: str | None
    """The checkpoint training goes on from; ``None`` when it starts from the beginning."""
    status: JobStatus
    """The job's status now."""

    def describe(self) -> str:
        """One line for the console."""
        if not self.changed:
            stopped = self.status in (JobStatus.FAILED, JobStatus.CANCELLED)
            again = f" (`runner retry {self.name}` queues it again)" if stopped else ""
            return f"job {self.name!r} already has this spec: nothing changed{again}"
        changed = ", ".join(self.changed)
        if self.discarded_because:
            return (
                f"replaced the spec of job {self.name!r} ({changed}); its checkpoints were discarded because "
                f"{', '.join(self.discarded_because)} changed: it is queued and trains from the beginning"
            )
        where = f"from checkpoint {self.checkpoint}" if self.checkpoint else "from the beginning (it had no checkpoint)"
        return f"replaced the spec of job {self.name!r} ({changed}): it is queued and trains on {where}"


@dataclass(frozen=True)
class Deletion:
    """What :func:`delete_job` did."""

    name: str
    kept: Path | None
    """Where the checkpoints and exports were kept; ``None`` when everything was removed."""
    asked_to_keep: bool = False

    def describe(self) -> str:
        """One line for the console."""
        if self.kept is not None:
            return f"deleted job {self.name!r}; its checkpoints, exports, spec and history are kept in {self.kept}"
        if self.asked_to_keep:
            return f"deleted job {self.name!r}; it had no checkpoints or exports to keep"
        return f"deleted job {self.name!r}"


def spec_changes(old: JobSpec, new: JobSpec) -> list[str]:
    """Dotted paths of the fields whose values differ between two specs, in the spec's order."""
    return _differences(old.model_dump(mode="json"), new.model_dump(mode="json"), "")


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in list(old) + [key for key in new if key not in old]:
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [prefix.rstrip(".")] if old != new else []


def shapes_checkpoints(field: str) -> bool:
    """Whether a change of ``field`` (a dotted path) makes the old checkpoints unusable."""
    return any(field == shaping or field.startswith(f"{shaping}.") for shaping in SHAPES_CHECKPOINTS)


def replace_spec(queue: Queue, spec: JobSpec) -> Replacement:
    """Give the queued, failed, cancelled or interrupted job ``spec.name`` this spec, and queue it.

    Its checkpoints (and history, TensorBoard logs and exports) are kept when no field of
    :data:`SHAPES_CHECKPOINTS` changed, and discarded otherwise. :class:`LeaseHeld` while a worker runs it.
    """
    job = queue.job(spec.name)
    _refuse_done(job, job.read_state())
    with queue.holding(spec.name, hint=_stop_first(spec.name, "its spec can be replaced")) as lease:
        state = job.read_state()  # again: it may have finished while the lease was being taken
        _refuse_done(job, state)
        try:
            old = job.read_spec()
        except DamagedFile:
            changed = ["(the old spec cannot be read)"]
        else:
            changed = spec_changes(old, spec)
        if not changed:
            return Replacement(spec.name, (), (), state.checkpoint, state.status)
        discard = tuple(field for field in changed if not field.startswith("(") and shapes_checkpoints(field))
        discard = discard or tuple(field for field in changed if field.startswith("("))
        generation, token = _fence_older_claims(job, state)
        _still_ours(lease, job, generation, token)
        # Renamed aside first (quick), removed last (slow on Drive): a kill in between leaves the new spec and
        # state written and only temporary folders behind, which the next replacement or deletion removes.
        aside = _move_training_aside(job) if discard else []
        _still_ours(lease, job, generation, token)
        storage.atomic_write_text(job.paths.spec, spec.to_yaml())
        now = job.clock()
        if discard:
            replaced = JobState(
                submitted_at=state.submitted_at, updated_at=now, generation=generation, fresh_from=generation
            )
        else:
            replaced = state.model_copy(
                update={
                    "status": JobStatus.QUEUED,
                    "generation": generation,
                    "error": None,
                    "finished_at": None,
                    "stopped_early": None,
                    "updated_at": now,
                }
            )
        _still_ours(lease, job, generation, token)
        job.write_state(replaced, generation=None)  # the marker this replacement created fences every older claim
        job.clear_cancel_request()
        job.events.append(
            "replaced",
            generation=generation,
            previous=state.status.value,
            changed=changed,
            discarded_because=list(discard),
            checkpoint=replaced.checkpoint,
        )
    for path in aside:
        storage.remove_tree(path)
    return Replacement(spec.name, tuple(changed), discard, replaced.checkpoint, replaced.status)


def _stop_first(name: str, then: str) -> str:
    return (
        f"`runner cancel {name}` stops it at its next checkpoint, after which {then} (if its session died, "
        "`runner work` takes the job over once its lease runs out)"
    )


def _refuse_done(job: Job, state: JobState) -> None:
    if state.status is JobStatus.DONE:
        raise InvalidTransition(
            job.name,
            "done",
            "queued",
            "a finished job is never trained again: submit the spec under a new name (or `runner delete` this one)",
        )


def _fence_older_claims(job: Job, state: JobState) -> tuple[int, str]:
    """Take a claim generation for this replacement, and the token in its marker: a worker of an older one (one
    that lost its lease without knowing it) can then no longer write state.json or commit a checkpoint of the old
    spec."""
    generation = max(state.generation, job.newest_claim_marker()) + 1
    storage.make_dirs(job.paths.claims)
    token = f"replaced {worker_identity()} {secrets.token_hex(8)}"
    if not storage.create_exclusive(job.paths.claim_marker(generation), token.encode()):
        raise _claimed_meanwhile(job)
    return generation, token


def _still_ours(lease: JobLease, job: Job, generation: int, token: str) -> None:
    """Before each write: the lease is still held, and the generation's marker still names this replacement. Two
    VMs can both create the marker, each in its own view of Drive, and the version uploaded last wins; the one
    that lost must write nothing."""
    _still_held(lease, job)
    try:
        job.check_claim(generation, token)
    except Fenced:
        raise _claimed_meanwhile(job) from None


def _claimed_meanwhile(job: Job) -> RunnerError:
    return RunnerError(
        f"job {job.name!r} was claimed or replaced on another machine while its spec was being replaced: "
        "`runner status` shows it now; run the command again if it is still needed"
    )


def _move_training_aside(job: Job) -> list[Path]:
    """Rename what training produced to temporary names (never seen half removed); the folders to remove.

    Temporary folders a killed replacement left behind are among them."""
    paths = job.paths
    aside = [paths.folder / name for name in storage.list_dir(paths.folder) if is_temp_name(name)]
    for path in (paths.checkpoints, paths.final, paths.tensorboard):
        if storage.exists(path):
            aside.append(temp_sibling(path))
            storage.rename(path, aside[-1])
    storage.remove_file(paths.history)
    return aside


def _still_held(lease: JobLease, job: Job) -> None:
    """:class:`Fenced` when the lease was lost while the replacement worked (a long removal on a failing Drive):
    another worker may have claimed the job since."""
    if (lost := lease.lost) is not None:
        raise Fenced(job.name, 0, f"lease lost while its spec was being replaced ({lost.reason}): try again")


def delete_job(queue: Queue, name: str, *, keep_checkpoints: bool = False) -> Deletion:
    """Remove a job from the queue; :class:`LeaseHeld` while a worker runs it.

    With ``keep_checkpoints``, its checkpoints and exports stay in ``<queue>/deleted/<name>-<time>/``.
    """
    job = queue.job(name)
    keep = keep_checkpoints and any(storage.exists(job.paths.folder / entry) for entry in KEPT_ON_DELETE)
    with queue.holding(name, hint=_stop_first(name, "it can be deleted")):
        if keep:
            aside = queue.paths.deleted(name, job.clock())
            storage.make_dirs(aside.parent)
        else:
            aside = temp_sibling(job.paths.folder, f"{name}-deleted")
        storage.rename(job.paths.folder, aside)  # one step: the job leaves the queue whole, and its name is free
    if not keep:
        storage.remove_tree(aside)
        return Deletion(name, None, asked_to_keep=keep_checkpoints)
    for entry in storage.list_dir(aside):
        if entry not in KEPT_ON_DELETE:
            path = aside / entry
            storage.remove(path)
    return Deletion(name, aside, asked_to_keep=keep_checkpoints)
