"""Publishing snapshots to the job folder in a background thread, so that training never waits on Drive.

The training loop hands over a snapshot captured in memory and carries on. One thread writes it into the job
folder through the checkpoint store (temp folder, manifest, fencing, rename), then records the progress in
state.json and rewrites history.csv and the TensorBoard logs. If a newer snapshot is handed over while one is
uploading, only the newest is uploaded next: the older pending one is dropped. A storage error keeps the snapshot
on local disk and tries again later; one still unpublished at the end is kept there, for the next claim on this
machine.

TensorBoard logs are a view, not a result: a failure to write them is a warning, tried again after the next
checkpoint, and never holds up or fails the job. Before any snapshot the thread replays the restored history into
this claim's TensorBoard files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from runner import defaults, killpoints, storage
from runner.errors import Fenced, StorageError
from runner.history import write_history
from runner.train.outputs.tensorboard import TensorBoardLog
from runner.train.snapshots.snapshot import CapturedSnapshot, TrainingState, capture_snapshot
from runner.train.snapshots.space import local_disk_error
from runner.training import RunContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """A snapshot waiting to be published: held in memory (``captured``, the trainer's), or in ``folder`` on local
    disk (one that waited on a failing job folder, or was handed over as files)."""

    folder: Path
    epoch: int
    step: int
    history: list[dict[str, float]]
    meta: dict[str, Any]
    captured: CapturedSnapshot | None = None

    @property
    def unpublished_data(self) -> bool:
        """Whether it still has something to publish or keep: its local folder, or its variables in memory."""
        return (self.captured is not None and self.captured.held) or self.folder.is_dir()

    def write(self) -> None:
        """Put a snapshot still in memory into its local folder (to be kept); a failure is the one-line error for
        a full or failing local disk, and leaves no half-written folder."""
        if self.captured is None or not self.captured.held:
            return
        try:
            self.captured.write(self.folder)
        except OSError as error:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise local_disk_error(error, self.folder) from error

    def discard(self) -> None:
        """Let go of it: its local folder and its variables in memory."""
        if self.captured is not None:
            self.captured.release()
        shutil.rmtree(self.folder, ignore_errors=True)


def take_snapshot(model: Any, state: TrainingState, folder: Path) -> Snapshot:
    """Capture ``model`` and ``state`` in memory (the only cost to the training loop), as a snapshot for the
    publisher, whose thread writes it straight into the job folder while training goes on; ``folder`` is where it
    would wait on local disk."""
    captured = capture_snapshot(model, state)
    killpoints.reached("snapshot-taken")
    meta: dict[str, Any] = {
        "global_step": state.global_step,
        "steps_per_epoch": state.steps_per_epoch,
        "elapsed_s": round(state.elapsed_s, 3),
        "metrics": state.history[-1] if state.history else {},
        "best": state.best,
    }
    history = [dict(row) for row in state.history]
    return Snapshot(folder, state.epoch, state.step, history, meta, captured=captured)


class Publisher:
    """A background thread that publishes the newest snapshot."""

    def __init__(
        self,
        context: RunContext,
        *,
        note: Path | None = None,
        tensorboard: TensorBoardLog | None = None,
        restored_history: Sequence[dict[str, float]] = (),
        retry_pause_s: float = defaults.PUBLISH_RETRY_PAUSE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.context, self.note, self.retry_pause_s, self.clock = context, note, retry_pause_s, clock
        self.tensorboard = tensorboard
        self._restored_history = [dict(row) for row in restored_history]
        self._tensorboard_failing = False
        self._tensorboard_warned = False
        self._failing_since: float | None = None
        self._pending: Snapshot | None = None
        self._latest: Snapshot | None = None  # the newest handed over, until it is published
        self._busy = tensorboard is not None  # the replay below: flush() waits for it like for a snapshot
        self._closing = False
        self._condition = threading.Condition()
        self.error: BaseException | None = None
        """What stopped publishing for good (fenced, or an unexpected error); the trainer re-raises it."""
        self.published: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"publish-{context.job.name}", daemon=True)
        self._thread.start()

    def submit(self, snapshot: Snapshot) -> None:
        """Queue ``snapshot`` for publishing, replacing (and deleting) an older one not yet started."""
        with self._condition:
            if self.error is not None:
                raise self.error
            dropped, self._pending = self._pending, snapshot
            self._latest = snapshot
            self._condition.notify_all()
        if dropped is not None:
            dropped.discard()

    def flush(self, timeout_s: float) -> bool:
        """Wait until nothing is pending or uploading; ``False`` if that took longer than ``timeout_s``."""
        deadline = self.clock() + timeout_s
        with self._condition:
            while (self._pending is not None or self._busy) and self.error is None:
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self._condition.wait(timeout=min(left, 1.0))
        if self.error is not None:
            raise self.error
        return True

    def unpublished(self) -> Snapshot | None:
        """The newest snapshot handed over that has not been published (pending, failing or fenced), or ``None``.

        The thread leaves it alone, so that the trainer can keep it on local disk (writing it there first if it is
        still in memory)."""
        with self._condition:
            latest = self._latest
        return latest if latest is not None and latest.unpublished_data else None

    def close(self, timeout_s: float) -> bool:
        """Publish what is pending (within ``timeout_s``), then stop the thread."""
        try:
            return self.flush(timeout_s)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop the thread once its current upload ends, publishing nothing more (see :meth:`unpublished`);
        never raises."""
        with self._condition:
            self._closing = True
            self._pending = None
            self._condition.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=defaults.PUBLISH_FLUSH_TIMEOUT_S)

    def _run(self) -> None:
        if self.tensorboard is not None:
            self._replay_tensorboard()
        while True:
            with self._condition:
                while self._pending is None and not self._closing:
                    self._condition.wait()
                if self._closing:  # after shutdown nothing more is published: the trainer keeps what is left
                    return
                snapshot, self._pending, self._busy = self._pending, None, True
            try:
                self._publish(snapshot)
            except StorageError as error:
                if not error.transient:  # no space, no permission: retrying cannot help; the trainer stops
                    with self._condition:
                        self.error = error
                    continue
                # Drive is having a bad time: keep the snapshot (unless a newer one came) and try again shortly.
                self.context.log.warning("publishing checkpoint failed, will retry: %s", error)
                self._write_note(snapshot, error)
                self._spill(snapshot)
                self._requeue(snapshot)
                with self._condition:  # a pause that shutdown() cuts short
                    self._condition.wait_for(lambda: self._closing, timeout=self.retry_pause_s)
            except BaseException as error:  # fenced, or a bug: stop publishing and let the trainer raise it
                with self._condition:
                    self.error = error
            else:
                with self._condition:
                    if self._latest is snapshot:
                        self._latest = None
                snapshot.discard()
                self._clear_note()
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()

    def _write_note(self, snapshot: Snapshot, error: StorageError) -> None:
        """Tell `runner status` on this machine that a checkpoint waits on local disk, and why."""
        if self._failing_since is None:
            self._failing_since = time.time()
        if self.note is None:
            return
        note = {
            "since": round(self._failing_since, 3),
            "epoch": snapshot.epoch,
            "step": snapshot.step,
            "generation": self.context.generation,
            "folder": os.path.abspath(self.context.job.paths.folder),  # status finds it without reading the folder
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "error": " ".join(str(error).split())[:300],
        }
        try:
            self.note.parent.mkdir(parents=True, exist_ok=True)
            storage.atomic_write_json(self.note, note)
        except OSError as failure:  # a note must never stop publishing
            self.context.log.warning("could not write the local publishing note: %s", failure)

    def _clear_note(self) -> None:
        if self._failing_since is not None:
            self.context.log.info("published again after %.0fs of storage errors", time.time() - self._failing_since)
            self._failing_since = None
        if self.note is not None:
            with contextlib.suppress(OSError):
                self.note.unlink(missing_ok=True)

    def _spill(self, snapshot: Snapshot) -> None:
        """Let a snapshot that waits on a failing job folder wait on local disk, not in memory: an outage can last
        minutes, and a newer snapshot would hold a second copy of the variables beside it."""
        try:
            snapshot.write()
        except StorageError as failure:  # it stays in memory and is tried again all the same
            self.context.log.warning("could not put the waiting checkpoint on local disk: %s", failure)

    def _requeue(self, snapshot: Snapshot) -> None:
        with self._condition:
            if self._pending is None:
                self._pending = snapshot
                return
        snapshot.discard()

    def _publish(self, snapshot: Snapshot) -> None:
        context = self.context
        held = snapshot.captured is not None and snapshot.captured.held
        info = context.store.commit(
            snapshot.captured.files if held else snapshot.folder,  # from memory: one write, no local copy
            generation=context.generation,
            epoch=snapshot.epoch,
            step=snapshot.step,
            meta=snapshot.meta,
        )
        context.record_checkpoint(info, metrics=snapshot.history[-1] if snapshot.history else {})
        killpoints.reached("state-written")
        context.claim.fence()
        write_history(context.job.paths.history, snapshot.history)
        killpoints.reached("history-written")
        self.published.append(info.id)
        self._publish_tensorboard(snapshot.history)

    def _replay_tensorboard(self) -> None:
        try:
            self._publish_tensorboard(self._restored_history)
        except BaseException as error:  # fenced: stop publishing and let the trainer raise it
            with self._condition:
                self.error = error
        finally:
            with self._condition:
                self._busy = False
                self._condition.notify_all()

    def _publish_tensorboard(self, history: list[dict[str, float]]) -> None:
        """Bring the TensorBoard logs up to ``history``; a failure is a warning (once per streak), never the job's."""
        if self.tensorboard is None:
            return
        try:
            self.tensorboard.publish(history, fence=self.context.claim.fence)
        except Fenced:
            raise
        except Exception as error:  # whatever went wrong, it is not worth stopping training for
            level = logging.DEBUG if self._tensorboard_failing else logging.WARNING
            message = "could not write the TensorBoard logs (trying again after the next checkpoint): %s"
            self.context.log.log(level, message, error)
            if not self._tensorboard_warned:  # on screen once per session; the log has every streak
                self._tensorboard_warned = True
                self.context.console.print(
                    f"[yellow]warning:[/] {escape(message % ' '.join(str(error).split()))}; training goes on",
                    highlight=False,
                    soft_wrap=True,
                )
            self._tensorboard_failing = True
        else:
            if self._tensorboard_failing:
                self.context.log.info("TensorBoard logs written again")
            self._tensorboard_failing = False
