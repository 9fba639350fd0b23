"""The worker: claim the next runnable job, hold its lease, run its trainer, record the outcome, repeat.

A job that raises is marked failed with a one-line reason (the traceback goes to the job's log) and the worker
goes on with the next one. SIGTERM or SIGINT asks the trainer to checkpoint and stop; a second one stops at once
(the job then resumes from its last published checkpoint).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from rich.console import Console
from rich.markup import escape

from runner import defaults, storage
from runner.checkpoints import CheckpointStore
from runner.device import describe_devices, detect_gpus
from runner.errors import Fenced, RunnerError, StorageError, UsageError
from runner.job import Job, JobStatus
from runner.joblog import JobLogHandler
from runner.lease import JobLease, LeaseHolder
from runner.queue import Claim, JobView, Queue
from runner.recovery import repair_damaged_state
from runner.training import Outcome, RunContext, TrainerFactory

log = logging.getLogger(__name__)


_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

_MAX_RECLAIMS = 3
"""Times one `runner work` claims a job again after its lease vanished, before it gives the job up."""


def _stopping_now(job: Job) -> str:
    """What a second Ctrl-C leaves: the newest checkpoint the next `runner work` continues from."""
    storage.set_retry_budget(min(storage.retry_budget(), 2.0))  # stopping now: no minutes of retries
    try:
        state = job.read_state()
    except (RunnerError, OSError):  # the folder fails: say what is certain
        return f"stopping now; job {job.name!r} continues from its newest checkpoint with `runner work`"
    if state.checkpoint is None:
        return f"stopping now; job {job.name!r} has no checkpoint yet: `runner work` starts it again"
    return (
        f"stopping now; the last checkpoint of job {job.name!r} is {state.checkpoint} (epoch {state.epoch}, step "
        f"{state.step}): `runner work` continues from there"
    )


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers :meth:`Worker.install_signal_handlers` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def is_storage_trouble(error: BaseException) -> bool:
    """A full disk or quota anywhere, or the job folder's storage failing past its retries."""
    if isinstance(error, StorageError):
        return error.transient or error.errno_ in _SPACE_ERRNOS
    return isinstance(error, OSError) and error.errno in _SPACE_ERRNOS


def one_line(error: BaseException) -> str:
    """An exception as a single line: the runner's own message, or its type and message."""
    text = str(error) if isinstance(error, RunnerError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split()) or type(error).__name__


@dataclass
class WorkResult:
    """What one ``runner work`` did."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    time_limited: list[str] = field(default_factory=list)
    """Jobs stopped with a checkpoint because the time limit (``--max-hours``) came."""
    time_limit_reached: bool = False
    signal: int | None = None

    @property
    def exit_code(self) -> int:
        """0 when every job run ended done or cancelled, 1 if one failed or lost its lease, 75 when the time limit
        stopped the work with jobs left, 128+N after signal N."""
        if self.signal is not None:
            return 128 + self.signal
        if self.failed or self.interrupted:
            return 1
        return defaults.EXIT_TIME_LIMIT if self.time_limit_reached else 0


class Worker:
    """Runs the runnable jobs of a queue, one at a time, until none is left."""

    def __init__(
        self,
        queue: Queue,
        trainer_factory: TrainerFactory,
        *,
        console: Console | None = None,
        only: str | None = None,
        wait_for_silent_leases: bool = True,
        sleep: Callable[[float], None] = time.sleep,
        max_hours: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        detect_device: Callable[[], str] | None = None,
    ) -> None:
        self.queue, self.trainer_factory = queue, trainer_factory
        self.console = console or Console(stderr=True)
        self.only, self.wait_for_silent_leases, self.sleep = only, wait_for_silent_leases, sleep
        self.clock = clock
        self.deadline = None if max_hours is None else clock() + max_hours * 3600
        self._detect_device = detect_device or (lambda: describe_devices(detect_gpus()))
        self._device: str | None = None
        self.stop = threading.Event()
        self._signals_seen = 0
        self._reclaims: dict[str, int] = {}
        self.result = WorkResult()

    # --- signals --------------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM/SIGINT: first one checkpoints and stops, second one stops at once.

        Returns the handlers replaced, for :func:`restore_signal_handlers` (a notebook's kernel keeps its own).
        """
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals_seen += 1
        self.result.signal = signum
        if self._signals_seen > 1:
            raise KeyboardInterrupt
        self.console.print(f"[yellow]{signal.Signals(signum).name}: saving a checkpoint and stopping[/]")
        self.stop.set()

    # --- the loop -------------------------------------------------------------------------------------------

    def run(self) -> WorkResult:
        """Claim and run jobs until nothing runnable is left or a signal arrives."""
        if self.only is not None:
            job = self.queue.job(self.only)  # JobNotFound early, before any claim
            if job.is_own_code():
                raise UsageError(
                    f"job {self.only!r} is trained by the user's own code (runner.fit), not by a spec: `runner work` "
                    "cannot build its model; run that code again, with the same job name, to resume it"
                )
        attempted: set[str] = set()
        while not self.stop.is_set():
            if self._past_deadline():
                self.result.time_limit_reached = bool(self._candidates(attempted))
                if self.result.time_limit_reached:
                    self.console.print("[yellow]time limit reached: no new job started[/]")
                break
            claimed = self._claim_next(attempted)
            if claimed is None:
                break
            attempted.add(claimed.job.name)
            if self._run(claimed):
                attempted.discard(claimed.job.name)  # its lease vanished with nobody else claiming: go again
        return self.result

    def _candidates(self, attempted: set[str]) -> list[JobView]:
        return [
            view
            for view in self.queue.views()
            if view.wants_worker and view.name not in attempted and self.only in (None, view.name)
        ]

    def _claim_next(self, attempted: set[str]) -> Claim | None:
        candidates = self._candidates(attempted)
        for view in candidates:
            if (claim := self._try_claim(view.name, wait=False)) is not None:
                return claim
        if self.wait_for_silent_leases:
            # Nothing was free. A holder elsewhere may be dead (a closed Colab tab) or alive: wait for each, oldest
            # heartbeat first, until it heartbeats (alive: leave it) or stays silent for the lease duration.
            held = [view for view in candidates if view.holder is not None and not view.holder.alive_on_this_host()]
            for view in sorted(held, key=lambda view: view.holder.heartbeat_at if view.holder else 0.0):
                if (claim := self._try_claim(view.name, wait=True)) is not None:
                    return claim
        for view in candidates:
            if view.name not in attempted:
                self.result.skipped.append(view.name)
                attempted.add(view.name)
        return None

    def _try_claim(self, name: str, *, wait: bool) -> Claim | None:
        lease = self.queue.lease(name)
        acquired = lease.try_acquire() or (wait and self._wait_for(name, lease))
        if not acquired:
            return None
        paths = self.queue.paths.job(name)
        if not storage.exists(paths.spec):
            # Deleted between the listing and the lease, which made the job's folder again for its marker: leave
            # no trace of it (the folder holds nothing but the marker, gone with the release).
            lease.release()
            with contextlib.suppress(OSError):
                paths.folder.rmdir()
            return None
        try:
            if (recovered := repair_damaged_state(self.queue.job(name))) is not None:
                self.console.print(
                    f"[yellow]job {name!r}: state.json was damaged; rebuilt it from events and checkpoints "
                    f"({recovered.status.value}, checkpoint {recovered.checkpoint})[/]"
                )
            claim = self.queue.claim(name, lease, device=self.device)
        except BaseException:
            lease.release()
            raise
        if claim is None:
            lease.release()
        return claim

    def _wait_for(self, name: str, lease: JobLease) -> bool:
        status = self.console.status(f"job {name!r}: waiting for its silent lease to expire")
        with status:

            def report(holder: LeaseHolder | None, seconds_left: float) -> None:
                owner = holder.describe() if holder else "a worker"
                status.update(
                    f"job {name!r} is leased by {owner}, which has gone silent: "
                    f"taking over in {seconds_left:.0f}s unless it heartbeats"
                )

            taken = lease.wait_for_takeover(report=report, sleep=self.sleep)
        if not taken:
            self.console.print(f"job {name!r}: its worker is alive; leaving it to that worker")
        return taken

    # --- one job --------------------------------------------------------------------------------------------

    def _run(self, claim: Claim) -> bool:
        """Run one claimed job; ``True`` when it should be claimed again at once (its lease vanished)."""
        job, name = claim.job, claim.job.name
        handler = JobLogHandler(job, claim.generation)
        job_log = logging.getLogger(f"runner.job.{name}")
        job_log.addHandler(handler)
        job_log.setLevel(logging.INFO)
        # Its records are for runner.log; the console gets its own lines. Propagated, they would be printed a
        # second time (as "INFO:runner.job...") once a library gives the root logger a handler, as Keras' legacy
        # .h5 warning does.
        job_log.propagate = False
        # Retry warnings and checkpoint fallbacks belong in the job's log too.
        shared = [logging.getLogger("runner.storage"), logging.getLogger("runner.checkpoints")]
        for logger in shared:
            logger.addHandler(handler)
        try:
            self._run_claimed(claim, job_log)
        except Fenced as fenced:
            if self._lease_vanished(claim, fenced, job_log):
                return True
            self.console.print(f"[red]{escape(str(fenced))}[/]", soft_wrap=True)
            self.result.interrupted.append(name)
        finally:
            job_log.removeHandler(handler)
            for logger in shared:
                logger.removeHandler(handler)
            claim.lease.release()
        return False

    def _lease_vanished(self, claim: Claim, fenced: Fenced, job_log: logging.Logger) -> bool:
        """Whether the lease was lost while no other worker claimed the job (its marker deleted, say)."""
        lost = claim.lease.lost
        name = claim.job.name
        if lost is None or self.stop.is_set() or self._reclaims.get(name, 0) >= _MAX_RECLAIMS:
            return False
        try:
            claim.job.check_generation(claim.generation)
        except (Fenced, RunnerError, OSError):
            return False  # another worker has claimed it: leave it to them
        self._reclaims[name] = self._reclaims.get(name, 0) + 1
        claim.job.events.append("lease-lost", generation=claim.generation, reason=lost.reason)
        job_log.warning("lease lost (%s) with no other claim; claiming the job again", lost.reason)
        self.console.print(f"[yellow]job {name!r}: lease lost ({lost.reason}); claiming it again[/]")
        return True

    def _run_claimed(self, claim: Claim, job_log: logging.Logger) -> None:
        job, name = claim.job, claim.job.name
        store = CheckpointStore(
            job,
            keep=claim.spec.checkpoint.keep,
            fence=claim.fence,
            claim_token=claim.token,
            fresh_from=claim.claimed.fresh_from,
        )
        if garbage := store.collect_garbage():
            job_log.info("removed %d unfinished checkpoint folder(s) of an earlier session", len(garbage))
        if job.cancel_requested():
            self._finish(claim, JobStatus.CANCELLED, job_log)
            return
        verb = "resuming" if claim.resumed else "starting"
        self.console.print(f"[bold]{verb} job {name!r}[/] (claim generation {claim.generation})")
        job_log.info("%s on %s, claim generation %d", verb, claim.lease.paths.folder, claim.generation)
        context = RunContext(
            claim=claim,
            store=store,
            stop=self.stop,
            log=job_log,
            console=self.console,
            clock=self.clock,
            deadline=self.deadline,
        )
        try:
            outcome = self.trainer_factory().train(context)
        except Fenced:
            raise
        except KeyboardInterrupt:
            self.result.interrupted.append(name)
            job.events.append("interrupted", generation=claim.generation, reason="second signal")
            self.console.print(_stopping_now(job), markup=False, soft_wrap=True)
            raise
        except Exception as error:  # a job's failure must not stop the queue
            if is_storage_trouble(error):
                self._interrupt_for_storage(claim, job_log, error)
            else:
                reason = one_line(error)
                job_log.error("failed: %s\n%s", reason, traceback.format_exc())
                self._finish(claim, JobStatus.FAILED, job_log, error=reason)
            return
        if outcome is Outcome.DONE:
            self._finish(claim, JobStatus.DONE, job_log)
        elif job.cancel_requested():
            self._finish(claim, JobStatus.CANCELLED, job_log)
        elif context.past_deadline() and not self.stop.is_set():
            self._stop_for_time_limit(claim, job_log)
        else:
            claim.fence()
            reason = "signal" if self.stop.is_set() else "stopped"
            job.events.append("interrupted", generation=claim.generation, reason=reason)
            job_log.info("stopped (%s); the next `runner work` resumes it", reason)
            self.console.print(f"job {name!r} stopped; run `runner work` again to resume it")
            self.result.interrupted.append(name)

    def _stop_for_time_limit(self, claim: Claim, job_log: logging.Logger) -> None:
        claim.fence()
        job, name = claim.job, claim.job.name
        job.events.append("interrupted", generation=claim.generation, reason="max-hours")
        job_log.info("stopped at the time limit (--max-hours); the next `runner work` resumes it")
        self.console.print(
            f"[yellow]job {name!r} stopped at the time limit (--max-hours) with its checkpoint saved[/]; "
            "run `runner work` again in a new session to resume it"
        )
        self.result.time_limited.append(name)
        self.result.time_limit_reached = True
        self.stop.set()

    # --- device and time ------------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        """What this session trains on, asked once (nvidia-smi), when the first job is claimed."""
        if self._device is None:
            self._device = self._detect_device()
        return self._device

    def _past_deadline(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def _prune_done(self, claim: Claim, job_log: logging.Logger) -> None:
        """Free Drive space once the job is done (``checkpoint.keep_done``), never before it is recorded done: a
        kill in between leaves a checkpoint too many, never a job without one to resume from."""
        keep = claim.spec.checkpoint.keep_done
        try:
            removed = CheckpointStore(claim.job, keep=claim.spec.checkpoint.keep).prune_done(keep)
        except (OSError, RunnerError) as error:  # the job is done all the same
            job_log.warning("could not remove the checkpoints a done job does not keep: %s", one_line(error))
            return
        if removed:
            job_log.info("done: removed checkpoints %s (checkpoint.keep_done: %d)", ", ".join(removed), keep)
            claim.job.events.append("pruned", generation=claim.generation, removed=removed, keep_done=keep)

    def _interrupt_for_storage(self, claim: Claim, job_log: logging.Logger, error: Exception) -> None:
        """Storage trouble is not the job's fault: keep it resumable, say why, and stop this worker."""
        job, name = claim.job, claim.job.name
        if isinstance(error, OSError) and not isinstance(error, StorageError):
            error = storage.storage_error(error)  # the path and what to do, not just "[Errno 28]"
        reason = one_line(error)
        job_log.error("interrupted by storage: %s\n%s", reason, traceback.format_exc())
        self.console.print(
            f"[red]job {name!r} interrupted: {escape(reason)}[/]; run `runner work` again once fixed", soft_wrap=True
        )
        self.result.interrupted.append(name)
        self.stop.set()  # a full or failing disk stops every job alike: do not burn through the queue
        try:  # the failed write freed its temporary files, so these small ones usually fit
            claim.update(error=reason)
            job.events.append("interrupted", generation=claim.generation, reason=reason)
        except (OSError, RunnerError) as also:
            job_log.error("could not record the interruption: %s", one_line(also))

    def _finish(self, claim: Claim, status: JobStatus, job_log: logging.Logger, *, error: str | None = None) -> None:
        job, name = claim.job, claim.job.name
        claim.finish(status, error=error)
        if status is JobStatus.DONE:  # recorded done first; its story still ends with the done event and line
            self._prune_done(claim, job_log)
        if status is JobStatus.CANCELLED:
            job.clear_cancel_request()
        details = {"error": error} if error else {}
        job.events.append(status.value, generation=claim.generation, **details)
        job_log.info("%s%s", status.value, f": {error}" if error else "")
        colour = {JobStatus.DONE: "green", JobStatus.FAILED: "red"}.get(status, "yellow")
        # soft_wrap: a reason stays one line however narrow the terminal, as in the job's log and state.
        self.console.print(
            f"[{colour}]job {name!r} {status.value}[/]" + (f": {escape(error)}" if error else ""), soft_wrap=True
        )
        getattr(self.result, status.value).append(name)
