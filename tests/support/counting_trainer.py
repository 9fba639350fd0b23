"""A small pure-Python trainer that stands in for the Keras trainer in the core's tests.

It "trains" by folding (epoch, step) into an integer, checkpoints through the real store (a state file and a 64 KiB
weights file), resumes from the newest verified checkpoint and honours stop requests, so that kills, leases,
fencing and fallbacks can be tested without TensorFlow. ``model.params`` of the spec tunes it: ``steps`` per epoch,
``step_seconds`` of sleep per step, ``fail_at_epoch`` to raise, ``every_steps`` for mid-epoch checkpoints,
``park_at_epoch`` to wait after the first step of that epoch until a stop is asked for (so the stop's checkpoint is
at step 1, never a repeat of an epoch's): a test that stops a running job then stops it mid-training however slow
the machine is, instead of racing a job that may finish first.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

from runner import storage
from runner.training import Outcome, RunContext

MODULUS = 2**61 - 1

PARK_LIMIT_S = 120.0
"""A parked job that is never asked to stop goes on after this long, so a broken test cannot hang forever."""


def fold(value: int, epoch: int, step: int) -> int:
    """One training step."""
    return (value * 1_000_003 + epoch * 7919 + step + 1) % MODULUS


def expected_value(epochs: int, steps: int) -> int:
    """What an uninterrupted run ends with."""
    value = 1
    for epoch in range(epochs):
        for step in range(steps):
            value = fold(value, epoch, step)
    return value


def weights_bytes(value: int) -> bytes:
    """64 KiB that depend on the value, so corruption is detectable and restores are checked."""
    block = hashlib.sha256(str(value).encode()).digest()
    return block * 2048


def counting_model(**_: object) -> None:
    """The factory the counting trainer's specs name, so that their ``model.params`` (its knobs) pass the spec's
    checks; it builds nothing, since the counting trainer never calls it."""
    raise RuntimeError("the counting trainer's specs name no real network")


class CountingTrainer:
    """See the module docstring."""

    def train(self, context: RunContext) -> Outcome:
        params = context.spec.model.params
        steps = int(params.get("steps", 4))
        step_seconds = float(params.get("step_seconds", 0.0))
        every_steps = params.get("every_steps")
        fail_at_epoch = params.get("fail_at_epoch")
        park_at_epoch = params.get("park_at_epoch")
        epochs = context.spec.training.epochs
        every_epochs = context.spec.checkpoint.every_epochs

        epoch, step, value = self._restore(context)
        with tempfile.TemporaryDirectory(prefix="counting-") as scratch:
            while epoch < epochs:
                if fail_at_epoch is not None and epoch == int(fail_at_epoch):
                    raise RuntimeError(f"injected failure at epoch {epoch}")
                while step < steps:
                    if context.should_stop():
                        self._checkpoint(context, Path(scratch), epoch, step, value)
                        return Outcome.STOPPED
                    value = fold(value, epoch, step)
                    step += 1
                    time.sleep(step_seconds)
                    if park_at_epoch is not None and (epoch, step) == (int(park_at_epoch), 1):
                        self._park(context)
                    if every_steps and step % int(every_steps) == 0 and step < steps:
                        self._checkpoint(context, Path(scratch), epoch, step, value)
                epoch, step = epoch + 1, 0
                context.log.info("epoch %d done, value %d", epoch, value)
                if epoch % every_epochs == 0 or epoch == epochs:
                    self._checkpoint(context, Path(scratch), epoch, 0, value, metrics={"value": value % 1000})
        final = context.job.paths.final
        storage.make_dirs(final)
        context.claim.fence()
        storage.atomic_write_json(final / "result.json", {"value": value})
        return Outcome.DONE

    @staticmethod
    def _park(context: RunContext) -> None:
        context.log.info("parked in epoch %s until a stop is asked for", context.spec.model.params["park_at_epoch"])
        deadline = time.monotonic() + PARK_LIMIT_S
        while not context.should_stop() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _restore(self, context: RunContext) -> tuple[int, int, int]:
        with tempfile.TemporaryDirectory(prefix="counting-restore-") as scratch:
            info = context.store.restore(Path(scratch))
            if info is None:
                return 0, 0, 1
            state = json.loads((Path(scratch) / "state.json").read_text())
            if (Path(scratch) / "weights.bin").read_bytes() != weights_bytes(state["value"]):
                raise RuntimeError("restored weights do not match the restored state")
            context.job.events.append("resumed", checkpoint=info.id, epoch=info.epoch, step=info.step)
            context.console.print(f"resumed {context.job.name!r} from {info.id}", markup=False)
            return state["epoch"], state["step"], state["value"]

    def _checkpoint(
        self, context: RunContext, scratch: Path, epoch: int, step: int, value: int, metrics: dict | None = None
    ) -> None:
        folder = scratch / f"snapshot-{epoch}-{step}"
        folder.mkdir(exist_ok=True)
        (folder / "state.json").write_text(json.dumps({"epoch": epoch, "step": step, "value": value}))
        (folder / "weights.bin").write_bytes(weights_bytes(value))
        info = context.store.commit(folder, generation=context.generation, epoch=epoch, step=step, meta={})
        context.record_checkpoint(info, metrics=metrics)
