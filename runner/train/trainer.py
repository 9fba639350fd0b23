"""The Keras trainer: restore the newest verified checkpoint, train in compiled multi-step calls, snapshot,
publish, export.

The loop itself (why not ``train_on_batch`` or ``fit``, and how the metrics stay right on every Keras 3) is in
:mod:`runner.train.engine.loop`. Here: the session around it. Training runs ``steps_per_execution`` steps per call;
between calls, and only there, come the checks (stop, publisher errors), the snapshot when one is due, and at
most once a second a read of the live metrics for the progress display.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import keras
from rich.markup import escape

from runner import defaults, killpoints
from runner.errors import ModelError, StorageError
from runner.history import check_history, write_history
from runner.kept import keep_snapshot, publish_kept
from runner.paths import default_cache_dir, publish_note, work_folder
from runner.settings import seconds_from_environment
from runner.spec import resolved_monitor
from runner.train import backends
from runner.train.engine.acceleration import configure_precision, resolve_jit_compile
from runner.train.engine.oom import go_back, halved_batch_size, out_of_memory_building, report_halving
from runner.train.engine.schedule import LearningRate
from runner.train.engine.steps import build_metrics, resolve_steps_per_execution
from runner.train.engine.watchers import best_monitor, early_stopping_epoch_end, plateau_epoch_end
from runner.train.models.build import (
    Compiled,
    build_model,
    check_loss_matches_labels,
    compile_model,
    current_learning_rate,
    load_pretrained_weights,
    model_weights,
    unscaled_input_warning,
    use_learning_rate,
    use_model_weights,
)
from runner.train.models.fine_tune import FineTune
from runner.train.outputs import tensorboard as tensorboard_files
from runner.train.outputs.export import describe_model, publish_exports, write_exports
from runner.train.outputs.progress import EpochProgress
from runner.train.outputs.tensorboard import TensorBoardLog
from runner.train.snapshots.publisher import Publisher, take_snapshot
from runner.train.snapshots.snapshot import TrainingState, load_snapshot, save_snapshot
from runner.train.snapshots.space import local_disk_error, warn_if_short_of_space
from runner.training import Outcome, RunContext
from runner.words import counted


def flush_timeout() -> float:
    """Seconds to wait for the last checkpoint to reach the job folder (``$RUNNER_FLUSH_TIMEOUT``)."""
    return seconds_from_environment(defaults.FLUSH_TIMEOUT_ENV, defaults.PUBLISH_FLUSH_TIMEOUT_S, allow_zero=False)


class KerasTrainer:
    """Trains one job from its spec (see :class:`runner.worker.Trainer`)."""

    def __init__(self, *, cache_dir: Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.cache_dir = cache_dir or default_cache_dir()
        self.clock = clock

    def train(self, context: RunContext) -> Outcome:
        """Run the job from its newest verified checkpoint to the end, or until asked to stop."""
        spec = context.spec
        check_loss_matches_labels(spec)
        backend = backends.current()
        backend.check_exports(spec)
        backends.warn_if_gpu_unused(context, backend)
        data = backend.prepare_dataset(
            spec.dataset, seed=spec.training.seed, cache_dir=self.cache_dir, console=context.console
        )
        if spec.training.class_weight is not None:
            data = dataclasses.replace(data, class_weights=class_weights(spec.training.class_weight, data))
            _say_class_weights(context, data)
        if (warning := backend.configure_determinism(spec)) is not None:
            context.warn(warning)
        policy = configure_precision(spec)
        placement = _placed(context, backend)
        try:
            with placement.scope():  # the model's, optimizer's and metrics' variables mirrored on every device
                # The base's pretrained weights are loaded only when training starts from the beginning (_restore):
                # a checkpoint replaces them, and a resumed session on a fresh VM need not download them.
                model = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes, pretrained=False)
            jit_compile = resolve_jit_compile(
                spec.training.jit_compile, model, deterministic=spec.training.deterministic
            )
            steps = resolve_steps_per_execution(spec.training.steps_per_execution, data.steps_per_epoch)
            element_spec = data.element_spec

            def recompile(learning_rate: float | None = None) -> Compiled:
                with placement.scope():
                    compiled = compile_model(
                        model, spec, jit_compile=jit_compile, steps_per_execution=steps, learning_rate=learning_rate
                    )
                    model.optimizer.build(model.trainable_variables)
                    build_metrics(model, element_spec)
                return compiled

            compiled = recompile()
        except (*backend.RUNTIME_ERRORS, MemoryError) as error:
            if not (isinstance(error, MemoryError) or backend.is_out_of_memory(error)):
                raise
            raise out_of_memory_building(spec, error) from error
        _say_how_it_was_compiled(context, compiled)
        _warn_if_unscaled(context, model, data)
        xla = "on" if jit_compile else "off"
        context.log.info(
            "engine: up to %d steps per compiled call, XLA %s, %s, %s", steps, xla, policy, placement.describe()
        )
        warn_if_short_of_space(context, model)
        workdir = work_folder(self.cache_dir, context.job.name, context.generation)
        shutil.rmtree(workdir, ignore_errors=True)
        fine_tune = FineTune.of(spec)
        try:
            # The schedule counts steps of the spec's batch size; one halved after running out of memory takes
            # more steps per epoch, and the curve then runs ahead of the epochs.
            rate = (
                LearningRate(spec, steps_per_epoch=data.steps_per_epoch, fine_tunes=fine_tune is not None)
                if compiled.by == "spec"
                else None
            )
            loop = backend.StepLoop(model, jit_compile=jit_compile, learning_rate=rate, placement=placement)
            phases = _Phases(fine_tune, recompile) if fine_tune is not None else None
            return _Session(context, loop, data, workdir, self.clock, self.cache_dir, rate, phases).run()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _placed(context: RunContext, backend: ModuleType) -> Any:
    """Where the job trains (``training.distribute``), said in the log, the events and state.json (for status)."""
    placement, warning = backend.place(context.spec.training.distribute, batch_size=context.spec.dataset.batch_size)
    if warning is not None:
        context.warn(warning)
    context.job.events.append(
        "devices",
        generation=context.generation,
        backend=backend.BACKEND,
        devices=placement.replicas,
        strategy=placement.strategy_name,
    )
    context.claim.update(devices=placement.replicas, backend=backend.BACKEND)
    return placement


def class_weights(setting: str | dict[str, float], data: Any) -> tuple[float, ...]:
    """A loss weight per class: ``balanced`` is sklearn's (images / (classes x images of the class)); a mapping
    names classes of the dataset, and the classes it leaves out weigh 1."""
    if setting == "balanced":
        total, classes = sum(data.train_counts), data.num_classes
        return tuple(total / (classes * count) if count else 1.0 for count in data.train_counts)
    assert isinstance(setting, dict)
    if unknown := [name for name in setting if name not in data.class_names]:
        raise ModelError(
            f"training.class_weight names {', '.join(repr(name) for name in unknown)}, not a class of the dataset "
            f"(its classes: {', '.join(data.class_names)}): use the names of dataset.train's subfolders"
        )
    return tuple(float(setting.get(name, 1.0)) for name in data.class_names)


def _say_class_weights(context: RunContext, data: Any) -> None:
    weights = data.class_weights or ()
    shown = ", ".join(f"{name} {weight:.3g}" for name, weight in zip(data.class_names, weights, strict=True))
    context.log.info("class weights: %s", shown)
    context.console.print(f"class weights: {shown}", markup=False, highlight=False, soft_wrap=True)


def _monitored(metrics: dict[str, float], monitor: str, where: str) -> float:
    if monitor not in metrics:
        names = ", ".join(name for name in metrics if name != "lr")
        raise ModelError(f"training.{where}.monitor {monitor!r} is not a metric of this job: its epochs log {names}")
    return metrics[monitor]


def early_stop_reason(stopped: dict[str, Any]) -> str:
    """One line: why and where the early stop ended training (for the console, the log and status)."""
    best = (
        f"; best {stopped['monitor']} {stopped['best']:.4g} at epoch {stopped['best_epoch']}"
        if stopped.get("best") is not None
        else ""
    )
    return (
        f"stopped early after epoch {stopped['epoch']}: {stopped['monitor']} did not improve for "
        f"{counted(max(stopped['patience'], 1), 'epoch')}{best}"
    )


def _say_how_it_was_compiled(context: RunContext, compiled: Compiled) -> None:
    """A factory's own compile wins over the spec's training fields: say which happened, where it is read."""
    if compiled.by == "factory":
        context.console.print(compiled.describe(), markup=False, soft_wrap=True)
    context.log.info("%s", compiled.describe())
    context.job.events.append(
        "compiled",
        by=compiled.by,
        optimizer=compiled.optimizer,
        learning_rate=compiled.learning_rate,
        loss=compiled.loss,
    )


def _warn_if_unscaled(context: RunContext, model: keras.Model, data: Any) -> None:
    if context.spec.model.factory is None:
        return  # the built-in networks rescale inside
    if (warning := unscaled_input_warning(model, context.spec, data.largest_training_pixel())) is not None:
        context.warn(warning)


@dataclass
class _Phases:
    """A fine-tune's two phases (the base frozen, then its top unfrozen) and which one the model is in."""

    fine_tune: FineTune
    recompile: Callable[[float | None], Compiled]
    """Compile the model again (a new optimizer at the rate given, ``None``: the spec's) and build it."""
    tuned: bool = False


class _Session:
    """One claim's training of one job."""

    def __init__(
        self,
        context: RunContext,
        loop: Any,
        data: Any,
        workdir: Path,
        clock: Callable[[], float],
        cache_dir: Path,
        rate: LearningRate | None = None,
        phases: _Phases | None = None,
    ) -> None:
        self.context, self.loop, self.data, self.workdir, self.clock = context, loop, data, workdir, clock
        self.rate = rate
        """The spec's learning rate over the steps; ``None`` when a factory compiled the model."""
        self.phases = phases
        """The fine-tune's two phases; ``None`` without one."""
        self.learning_rate = rate.base if rate is not None and not rate.moves else None
        """The spec's constant learning rate, which a restored optimizer is given; ``None`` when a factory compiled
        the model, or when the rate moves (the loop sets it before every step)."""
        self.model = loop.model
        placement = loop.placement
        self.backend = backends.current()
        self.evaluate = self.backend.evaluate_loop(self.model, placement)
        """Validation on several devices; ``None``: Keras' ``evaluate`` on one."""
        self.cache_dir = cache_dir
        self.spec = context.spec
        self.epochs = self.spec.training.epochs
        self.monitor, self.monitor_mode = best_monitor(self.spec, validated=bool(data.num_validation))
        stopping = self.spec.training.early_stopping
        self.keep_best = self.spec.export.best or (stopping is not None and stopping.restore_best)
        """Whether the best epoch's weights are kept (in memory and in every snapshot)."""
        self.progress = EpochProgress(context.console, job=context.job.name, epochs=self.epochs)
        self.started = clock()
        self.elapsed_before = 0.0
        self.last_snapshot_at = clock()
        self.snapshot_position: tuple[int, int] | None = None
        self._snapshots = 0

    # --- the run --------------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        self._publish_kept()
        state = self._restore()
        tensorboard = None
        if tensorboard_files.AVAILABLE:
            tensorboard = TensorBoardLog(
                self.context.job.paths, generation=self.context.generation, local_folder=self.workdir / "tensorboard"
            )
        else:
            self.context.log.warning("no TensorBoard logs: neither TensorFlow nor the tensorboard package is installed")
        publisher = Publisher(
            self.context,
            note=publish_note(self.cache_dir, self.context.job.name),
            tensorboard=tensorboard,
            restored_history=state.history,  # replayed into this claim's TensorBoard files before any snapshot
        )
        try:
            outcome, state = self._train(state, publisher)
            if outcome is Outcome.DONE:
                self._finish(publisher, state)
            elif not publisher.close(flush_timeout()):
                self.context.log.warning("gave up waiting for the last checkpoint to be published")
            return outcome
        finally:
            self.progress.stop()
            publisher.shutdown()
            self._keep_unpublished(publisher)

    def _train(self, state: TrainingState, publisher: Publisher) -> tuple[Outcome, TrainingState]:
        """Train to the end or a stop; the outcome and the state it ended in (another after running out of memory)."""
        if self.spec.training.on_oom == "halve_batch" and state.global_step == 0:
            self._save_initial(state)
        while True:
            try:
                return self._train_epochs(state, publisher), state
            except self.backend.RUNTIME_ERRORS as error:
                if not self.backend.is_out_of_memory(error):
                    raise
                state = self._after_oom(error, state, publisher)

    def _train_epochs(self, state: TrainingState, publisher: Publisher) -> Outcome:
        context = self.context
        every_minutes = self.spec.checkpoint.every_minutes
        while state.epoch < self.epochs and state.stopped_early is None:
            if context.should_stop():
                return self._stop(state, publisher)
            epoch_started = self.clock()
            # Counted in samples: after a batch size change mid-epoch, the batches done were of another size.
            left = math.ceil((self.data.num_train - state.seen) / self.data.batch_size)
            if state.seen == 0:
                self.model.reset_metrics()  # where fit resets them; mid-epoch, the snapshot brought them back
            self.progress.start(state.epoch, total=state.step + left, completed=state.step)
            batches = self.loop.batches(self.data.train_batches(epoch=state.epoch, start_sample=state.seen))
            per_call = self.steps_per_execution
            while left:
                steps = min(per_call, left)
                self.loop.run(batches, steps)
                left -= steps
                state.advance(steps, samples=min(steps * self.data.batch_size, self.data.num_train - state.seen))
                self.progress.advance(steps, self.loop.metrics)
                if publisher.error is not None:
                    raise publisher.error
                if context.should_stop():
                    self.progress.stop()
                    return self._stop(state, publisher)
                due = every_minutes and self.clock() - self.last_snapshot_at >= every_minutes * 60
                if due and state.seen < self.data.num_train:
                    self._snapshot(state, publisher)
            self.progress.stop()
            self._end_epoch(state, self.clock() - epoch_started)
            # Before the epoch's snapshot: a snapshot at the fine-tune's epoch holds the new optimizer.
            self._use_phase(state, now=True)
            last = state.epoch == self.epochs or state.stopped_early is not None
            if last:
                self._restore_best(state)
            if state.epoch % self.spec.checkpoint.every_epochs == 0 or last:
                self._snapshot(state, publisher)
        return Outcome.DONE

    @property
    def steps_per_execution(self) -> int:
        """Steps per compiled call, at most an epoch's (which a halved batch size changes)."""
        return resolve_steps_per_execution(self.spec.training.steps_per_execution, self.data.steps_per_epoch)

    def _end_epoch(self, state: TrainingState, seconds: float) -> None:
        metrics = self.loop.metrics()  # read before evaluate, which resets the same metrics for validation
        validation = self.data.validation_batches()
        if validation is not None:
            if self.evaluate is not None:
                results = self.evaluate.run(validation)
            else:
                results = self.model.evaluate(validation, verbose=0, return_dict=True)
            metrics |= {f"val_{name}": float(value) for name, value in results.items()}
        if (rate := current_learning_rate(self.model.optimizer)) is not None:
            metrics["lr"] = rate  # the rate of the epoch's last step, as Keras' callbacks log it
        epoch = state.epoch
        # With an early stop, the best epoch is its judgement (min_delta included), made in _watch.
        judged = self.spec.training.early_stopping is None
        best = state.end_epoch(metrics, self.monitor if judged else None, self.monitor_mode)
        line = self.progress.summary(epoch, metrics, seconds)
        self.context.log.info("%s", line)
        if self._watch(state, metrics, epoch, best) and self.keep_best:
            state.best_weights = model_weights(self.model)
        if state.stopped_early is not None:
            self._say_stopped_early(state.stopped_early)

    def _watch(self, state: TrainingState, metrics: dict[str, float], epoch: int, best: bool) -> bool:
        """The plateau and the early stop at the end of the 0-based ``epoch``; whether it is the best epoch (the
        early stop's own judgement, with its min_delta, when there is one)."""
        training = self.spec.training
        if (plateau := training.reduce_lr_on_plateau) is not None and self.rate is not None:
            monitor = resolved_monitor(self.spec, plateau.monitor)
            value = _monitored(metrics, monitor, "reduce_lr_on_plateau")
            step = plateau_epoch_end(plateau, monitor, state.plateau, value, rate=metrics["lr"], scale=state.lr_scale)
            state.plateau, state.lr_scale = step.state, step.scale
            if step.lowered:
                self.rate.scale.assign(step.scale)
                optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
                lowered = float(self.rate.at(optimizer.iterations))
                waited = counted(max(plateau.patience, 1), "epoch")
                message = f"{monitor} has not improved for {waited}: learning rate lowered to {lowered:.3g}"
                self.context.console.print(f"{self.context.job.name}: {message}", markup=False, highlight=False)
                self.context.log.info("%s", message)
                self.context.job.events.append(
                    "lr-reduced", epoch=epoch + 1, monitor=monitor, lr=lowered, scale=step.scale
                )
        if (stopping := training.early_stopping) is None:
            return best
        monitor = resolved_monitor(self.spec, stopping.monitor)
        value = _monitored(metrics, monitor, "early_stopping")
        decided = early_stopping_epoch_end(stopping, monitor, state.early_stopping, value, epoch=epoch)
        state.early_stopping = decided.state
        if decided.best:
            state.best = {"monitor": monitor, "value": value, "epoch": epoch}
        if decided.stop and state.epoch < self.epochs:
            best_epoch = decided.state["best_epoch"]
            state.stopped_early = {
                "epoch": epoch + 1,
                "monitor": monitor,
                "best": decided.state["best"],
                "best_epoch": None if best_epoch is None else best_epoch + 1,
                "patience": stopping.patience,
            }
        return decided.best

    def _say_stopped_early(self, stopped: dict[str, Any]) -> None:
        message = early_stop_reason(stopped)
        self.context.console.print(f"{self.context.job.name}: {message}", markup=False, highlight=False)
        self.context.log.info("%s", message)
        self.context.job.events.append("early-stopped", **stopped)
        self.context.claim.update(stopped_early=message)  # for status: why a done job has epochs left

    def _restore_best(self, state: TrainingState) -> None:
        """End with the best epoch's weights, when the early stop is asked to (as Keras' restore_best_weights)."""
        stopping = self.spec.training.early_stopping
        if stopping is None or not stopping.restore_best or state.best_weights is None:
            return
        use_model_weights(self.model, state.best_weights)
        epoch = (state.best or {}).get("epoch")
        self.context.log.info("restored the weights of the best epoch (%s)", "?" if epoch is None else epoch + 1)

    def _stop(self, state: TrainingState, publisher: Publisher) -> Outcome:
        if self.snapshot_position != (state.epoch, state.step):
            self._snapshot(state, publisher)
        return Outcome.STOPPED

    # --- out of memory ----------------------------------------------------------------------------------------

    def _after_oom(self, error: BaseException, state: TrainingState, publisher: Publisher) -> TrainingState:
        """Fail with advice, or (``on_oom: halve_batch``) go back to the newest checkpoint with half the batch."""
        self.progress.stop()
        old = self.data.batch_size
        new = halved_batch_size(old, self.spec, error)
        during = "validation" if state.seen >= self.data.num_train else "training"
        if not publisher.flush(timeout := flush_timeout()):  # the newest snapshot is where to go back to
            raise StorageError(
                f"{self.context.job.paths.checkpoints}: the newest checkpoint was still not published "
                f"{timeout:.0f}s after running out of memory: run `runner work` again",
                path=str(self.context.job.paths.checkpoints),
                transient=True,
            )
        back, checkpoint = go_back(
            self.context,
            self.model,
            scratch=self.workdir / "oom-restore",
            initial=self.workdir / "initial",
            prepare=self._use_phase,
        )
        if self.learning_rate is not None:
            use_learning_rate(self.model, self.learning_rate)  # said at the resume already, if it differs
        self._use_lr_scale(back)
        # Fresh step functions: one whose trace failed cannot be called again.
        self.loop.reset()
        self.model.make_test_function(force=True)
        if self.evaluate is not None:
            self.evaluate.reset()
        back.generation, back.batch_size = self.context.generation, new
        self._stamp(back)
        self._use_batch_size(back)  # recorded in state.json first: a kill right after must not lose it
        report_halving(self.context, at=state, during=during, back_to=back, checkpoint=checkpoint, old=old)
        self.snapshot_position = (back.epoch, back.step) if checkpoint else None
        self.last_snapshot_at = self.clock()
        return back

    def _use_batch_size(self, state: TrainingState) -> None:
        """Go on at the snapshot's batch size: one halved after running out of memory must survive a resume.

        state.json records a halving at once; a session killed before its next checkpoint left a snapshot with the
        older, larger size, which would run out of memory again.
        """
        size = state.batch_size or self.spec.dataset.batch_size
        recorded = self.context.claim.claimed.batch_size
        if recorded and recorded < size:
            size = recorded
        state.batch_size = size
        if size != self.data.batch_size:
            self.data = dataclasses.replace(self.data, batch_size=size)
        state.steps_per_epoch = self.data.steps_per_epoch
        if size != self.spec.dataset.batch_size and self.context.claim.claimed.batch_size != size:
            self.context.claim.update(batch_size=size)  # for status; also repairs a state.json rebuilt without it

    def _save_initial(self, state: TrainingState) -> None:
        """Keep the initial weights on local disk: where to go back to if memory runs out before any checkpoint."""
        folder = self.workdir / "initial"
        try:
            save_snapshot(self.model, state, folder)
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise local_disk_error(error, folder) from error

    # --- checkpoints ----------------------------------------------------------------------------------------

    def _load_pretrained(self) -> None:
        """Give the base its starting weights (``params.weights``), when training starts from the beginning."""
        path = load_pretrained_weights(self.model, self.spec, cache_dir=self.cache_dir, console=self.context.console)
        if path is not None:
            self.context.log.info("pretrained weights loaded from %s", path)
            self.context.job.events.append("pretrained", file=str(path))

    def _use_phase(self, state: TrainingState, *, now: bool = False) -> None:
        """Put the model in the fine-tune's phase for ``state`` (frozen base, or top unfrozen with a new optimizer),
        and the schedule at its step: before a snapshot's variables are loaded, and (``now``) at the end of the
        epoch that starts fine-tuning."""
        phases = self.phases
        if phases is None:
            return
        tune, due = phases.fine_tune, phases.fine_tune.due(state.epoch)
        if due != phases.tuned:
            if due and now:
                # The new optimizer counts its steps from 0; the schedule goes on from the old one's.
                old = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
                state.step_offset += int(old.iterations.numpy())
            unfrozen = tune.unfreeze(self.model) if due else tune.freeze(self.model)
            phases.recompile(tune.learning_rate if due else None)
            phases.tuned = due
            self.loop.reset()
            if self.evaluate is not None:  # its compiled test step holds the metrics compile just replaced
                self.evaluate.reset()
            if due and now and state.stopped_early is None and state.epoch < self.epochs:
                # Switched even when training ends here (a restore of this snapshot expects the new optimizer),
                # but said only when a fine-tuned epoch follows.
                self._say_fine_tuning(tune, state, unfrozen)
        if self.rate is not None:
            self.rate.offset.assign(state.step_offset)
            self.rate.factor.assign(tune.learning_rate / self.spec.training.learning_rate if due else 1.0)

    def _say_fine_tuning(self, tune: FineTune, state: TrainingState, unfrozen: int | None) -> None:
        message = (
            f"fine-tuning from epoch {state.epoch + 1}: {counted(unfrozen or 0, 'layer')} of the base unfrozen "
            f"(BatchNormalization stays frozen), a new optimizer at learning rate {tune.learning_rate:g}"
        )
        self.context.console.print(f"{self.context.job.name}: {message}", markup=False, highlight=False)
        self.context.log.info("%s", message)
        self.context.job.events.append(
            "fine-tuning", epoch=state.epoch + 1, layers=unfrozen, learning_rate=tune.learning_rate
        )

    def _use_lr_scale(self, state: TrainingState) -> None:
        """Give the schedule the factor a plateau had lowered the rate to (the snapshot's state holds it)."""
        if self.rate is not None:
            self.rate.scale.assign(state.lr_scale)

    def _use_spec_learning_rate(self, checkpoint: str) -> None:
        if self.learning_rate is None or (before := use_learning_rate(self.model, self.learning_rate)) is None:
            return
        rate = self.learning_rate
        self.context.console.print(
            f"learning rate {rate:g} from the spec replaces {before:g} of checkpoint {checkpoint}", markup=False
        )
        self.context.job.events.append("learning-rate", checkpoint=checkpoint, before=before, after=rate)

    def _restore(self) -> TrainingState:
        context = self.context
        scratch = self.workdir / "restore"
        scratch.mkdir(parents=True, exist_ok=True)
        info = context.store.restore(scratch)
        for checkpoint, reason in context.store.fallbacks:
            context.console.print(
                f"[yellow]warning:[/] checkpoint {checkpoint} of {context.job.name!r} does not verify "
                f"({escape(reason)}): using the one before it",
                highlight=False,
            )
        if info is None and context.store.fallbacks:
            context.console.print(
                f"[bold yellow]warning:[/] no checkpoint of {context.job.name!r} verifies: training starts again "
                "from the beginning (the damaged ones are kept until newer ones replace them; see `runner logs`)",
                highlight=False,
            )
        if info is None:
            state = TrainingState()
            self._use_batch_size(state)
            self._load_pretrained()
            context.job.events.append("started", generation=context.generation, epochs=self.epochs)
        else:
            state = load_snapshot(self.model, scratch, checkpoint=info.id, prepare=self._use_phase)
            self._use_batch_size(state)
            self._use_spec_learning_rate(info.id)
            self._use_lr_scale(state)
            self.snapshot_position = (state.epoch, state.step)
            context.job.events.append(
                "resumed",
                generation=context.generation,
                checkpoint=info.id,
                epoch=state.epoch,
                step=state.step,
                steps_per_epoch=self.data.steps_per_epoch,
            )
            context.console.print(
                f"resuming {context.job.name!r} from checkpoint {info.id}: "
                f"{counted(state.epoch, 'epoch')} done, step {state.step} of epoch {state.epoch + 1}",
                markup=False,
            )
            context.log.info("resumed from %s at epoch %d step %d", info.id, state.epoch, state.step)
            # The session before may have died between committing this checkpoint and recording it in state.json;
            # when it was the last one, nothing would record it again and status would show an older one.
            context.record_checkpoint(info, metrics=state.history[-1] if state.history else {})
        shutil.rmtree(scratch, ignore_errors=True)
        if state.stopped_early is None and context.claim.claimed.stopped_early is not None:
            # The session before decided to stop early but died before that checkpoint was committed: training
            # goes on from an earlier one, and decides again.
            context.claim.update(stopped_early=None)
        if info is not None:
            self._say_if_trajectory_changed(state, info.id)
        state.generation = context.generation
        state.steps_per_epoch = self.data.steps_per_epoch
        self._stamp(state)
        self.elapsed_before = state.elapsed_s
        context.claim.fence()
        write_history(context.job.paths.history, state.history)  # right even if the last session died mid-write
        return state

    def _stamp(self, state: TrainingState) -> None:
        """Record in ``state`` what this session trains with: devices, Keras backend, dtype policy."""
        state.devices, state.backend = self.loop.placement.replicas, self.backend.BACKEND
        state.precision = keras.config.dtype_policy().name

    def _say_if_trajectory_changed(self, state: TrainingState, checkpoint: str) -> None:
        """A resume on another number of devices, or on another Keras backend, continues from the checkpoint's
        exact variables, along another trajectory: say so where it is read (console, log, events, status)."""
        devices, backend = self.loop.placement.replicas, self.backend.BACKEND
        changes = []
        if state.devices != devices:
            changes.append(
                f"was trained on {counted(state.devices, 'device')} and this session has {devices} (each batch is "
                "split between the devices another way)"
            )
            self.context.job.events.append(
                "devices-changed", checkpoint=checkpoint, before=state.devices, after=devices
            )
        if state.backend != backend:
            changes.append(
                f"was written by Keras' {state.backend} backend and this session runs {backend} (its variables are "
                "restored exactly; images are decoded and random numbers drawn another way)"
            )
            self.context.job.events.append(
                "backend-changed", checkpoint=checkpoint, before=state.backend, after=backend
            )
        if not changes:
            return
        message = (
            f"checkpoint {checkpoint} {' and '.join(changes)}: training goes on, but from here it differs from an "
            "uninterrupted run"
        )
        self.context.warn(message)
        self.context.claim.update(trajectory_changed=message)  # for status: the job's trajectory is not one run's

    def _snapshot(self, state: TrainingState, publisher: Publisher) -> None:
        """Capture the training state in memory (the only cost to the training loop) and hand it to the publisher,
        whose thread writes it straight into the job folder while training goes on."""
        self._snapshots += 1
        state.elapsed_s = self.elapsed_before + (self.clock() - self.started)
        folder = self.workdir / "snapshots" / f"{self._snapshots:06d}-e{state.epoch}-s{state.step}"
        publisher.submit(take_snapshot(self.model, state, folder))
        self.snapshot_position = (state.epoch, state.step)
        self.last_snapshot_at = self.clock()

    def _finish(self, publisher: Publisher, state: TrainingState) -> None:
        """Export, once the last checkpoint and the history are in the job folder: only then may the job be done.

        The export is written on local disk while the publisher is still committing the last checkpoint (for the
        tutorial's network both are a gigabyte: overlapped, neither waits for the other); it goes to the job
        folder only once that checkpoint has."""
        paths = self.context.job.paths
        local = self.workdir / "final"
        best = state.best_weights if self.spec.export.best else None
        if self.spec.export.best and best is None:
            self.context.log.warning("export.best: no best epoch's weights were kept (added by runner edit late?)")
        description = describe_model(
            self.spec, self.data.class_names, state.history, best=state.best if best is not None else None
        )
        names = write_exports(self.model, self.spec, local, description, best_weights=best)
        if not publisher.flush(timeout := flush_timeout()):
            raise StorageError(
                f"{paths.checkpoints}: the last checkpoint was not published within {timeout:.0f}s; the job stays "
                "resumable, and the next `runner work` on this machine publishes it and finishes the job",
                path=str(paths.checkpoints),
                transient=True,
            )
        check_history(paths.history, state.history)
        killpoints.reached("export-written")
        publish_exports(local, paths, fence=self.context.claim.fence)
        killpoints.reached("export-published")
        self.context.log.info("exported %s", ", ".join(names))
        self.context.job.events.append("exported", files=names)

    # --- a snapshot that could not be published -------------------------------------------------------------

    def _keep_unpublished(self, publisher: Publisher) -> None:
        """Keep the newest snapshot that did not reach the job folder (outage, lost lease), for the next claim here."""
        snapshot = publisher.unpublished()
        if snapshot is None:
            return
        try:
            snapshot.write()  # the publisher writes only to the job folder: until now it was in memory
            kept = keep_snapshot(
                snapshot.folder,
                cache_dir=self.cache_dir,
                job=self.context.job,
                generation=self.context.generation,
                claim_token=self.context.claim.token,
                epoch=snapshot.epoch,
                step=snapshot.step,
                meta=snapshot.meta,
            )
        except (OSError, StorageError) as error:
            self.context.log.error("could not keep the unpublished checkpoint on local disk: %s", error)
            return
        log = self.context.log
        log.warning("the checkpoint at epoch %d step %d is kept on local disk: %s", kept.epoch, kept.step, kept.files)
        self.context.console.print(
            f"[yellow]job {self.context.job.name!r}: the checkpoint at epoch {kept.epoch} step {kept.step} did not "
            "reach the job folder; it is kept on this machine's disk, and the next `runner work` here publishes it[/]",
            soft_wrap=True,
        )

    def _publish_kept(self) -> None:
        """Publish a snapshot an earlier claim on this machine kept, unless a newer claim has committed since."""
        info = publish_kept(self.cache_dir, self.context.store)
        if info is None:
            return
        self.context.record_checkpoint(info, metrics=info.meta.get("metrics") or {})
        publish_note(self.cache_dir, self.context.job.name).unlink(missing_ok=True)  # status: nothing waits now
        self.context.console.print(
            f"published checkpoint {info.id}, kept on this machine's disk by an earlier session", markup=False
        )
