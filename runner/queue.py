"""A queue: a folder of job folders. Submit, list in claim order, claim, cancel and retry.

Every change of a job's state.json happens under the job's lease, and is fenced by the claim generation, so a
cancel from a notebook and a worker on another machine never overwrite each other's state.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import defaults, storage
from runner.errors import (
    DamagedFile,
    Fenced,
    InvalidTransition,
    JobExists,
    JobNotFound,
    LeaseHeld,
    RunnerError,
)
from runner.job import FINISHED, Job, JobState, JobStatus, worker_identity
from runner.lease import JobLease, LeaseHolder, read_holder
from runner.own_code import OwnCode
from runner.paths import JobPaths, QueuePaths, is_temp_name
from runner.spec import JobSpec, load_spec

INTERRUPTED = "interrupted"
"""Shown state of a job stored as running whose lease is no longer kept alive by anyone."""

_STALE_SUBMIT_S = 3600.0

_CLAIM_FIELDS = (
    "generation",
    "restarts",
    "worker",
    "started_at",
    "session_started_at",
    "session_start_epoch",
    "device",
    "fresh_from",
)
"""What a claim sets in state.json (or takes from it, as ``fresh_from``), and so owns until the next claim."""


@dataclass(frozen=True)
class JobView:
    """What status shows of one job: read once, never raises for a damaged folder."""

    name: str
    spec: JobSpec | None
    state: JobState | None
    holder: LeaseHolder | None
    problem: str | None
    lease_duration: float
    folder: Path | None = None
    """The job's folder."""
    code: OwnCode | None = None
    """What a job trained by the user's own code records in place of a spec (``runner.fit``); ``None`` for a spec's."""

    @property
    def epochs(self) -> int | None:
        """The epochs the job trains for, from its spec or (own code) its newest call."""
        if self.spec is not None:
            return self.spec.training.epochs
        return self.code.epochs if self.code is not None else None

    def shown_state(self, now: float) -> str:
        """queued | running | interrupted | done | failed | cancelled."""
        if self.state is None or self.problem is not None:
            return JobStatus.FAILED.value  # no worker will run a folder it cannot read
        if self.state.status is JobStatus.RUNNING and not self.lease_alive(now):
            return INTERRUPTED
        return self.state.status.value

    def lease_alive(self, now: float) -> bool:
        """Whether a worker seems to be keeping this job's lease alive."""
        holder = self.holder
        return holder is not None and not holder.dead_on_this_host() and holder.heartbeat_age(now) < self.lease_duration

    @property
    def error(self) -> str | None:
        """Why the job failed or cannot be read, in one line."""
        return self.problem or (self.state.error if self.state else None)

    def claim_order(self) -> tuple[Any, ...]:
        """Higher priority first, then earlier submission, then name."""
        priority = self.spec.priority if self.spec else 0
        submitted = self.state.submitted_at if self.state else float("inf")
        return (-priority, submitted, self.name)

    @property
    def wants_worker(self) -> bool:
        """Whether a worker should claim the job if its lease is free: queued or running, or a damaged state.json
        next to a readable spec (the claiming worker rebuilds it); never a job whose spec cannot be read."""
        if self.spec is None:
            return False
        return self.state is None or self.state.status in (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass
class Claim:
    """A worker's claim on a job: its lease and the generation that fences its writes."""

    job: Job
    spec: JobSpec | None
    """The job's frozen spec; ``None`` for a job of the user's own code (``runner.fit``)."""
    lease: JobLease
    generation: int
    resumed: bool
    claimed: JobState
    """The state this claim wrote; its claim fields are written again with every update."""
    token: str = ""
    """What this claim wrote into its generation's marker: tells it apart from a claim of the same generation
    made on another VM at the same moment (Drive has no cross-VM exclusive create)."""

    def fence(self) -> None:
        """Raise :class:`Fenced` if this claim is no longer current: lease lost or a newer generation."""
        self._current_state()

    def _current_state(self) -> JobState:
        if (lost := self.lease.lost) is not None:
            raise Fenced(self.job.name, self.generation, f"lease lost ({lost.reason})")
        if self.token:
            self.job.check_claim(self.generation, self.token)
        return self.job.check_generation(self.generation)

    def _claim_fields(self) -> dict[str, Any]:
        # Written with every update: this repairs a state.json that a frozen stale writer rolled back.
        return {field: getattr(self.claimed, field) for field in _CLAIM_FIELDS}

    def update(self, **changes: Any) -> JobState:
        """Write progress into state.json, fenced."""
        update = {**changes, **self._claim_fields(), "updated_at": self.job.clock()}
        state = self._current_state().model_copy(update=update)
        self.job.write_state(state, generation=None)  # just checked: one read per write on a slow mount
        return state

    def finish(self, status: JobStatus, *, error: str | None = None) -> JobState:
        """Move the job to a final status, fenced."""
        state = self._current_state().moved_to(
            status, job=self.job.name, now=self.job.clock(), error=error, **self._claim_fields()
        )
        self.job.write_state(state, generation=None)  # just checked
        return state


def claim_settle_seconds(lease_duration: float) -> float:
    """How long a claim waits for the state of a job stored as running whose lease was released: a quarter of the
    lease duration (which is longer on Drive, where writes take longer to arrive), at most 15 s."""
    return min(lease_duration / 4, defaults.CLAIM_SETTLE_MAX_S)


class Queue:
    """A folder of jobs."""

    def __init__(
        self,
        root: str | Path,
        *,
        lease_duration: float = defaults.LEASE_DURATION_S,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.root = Path(root)
        self.paths = QueuePaths(self.root)
        self.lease_duration, self.clock, self.sleep = lease_duration, clock, sleep

    def __repr__(self) -> str:
        return f"Queue({str(self.root)!r})"

    def names(self) -> list[str]:
        """Names of the jobs in the queue (folders being submitted excluded)."""
        return [name for name in storage.list_dir(self.paths.jobs) if not is_temp_name(name)]

    def job(self, name: str) -> Job:
        """The job called ``name``; :class:`JobNotFound` if there is none."""
        paths = self.paths.job(name)
        if is_temp_name(name) or "/" in name or not storage.is_dir(paths.folder):
            raise JobNotFound(name, str(self.root))
        return Job(paths, clock=self.clock)

    def lease(self, name: str, **options: Any) -> JobLease:
        """A (not yet acquired) lease on a job, with this queue's lease duration."""
        return JobLease(self.paths.job(name), duration=self.lease_duration, **options)

    # --- submit ---------------------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> tuple[Job, bool]:
        """Add a job; returns it and whether it was new. An identical spec already queued is not an error."""
        existing = self.paths.job(spec.name)
        if storage.exists(existing.folder):
            return self._existing(spec), False
        storage.make_dirs(self.paths.jobs)
        self._collect_abandoned_submissions()
        now = self.clock()
        temp = self.paths.job_in_progress(spec.name)
        try:
            storage.make_dirs(temp)
            job = Job(JobPaths(temp), clock=self.clock)
            storage.atomic_write_text(job.paths.spec, spec.to_yaml())
            storage.atomic_write_json(
                job.paths.state, JobState(submitted_at=now, updated_at=now).model_dump(mode="json")
            )
            job.events.append("submitted", priority=spec.priority, epochs=spec.training.epochs)
            try:
                storage.commit_dir(temp, existing.folder)
            except OSError as error:
                if storage.exists(existing.folder):
                    return self._existing(spec), False
                raise error
        finally:
            storage.remove_tree(temp)
        return Job(existing, clock=self.clock), True

    def create_own_code(self, name: str, code: OwnCode) -> tuple[Job, bool]:
        """Make the folder of job ``name``, trained by the user's own code (``code.json`` instead of a spec),
        queued, as a submit makes a spec's: in a temporary folder renamed into place. Returns the job and whether
        it was new; an existing folder is left as it is (the caller checks what it is)."""
        existing = self.paths.job(name)
        if storage.exists(existing.folder):
            return Job(existing, clock=self.clock), False
        storage.make_dirs(self.paths.jobs)
        now = self.clock()
        temp = self.paths.job_in_progress(name)
        try:
            storage.make_dirs(temp)
            job = Job(JobPaths(temp), clock=self.clock)
            storage.atomic_write_json(job.paths.code, code.model_dump(mode="json"))
            storage.atomic_write_json(
                job.paths.state, JobState(submitted_at=now, updated_at=now).model_dump(mode="json")
            )
            job.events.append("submitted", by=code.kind, epochs=code.epochs)
            try:
                storage.commit_dir(temp, existing.folder)
            except OSError as error:
                if storage.exists(existing.folder):
                    return Job(existing, clock=self.clock), False
                raise error
        finally:
            storage.remove_tree(temp)
        return Job(existing, clock=self.clock), True

    def submit_file(self, path: str | Path) -> tuple[Job, bool]:
        """Validate a spec file and add its job."""
        return self.submit(load_spec(path))

    def _existing(self, spec: JobSpec) -> Job:
        job = Job(self.paths.job(spec.name), clock=self.clock)
        try:
            same = job.read_spec() == spec
        except (DamagedFile, RunnerError):
            same = False
        if not same:
            raise JobExists(spec.name, str(self.root))
        return job

    def _collect_abandoned_submissions(self) -> None:
        now = time.time()
        for name in storage.list_dir(self.paths.jobs):
            path = self.paths.jobs / name
            try:
                stale = is_temp_name(name) and now - path.stat().st_mtime > _STALE_SUBMIT_S
            except OSError:
                continue
            if stale:
                storage.remove_tree(path)

    # --- read -----------------------------------------------------------------------------------------------

    def view(self, name: str) -> JobView:
        """A job as status shows it; damage is reported in ``problem``, never raised."""
        job = self.job(name)
        spec = state = code = None
        problems = []
        try:
            spec = job.read_spec()
        except RunnerError as error:
            try:  # no spec: a job of the user's own code has code.json instead (one more read, for those only)
                code = job.read_code() if storage.exists(job.paths.code) else None
            except RunnerError as also:
                problems.append(str(also))
            else:
                if code is None:
                    problems.append(str(error))
        try:
            state = job.read_state()
        except RunnerError as error:
            problems.append(str(error))
        return JobView(
            name=name,
            spec=spec,
            state=state,
            holder=read_holder(job.paths),
            problem="; ".join(problems) or None,
            lease_duration=self.lease_duration,
            folder=job.paths.folder,
            code=code,
        )

    def views(self) -> list[JobView]:
        """Every job, in claim order."""
        views = []
        for name in self.names():
            try:
                views.append(self.view(name))
            except JobNotFound:
                continue  # removed while listing
        return sorted(views, key=JobView.claim_order)

    # --- claim ----------------------------------------------------------------------------------------------

    def claim(
        self, name: str, lease: JobLease, *, device: str | None = None, own_code: bool = False
    ) -> Claim | None:
        """With ``lease`` held, make this worker the job's current claim; ``None`` if it needs no running.

        ``device`` (what this session trains on) is recorded in state.json and the ``claimed`` event. ``own_code``:
        the job has no spec, the user's own code trains it (``runner.fit``).
        """
        if not lease.held:
            holder = read_holder(lease.paths)
            raise LeaseHeld(name, holder.describe() if holder else "nobody (the lease is not held)")
        job = self.job(name)
        state = job.read_state()
        if state.status is JobStatus.RUNNING and lease.found_free:
            state = self._settled(job, state, lease)
        spec = None if own_code else job.read_spec()
        if state.status in FINISHED:
            return None
        now = self.clock()
        resumed = state.status is JobStatus.RUNNING or state.checkpoint is not None
        generation = max(state.generation, job.newest_claim_marker()) + 1
        storage.make_dirs(job.paths.claims)
        token = f"{worker_identity()} {secrets.token_hex(8)}"
        if not storage.create_exclusive(job.paths.claim_marker(generation), token.encode()):
            # Another worker claimed this generation between our read and now: it won.
            raise LeaseHeld(name, "another worker that claimed it at the same moment")
        claimed = state.moved_to(
            JobStatus.RUNNING,
            job=name,
            now=now,
            generation=generation,
            restarts=state.restarts + (1 if resumed else 0),
            worker=worker_identity(),
            started_at=state.started_at or now,
            session_started_at=now,
            session_start_epoch=float(state.epoch),
            error=None,
            device=device,
        )
        job.write_state(claimed, generation=None)  # the exclusive marker decided who claims this generation
        job.events.append(
            "claimed",
            generation=generation,
            worker=claimed.worker,
            previous=state.status.value,
            resumed=resumed,
            device=device,
        )
        return Claim(
            job=job, spec=spec, lease=lease, generation=generation, resumed=resumed, claimed=claimed, token=token
        )

    def _settled(self, job: Job, state: JobState, lease: JobLease) -> JobState:
        """The job's state once a write in flight has had time to arrive: it is stored as running, yet its lease
        was released rather than left behind by a dead worker. On Drive, a worker's last state write (done,
        interrupted) can reach another VM after the removal of its lease marker that followed it; claiming at once
        would run a finished job again."""
        waited, step, settle = 0.0, 0.25, claim_settle_seconds(lease.duration)
        while waited < settle:
            self.sleep(step)
            waited += step
            state = job.read_state()
            if state.status is not JobStatus.RUNNING:
                break
        return state

    @contextmanager
    def holding(self, name: str, *, hint: str = "") -> Iterator[JobLease]:
        """Hold the job's lease for the block: :class:`LeaseHeld` (with ``hint``) while a live worker runs it."""
        lease = self.lease(name)
        if not lease.try_acquire():
            holder = read_holder(lease.paths)
            raise LeaseHeld(name, holder.describe() if holder else "another worker", hint=hint)
        try:
            yield lease
        finally:
            lease.release()

    # --- cancel and retry -----------------------------------------------------------------------------------

    def cancel(self, name: str) -> str:
        """Cancel a job: at once when no worker runs it, else its worker saves a checkpoint and stops within seconds."""
        job = self.job(name)
        state = job.read_state()
        if state.status is JobStatus.CANCELLED:
            return f"job {name!r} is already cancelled"
        if state.status in FINISHED:
            raise InvalidTransition(name, state.status.value, "cancelled", "it has already finished")
        job.request_cancel()
        try:
            with self.holding(name):
                state = job.read_state()
                if state.status in FINISHED:
                    job.clear_cancel_request()
                    return f"job {name!r} finished ({state.status.value}) before the cancel"
                cancelled = state.moved_to(JobStatus.CANCELLED, job=name, now=self.clock(), error=None)
                job.write_state(cancelled, generation=state.generation)
                job.clear_cancel_request()
                job.events.append("cancelled", generation=state.generation)
                return f"job {name!r} cancelled"
        except LeaseHeld as held:
            job.events.append("cancel-requested")
            return f"job {name!r} is being run by {held.owner}: it saves a checkpoint and stops within seconds"

    def retry(self, name: str) -> str:
        """Put a failed or cancelled job back in the queue; it resumes from its checkpoints."""
        job = self.job(name)
        state = job.read_state()
        hints = {
            JobStatus.DONE: "finished jobs are never trained again; submit the spec under a new name",
            JobStatus.QUEUED: "it is already waiting for a worker",
            JobStatus.RUNNING: "it is running or interrupted; `runner work` resumes it",
        }
        if state.status in hints:
            raise InvalidTransition(name, state.status.value, "queued", hints[state.status])
        with self.holding(name):
            state = job.read_state()
            queued = state.moved_to(JobStatus.QUEUED, job=name, now=self.clock(), error=None)
            job.write_state(queued, generation=state.generation)
            job.clear_cancel_request()
            job.events.append("retried", previous=state.status.value, checkpoint=state.checkpoint)
        where = f" from checkpoint {state.checkpoint}" if state.checkpoint else ""
        return f"job {name!r} is queued again and will resume{where}"
