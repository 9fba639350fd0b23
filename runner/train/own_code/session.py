"""One session of a job trained by the user's own code: the job folder, its lease and claim, the restore, the
snapshots published in the background, and the end (done, stopped, or interrupted).

The same parts as a spec job's session (:mod:`runner.train.trainer`): a claim generation that fences every write,
checkpoints committed and verified by the checkpoint store, published by the publisher thread straight from
memory, history.csv and TensorBoard derived from each committed checkpoint, and a snapshot that could not be
published kept on local disk for the next session on this machine.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from rich.console import Console

from runner import defaults
from runner.checkpoints import CheckpointStore
from runner.device import describe_devices, detect_gpus
from runner.errors import Fenced, LeaseHeld, StorageError, UsageError
from runner.history import check_history, write_history
from runner.job import JobStatus
from runner.joblog import JobLogHandler
from runner.kept import keep_snapshot, publish_kept
from runner.lease import lease_duration_from, read_holder
from runner.own_code import OwnCode, describe_variable
from runner.paths import default_cache_dir, publish_note, queue_choice, work_folder
from runner.queue import Claim, Queue
from runner.train.outputs.tensorboard import TensorBoardLog
from runner.train.snapshots.publisher import Publisher, take_snapshot
from runner.train.snapshots.snapshot import TrainingState, load_snapshot
from runner.train.trainer import flush_timeout
from runner.training import RunContext
from runner.words import counted

_OPEN: dict[Path, OwnCodeSession] = {}
"""The sessions open in this process, by job folder: a notebook that runs its cell again (after an error left the
last one open) takes the job over from its own earlier session instead of waiting for its lease."""
_OPEN_LOCK = threading.Lock()


def model_record(model: keras.Model, *, kind: str, epochs: int, now: float) -> OwnCode:
    """What ``code.json`` records of ``model``: its variables by path and shape, its optimizer's class."""
    optimizer = getattr(model, "optimizer", None)
    return OwnCode(
        kind=kind,  # type: ignore[arg-type]
        epochs=epochs,
        model=f"{type(model).__name__} {model.name!r}",
        # By the variable's own name, not its path: Keras numbers layer names (dense_1), and a notebook that builds
        # the same model again gets other numbers.
        variables=tuple(describe_variable(variable.name, tuple(variable.shape)) for variable in model.variables),
        optimizer=type(optimizer).__name__ if optimizer is not None else "none",
        created_at=now,
    )


@dataclass
class Restored:
    """Where the session starts: the state of the newest checkpoint (a fresh one when there is none)."""

    state: TrainingState
    checkpoint: str | None
    metric_values: list[np.ndarray] | None
    """The snapshot's metric variables, for an epoch resumed part way (``fit`` resets the metrics at each epoch's
    start, after the restore: they are given back then)."""


class OwnCodeSession:
    """A job of the user's own code, opened for one ``fit``."""

    def __init__(
        self,
        job: str,
        *,
        kind: str,
        queue: str | Path | None = None,
        keep: int = defaults.CHECKPOINT_KEEP,
        cache_dir: Path | None = None,
        console: Console | None = None,
    ) -> None:
        if not isinstance(job, str) or not job or "/" in job or job.startswith("."):
            raise UsageError(f"job name {job!r} cannot name a folder: use letters, digits, '-' and '_'")
        if not isinstance(keep, int) or keep < 1:
            raise UsageError(f"keep={keep!r}: runner keeps at least 1 checkpoint; give keep=2 (the default) or more")
        root, _ = queue_choice(queue)
        if queue is None:
            from runner import colab

            colab.ensure_drive(root, can_prompt=colab.in_notebook_kernel())
        self.queue = Queue(root, lease_duration=lease_duration_from(queue_root=root))
        self.name, self.kind, self.keep = job, kind, keep
        self.cache_dir = cache_dir or default_cache_dir()
        self.console = console or Console(stderr=True)
        self.log = logging.getLogger(f"runner.job.{job}")
        self.stop = threading.Event()
        self.claim: Claim | None = None
        self.context: RunContext | None = None
        self.publisher: Publisher | None = None
        self.workdir: Path | None = None
        self._handler: JobLogHandler | None = None
        self._snapshots = 0
        self._started = time.monotonic()
        self._elapsed_before = 0.0

    # --- open -----------------------------------------------------------------------------------------------

    def open(self, model: keras.Model, *, epochs: int) -> Restored | None:
        """Take the job (made on first use) and restore its newest checkpoint into ``model`` (built, compiled, its
        optimizer built); ``None`` when the job is done already: then ``model`` holds its final weights."""
        record = model_record(model, kind=self.kind, epochs=epochs, now=time.time())
        job, new = self.queue.create_own_code(self.name, record)
        if not job.is_own_code():
            raise UsageError(
                f"job {self.name!r} in {self.queue.root} has a spec: `runner work` trains it, not your code; give "
                "your code another job name"
            )
        earlier = job.read_code()
        if (difference := earlier.difference(record)) is not None:
            raise UsageError(
                f"job {self.name!r} was trained with another model: {difference}. Nothing was loaded: give the "
                f"changed model a new job name, or `runner delete {self.name}` to start it again"
            )
        self._take_lease(job.paths.folder)
        try:
            return self._claimed(model, record, earlier, new)
        except BaseException:
            self.close()
            raise

    def _take_lease(self, folder: Path) -> None:
        with _OPEN_LOCK:
            earlier = _OPEN.get(folder)
        if earlier is not None:
            earlier.close()  # this process's own earlier session, left open by an error: end it
        lease = self.queue.lease(self.name)
        if not lease.try_acquire():
            holder = read_holder(lease.paths)
            raise LeaseHeld(
                self.name,
                holder.describe() if holder else "another session",
                hint="it trains there; wait for it to stop, or stop it (a closed tab lets go within the lease time)",
            )
        self._lease = lease
        with _OPEN_LOCK:
            _OPEN[folder] = self

    def _claimed(self, model: keras.Model, record: OwnCode, earlier: OwnCode, new: bool) -> Restored | None:
        device = describe_devices(detect_gpus())
        claim = self.queue.claim(self.name, self._lease, device=device, own_code=True)
        if claim is None:
            self._load_final(model)
            self.close()
            return None
        self.claim = claim
        job = claim.job
        if record.epochs != earlier.epochs:
            from runner import storage

            claim.fence()
            storage.atomic_write_json(job.paths.code, earlier.model_copy(update={"epochs": record.epochs}).model_dump())
            job.events.append("epochs-changed", before=earlier.epochs, after=record.epochs)
        self._handler = JobLogHandler(job, claim.generation)
        self.log.addHandler(self._handler)
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        store = CheckpointStore(
            job, keep=self.keep, fence=claim.fence, claim_token=claim.token, fresh_from=claim.claimed.fresh_from
        )
        store.collect_garbage()
        self.context = RunContext(claim=claim, store=store, stop=self.stop, log=self.log, console=self.console)
        self.workdir = work_folder(self.cache_dir, self.name, claim.generation)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if (kept := publish_kept(self.cache_dir, store)) is not None:
            self.context.record_checkpoint(kept, metrics=kept.meta.get("metrics") or {})
        restored = self._restore(model, claim)
        self.publisher = Publisher(
            self.context,
            note=publish_note(self.cache_dir, self.name),
            tensorboard=TensorBoardLog(job.paths, generation=claim.generation, local_folder=self.workdir / "tb"),
            restored_history=restored.state.history,
        )
        verb = "resuming" if restored.checkpoint else "starting"
        self.log.info("%s (%s) on %s, claim generation %d", verb, self.kind, job.paths.folder, claim.generation)
        return restored

    def _restore(self, model: keras.Model, claim: Claim) -> Restored:
        context = self.context
        assert context is not None and self.workdir is not None
        scratch = self.workdir / "restore"
        scratch.mkdir(parents=True, exist_ok=True)
        info = context.store.restore(scratch)
        for checkpoint, reason in context.store.fallbacks:
            self.console.print(
                f"[yellow]warning:[/] checkpoint {checkpoint} of {self.name!r} does not verify ({reason}): using the "
                "one before it",
                highlight=False,
            )
        values = None
        if info is None:
            state = TrainingState()
            claim.job.events.append("started", generation=claim.generation)
        else:
            state = load_snapshot(model, scratch, checkpoint=info.id)
            values = [np.asarray(variable.numpy()) for metric in model.metrics for variable in metric.variables]
            claim.job.events.append(
                "resumed", generation=claim.generation, checkpoint=info.id, epoch=state.epoch, step=state.step
            )
            self.console.print(
                f"resuming {self.name!r} from checkpoint {info.id}: {counted(state.epoch, 'epoch')} done"
                + (f", step {state.step} of epoch {state.epoch + 1}" if state.step else ""),
                markup=False,
            )
            context.record_checkpoint(info, metrics=state.history[-1] if state.history else {})
        shutil.rmtree(scratch, ignore_errors=True)
        state.generation = claim.generation
        self._elapsed_before = state.elapsed_s
        claim.fence()
        write_history(claim.job.paths.history, state.history)
        return Restored(state, info.id if info else None, values)

    def _load_final(self, model: keras.Model) -> None:
        """A done job: give ``model`` the weights of its newest checkpoint (the optimizer's too, when built)."""
        job = self.queue.job(self.name)
        store = CheckpointStore(job, keep=self.keep)
        scratch = work_folder(self.cache_dir, self.name, 0) / "final"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            info = store.restore(scratch)
            if info is None:
                raise UsageError(f"job {self.name!r} is done but no checkpoint of it verifies: nothing to load")
            with np.load(scratch / "variables.npz") as arrays:
                names = sorted(name for name in arrays.files if name.startswith("model/"))
                for variable, name in zip(model.variables, names, strict=True):
                    variable.assign(arrays[name])
        finally:
            shutil.rmtree(scratch.parent, ignore_errors=True)
        self.console.print(f"job {self.name!r} is done: its final weights are loaded (checkpoint {info.id})")

    # --- during training ------------------------------------------------------------------------------------

    def should_stop(self) -> bool:
        """A cancel (``runner cancel``), a signal, or the lease lost: checkpoint and stop."""
        return self.context is not None and self.context.should_stop()

    def check(self) -> None:
        """Raise what stopped the publisher for good (fenced, a full Drive)."""
        if self.publisher is not None and self.publisher.error is not None:
            raise self.publisher.error

    def snapshot(self, model: keras.Model, state: TrainingState) -> None:
        """Capture ``model`` and ``state`` in memory and hand them to the publisher."""
        assert self.publisher is not None and self.workdir is not None
        self._snapshots += 1
        state.elapsed_s = self._elapsed_before + (time.monotonic() - self._started)
        folder = self.workdir / "snapshots" / f"{self._snapshots:06d}-e{state.epoch}-s{state.step}"
        self.publisher.submit(take_snapshot(model, state, folder))

    # --- the end --------------------------------------------------------------------------------------------

    def finish(self, state: TrainingState, *, stopped_early: str | None = None) -> None:
        """Every epoch trained (or an early stop): once the last checkpoint is in the job folder, the job is done."""
        assert self.publisher is not None and self.claim is not None
        if not self.publisher.flush(timeout := flush_timeout()):
            raise StorageError(
                f"{self.claim.job.paths.checkpoints}: the last checkpoint was not published within {timeout:.0f}s; "
                "run the same code again to publish it and finish the job",
                path=str(self.claim.job.paths.checkpoints),
                transient=True,
            )
        check_history(self.claim.job.paths.history, state.history)
        if stopped_early is not None:
            self.claim.update(stopped_early=stopped_early)
        self.claim.finish(JobStatus.DONE)
        self.claim.job.events.append("done", generation=self.claim.generation)
        self.log.info("done")
        self.close()

    def stop_here(self, *, reason: str) -> None:
        """Stopped before the last epoch (a cancel, a signal, the code's own stop): publish, then let go; a cancel
        ends the job as cancelled."""
        assert self.claim is not None
        try:
            if self.publisher is not None and not self.publisher.flush(flush_timeout()):
                self.log.warning("gave up waiting for the last checkpoint to be published")
            job = self.claim.job
            if job.cancel_requested():
                self.claim.finish(JobStatus.CANCELLED)
                job.clear_cancel_request()
                job.events.append("cancelled", generation=self.claim.generation)
                self.console.print(f"job {self.name!r} cancelled", markup=False)
            else:
                self.claim.fence()
                job.events.append("interrupted", generation=self.claim.generation, reason=reason)
        finally:
            self.close()

    def close(self, *, error: BaseException | None = None) -> None:
        """Let go of the job: the publisher (what it could not publish is kept on local disk), the lease. The job
        stays resumable; ``error`` (what ended the code) is recorded."""
        publisher, self.publisher = self.publisher, None
        if publisher is not None:
            if error is None or not isinstance(error, Fenced):
                publisher.close(flush_timeout())
            publisher.shutdown()
            self._keep_unpublished(publisher)
        if error is not None and self.claim is not None:
            try:
                self.claim.fence()
                reason = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
                self.claim.job.events.append("interrupted", generation=self.claim.generation, reason=reason)
            except (Fenced, StorageError, OSError):
                pass
        if self._handler is not None:
            self.log.removeHandler(self._handler)
            self._handler = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        lease = getattr(self, "_lease", None)
        if lease is not None:
            lease.release()
            with _OPEN_LOCK:
                if _OPEN.get(lease.paths.folder) is self:
                    del _OPEN[lease.paths.folder]

    def _keep_unpublished(self, publisher: Publisher) -> None:
        snapshot = publisher.unpublished()
        if snapshot is None or self.claim is None:
            return
        try:
            snapshot.write()
            kept = keep_snapshot(
                snapshot.folder,
                cache_dir=self.cache_dir,
                job=self.claim.job,
                generation=self.claim.generation,
                claim_token=self.claim.token,
                epoch=snapshot.epoch,
                step=snapshot.step,
                meta=snapshot.meta,
            )
        except (OSError, StorageError) as error:
            self.log.error("could not keep the unpublished checkpoint on local disk: %s", error)
            return
        self.console.print(
            f"[yellow]job {self.name!r}: the checkpoint at epoch {kept.epoch} step {kept.step} did not reach the job "
            "folder; it is kept on this machine's disk, and the next run of this code here publishes it[/]",
            soft_wrap=True,
        )


@atexit.register
def _close_open_sessions() -> None:
    """A script that ends (or fails) with a session open lets its job go, publishing what it can."""
    with _OPEN_LOCK:
        sessions = list(_OPEN.values())
    for session in sessions:
        session.close()
