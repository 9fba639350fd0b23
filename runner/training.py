"""The trainer interface: what a trainer is given for one claimed job (:class:`RunContext`) and returns.

The worker knows nothing of Keras: it loads a trainer by name (``$RUNNER_TRAINER``, default the Keras trainer
in ``runner.train``) and hands it a context. The core's tests plug in a small pure-Python trainer the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from rich.console import Console
from rich.markup import escape

from runner import defaults
from runner.checkpoints import CheckpointInfo, CheckpointStore
from runner.errors import TrainerError
from runner.job import Job
from runner.queue import Claim
from runner.spec import JobSpec


class Outcome(str, Enum):
    """How a trainer's run ended."""

    DONE = "done"
    """Every epoch trained (and the final model exported)."""
    STOPPED = "stopped"
    """Stopped early because :meth:`RunContext.should_stop` said so, after publishing a checkpoint."""


@dataclass
class RunContext:
    """Everything a trainer needs to run one claimed job, and the ways it reports back."""

    claim: Claim
    store: CheckpointStore
    stop: threading.Event
    log: logging.Logger
    console: Console
    clock: Callable[[], float] = time.monotonic
    deadline: float | None = None
    """``clock()`` time at which to checkpoint and stop (``runner work --max-hours``); ``None``: no limit."""
    _cancel_seen: bool = field(default=False, init=False)
    _cancel_checked_at: float = field(default=-math.inf, init=False)

    @property
    def job(self) -> Job:
        """The job's folder."""
        return self.claim.job

    @property
    def spec(self) -> JobSpec:
        """The job's frozen spec."""
        return self.claim.spec

    @property
    def generation(self) -> int:
        """This claim's generation; stored in each checkpoint."""
        return self.claim.generation

    def warn(self, message: str) -> None:
        """Say ``message`` as a warning on the console (one line, however long) and in the job's log."""
        self.console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)
        self.log.warning("%s", message)

    def should_stop(self) -> bool:
        """Whether to checkpoint and stop now: a signal, a cancel, the lease lost, or the time limit reached.

        Cheap enough for every step.
        """
        return (
            self.stop.is_set()
            or self.claim.lease.lost is not None
            or self.past_deadline()
            or self._cancel_requested()
        )

    def past_deadline(self) -> bool:
        """Whether the time limit of this ``runner work`` has been reached."""
        return self.deadline is not None and self.clock() >= self.deadline

    def _cancel_requested(self) -> bool:
        # A stat on Drive can take long: look for the cancel marker only every few seconds.
        now = self.clock()
        if not self._cancel_seen and now - self._cancel_checked_at >= defaults.CANCEL_POLL_S:
            self._cancel_checked_at = now
            self._cancel_seen = self.job.cancel_requested()
        return self._cancel_seen

    def record_checkpoint(self, info: CheckpointInfo, *, metrics: dict[str, float] | None = None) -> None:
        """Show a committed checkpoint's progress in state.json (fenced); ``metrics`` may be a history row, whose
        ``epoch`` is not a metric."""
        changes: dict[str, object] = {
            "epoch": info.epoch,
            "step": info.step,
            "checkpoint": info.id,
            "checkpoint_at": info.created_at or self.job.clock(),
        }
        if metrics is not None:
            changes["metrics"] = {name: value for name, value in metrics.items() if name != "epoch"}
        self.claim.update(**changes)


class Trainer(Protocol):
    """Trains one job from its newest checkpoint.

    ``train`` restores from ``context.store``, trains, publishes checkpoints through ``context.store.commit``
    (which fences) and calls ``context.record_checkpoint`` after each. When ``context.should_stop()`` turns
    true it publishes a checkpoint and returns :attr:`Outcome.STOPPED`; when all epochs are done it exports
    the final model and returns :attr:`Outcome.DONE`. Any exception marks the job failed.
    """

    def train(self, context: RunContext) -> Outcome:
        """Run the job to completion or until asked to stop."""
        ...


TrainerFactory = Callable[[], Trainer]


def lazy_trainer(dotted: str) -> TrainerFactory:
    """A factory that imports the trainer only when a job is claimed (TensorFlow takes seconds to import).

    The module is looked up now, without running it, so that a wrong name fails before any job is claimed.
    """
    module_name = dotted.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name) if module_name else None
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise TrainerError(f"cannot load trainer {dotted!r}: no module named {module_name!r}")
    loaded: list[TrainerFactory] = []

    def make() -> Trainer:
        if not loaded:
            loaded.append(load_trainer(dotted))
        return loaded[0]()

    return make


def load_trainer(dotted: str) -> TrainerFactory:
    """The trainer factory named ``package.module:attribute``."""
    module_name, _, attribute = dotted.partition(":")
    if not module_name or not attribute:
        raise TrainerError(f"trainer must be named as package.module:attribute, got {dotted!r}")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attribute)
    except (ImportError, AttributeError) as error:
        raise TrainerError(f"cannot load trainer {dotted!r}: {error}") from None


def default_trainer_name(environ: Mapping[str, str] = os.environ) -> str:
    """The trainer ``runner work`` uses: ``$RUNNER_TRAINER`` or the Keras trainer."""
    return environ.get(defaults.TRAINER_ENV, defaults.TRAINER_DEFAULT)
