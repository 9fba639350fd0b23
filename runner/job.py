"""One job's folder: its lifecycle state (state.json), its frozen spec and its event log.

``state.json`` is only ever replaced atomically, and (once a worker has claimed the job) only by the holder of
the current claim generation: :meth:`Job.write_state` re-reads the generation on disk first (fencing), because a
lease on a network drive is a hint, not a guarantee.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from enum import Enum
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner import storage
from runner.errors import DamagedFile, Fenced, InvalidTransition, SpecError, StorageError
from runner.own_code import OwnCode
from runner.paths import JobPaths
from runner.spec import JobSpec, load_spec

Validated = TypeVar("Validated", bound=BaseModel)


class JobStatus(str, Enum):
    """Lifecycle of a job, as stored in state.json. ("interrupted" is derived: running with no live lease.)"""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    # running -> running is a new claim after the previous worker died (a resume).
    JobStatus.RUNNING: frozenset(
        {JobStatus.RUNNING, JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED}),
    JobStatus.DONE: frozenset(),
}
"""Allowed moves between statuses; everything else is refused with :class:`InvalidTransition`."""

FINISHED = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})
"""Statuses in which no worker will pick the job up."""


class JobState(BaseModel):
    """The content of state.json."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    status: JobStatus = JobStatus.QUEUED
    generation: int = Field(default=0, ge=0, description="claims so far; each claim increments it (fencing)")
    restarts: int = Field(default=0, ge=0, description="claims that resumed an interrupted run")
    submitted_at: float
    started_at: float | None = None
    updated_at: float
    finished_at: float | None = None
    worker: str | None = Field(default=None, description="host:pid of the current or last claim")
    error: str | None = Field(default=None, description="one-line reason for failure")
    epoch: int = Field(default=0, ge=0, description="completed epochs at the newest checkpoint")
    step: int = Field(default=0, ge=0, description="steps into the next epoch at the newest checkpoint")
    checkpoint: str | None = Field(default=None, description="newest committed checkpoint id")
    checkpoint_at: float | None = None
    batch_size: int | None = Field(
        default=None, ge=1, description="batch size in effect when out of memory halved it; None: the spec's"
    )
    metrics: dict[str, float] = Field(default_factory=dict, description="the last completed epoch's metrics")
    session_started_at: float | None = Field(default=None, description="when the current claim began")
    session_start_epoch: float = Field(default=0.0, description="progress, in epochs, when the current claim began")
    device: str | None = Field(default=None, description="what the current or last claim trains on: GPUs or CPU")
    devices: int | None = Field(
        default=None, ge=1, description="devices the current or last claim trains on in step (replicas of the model)"
    )
    backend: str | None = Field(default=None, description="the Keras backend of the current or last claim")
    trajectory_changed: str | None = Field(
        default=None,
        description="set when a session resumed on another number of devices or Keras backend than the checkpoint's",
    )
    stopped_early: str | None = Field(
        default=None, description="why a done job ended before its last epoch (training.early_stopping), one line"
    )
    fresh_from: int = Field(
        default=0,
        ge=0,
        description="claim generation from which training began anew, after `runner edit` changed the model or data",
    )

    def moved_to(self, status: JobStatus, *, job: str, now: float, **changes: Any) -> JobState:
        """This state in ``status``, if the transition table allows it."""
        if status not in TRANSITIONS[self.status]:
            raise InvalidTransition(job, self.status.value, status.value)
        finished_at = now if status in FINISHED else None
        return self.model_copy(update={"status": status, "updated_at": now, "finished_at": finished_at, **changes})


def worker_identity() -> str:
    """``host:pid`` of this process, as shown in status."""
    return f"{socket.gethostname()}:{os.getpid()}"


class EventLog:
    """events.jsonl: one JSON object per line, appended, never rewritten.

    A line cut short by a kill is skipped on reading; a line written twice by a retried append is read once
    (each event carries an id).
    """

    def __init__(self, paths: JobPaths, *, clock: Any = time.time) -> None:
        self._path, self._clock = paths.events, clock

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Record ``event`` with its fields, the time and a unique id."""
        record = {"time": round(self._clock(), 3), "event": event, **fields, "id": uuid.uuid4().hex[:16]}
        storage.append_line(self._path, json.dumps(record, sort_keys=False, default=str))
        return record

    def read(self) -> list[dict[str, Any]]:
        """Every readable event, in order, each once."""
        return list(self._iter())

    def _iter(self) -> Iterator[dict[str, Any]]:
        try:
            data = storage.read_bytes(self._path)
        except StorageError as error:
            if error.errno_ == 2:  # ENOENT: no events yet
                return
            raise
        seen: set[str] = set()
        for line in data.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or record.get("id") in seen:
                continue
            seen.add(record.get("id", ""))
            yield record


class Job:
    """A job folder: state, spec and events, read and written safely."""

    def __init__(self, paths: JobPaths, *, clock: Any = time.time) -> None:
        self.paths, self.clock = paths, clock
        self.events = EventLog(paths, clock=clock)

    @property
    def name(self) -> str:
        """The job's name."""
        return self.paths.name

    def read_state(self) -> JobState:
        """The job's state; :class:`DamagedFile` when state.json is missing or unreadable."""
        return self._read_validated(self.paths.state, JobState)

    def read_spec(self) -> JobSpec:
        """The frozen spec; :class:`DamagedFile` when it no longer validates."""
        try:
            return load_spec(self.paths.spec)
        except SpecError as error:
            raise DamagedFile(str(self.paths.spec), "; ".join(error.problems)) from None

    def read_code(self) -> OwnCode:
        """What a job of the user's own code records (``code.json``); :class:`DamagedFile` when unreadable."""
        return self._read_validated(self.paths.code, OwnCode)

    @staticmethod
    def _read_validated(path: Any, model: type[Validated]) -> Validated:
        """A JSON file of the job folder as ``model``; :class:`DamagedFile` when missing or not valid."""
        try:
            data = storage.read_json(path)
        except StorageError as error:
            if error.errno_ == 2:
                raise DamagedFile(str(path), "missing") from None
            raise
        try:
            return model.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(top level)"
            raise DamagedFile(str(path), f"{where}: {first['msg']}") from None

    def is_own_code(self) -> bool:
        """Whether the job is trained by the user's own code (it has ``code.json`` and no spec)."""
        return storage.exists(self.paths.code) and not storage.exists(self.paths.spec)

    def write_state(self, state: JobState, *, generation: int | None) -> None:
        """Replace state.json; with ``generation``, only while that claim is still the current one."""
        if generation is not None:
            self.check_generation(generation)
        storage.atomic_write_json(self.paths.state, state.model_dump(mode="json"))

    def check_generation(self, generation: int) -> JobState:
        """The state on disk; :class:`Fenced` if a claim newer than ``generation`` exists.

        Two witnesses: the next claim's marker (created exclusively, never removed, so a frozen writer that wakes
        up and replaces state.json with its stale copy cannot roll it back), and the generation in state.json.
        A state.json showing an *older* generation was rolled back by such a writer; the current holder's next
        write repairs it.
        """
        if storage.exists(self.paths.claim_marker(generation + 1)):
            raise Fenced(self.name, generation, f"generation {generation + 1} has claimed the job since")
        try:
            state = self.read_state()
        except DamagedFile as error:
            raise Fenced(self.name, generation, f"state.json unreadable: {error.reason}") from None
        if state.generation > generation:
            raise Fenced(self.name, generation, f"generation {state.generation} has claimed the job since")
        return state

    def check_claim(self, generation: int, token: str) -> None:
        """:class:`Fenced` if the marker of ``generation`` names another claim than ``token``.

        On one machine the marker's exclusive create decides who claims a generation. Two VMs on one Drive can
        both create it, each in its own view, and Drive keeps the version uploaded last: once that version reaches
        the other VM, the claim it does not name is fenced. A marker without a token (written by an older runner,
        or unreadable for now) fences nobody. A marker that is gone fences its claim: the job was deleted (its
        folder moved away) since, and a job of the same name submitted again must not receive this claim's writes.
        """
        if not storage.exists(self.paths.claim_marker(generation)):
            raise Fenced(self.name, generation, "its claim marker is gone: the job was deleted (or submitted again) since")
        holder = self.claim_token(generation)
        if holder is not None and holder != token:
            raise Fenced(self.name, generation, f"another machine claimed generation {generation} at the same time")

    def claim_token(self, generation: int) -> str | None:
        """The token in the marker of ``generation`` (``None`` when missing, empty or unreadable)."""
        try:
            marker = storage.read_bytes(self.paths.claim_marker(generation))
        except StorageError:
            return None
        return marker.decode("utf-8", errors="replace").strip() or None

    def newest_claim_marker(self) -> int:
        """The highest claim generation with a marker (0 when none)."""
        generations = [int(name[1:]) for name in storage.list_dir(self.paths.claims) if name[1:].isdigit()]
        return max(generations, default=0)

    def request_cancel(self) -> None:
        """Ask the worker running this job to stop it at its next checkpoint."""
        storage.atomic_write_text(self.paths.cancel_request, f"{self.clock()}\n")

    def cancel_requested(self) -> bool:
        """Whether a cancel is waiting to be honoured (``False`` while the folder cannot be read: asked again later)."""
        try:
            return self.paths.cancel_request.exists()
        except OSError:  # Path.exists() raises ENOTCONN/EIO: a struggling mount must not fail the job
            return False

    def clear_cancel_request(self) -> None:
        """Forget a cancel request (it was honoured, or the job is retried)."""
        storage.remove_file(self.paths.cancel_request)
