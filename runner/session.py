"""One session of work, as ``runner work`` and ``runner.work()`` run it.

The worker does the jobs; around it, this module decides how long the session may run (``--max-hours``, on
Colab by default until a little before the 12-hour cap), what it trains on (recorded per job), and what happens
to the machine at the end (``--flush`` Drive's pending writes, ``--release-runtime`` hand the runtime back).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape

from runner import colab
from runner.errors import DatasetError, DriveUnavailable
from runner.paths import default_cache_dir
from runner.queue import Queue
from runner.settings import check_keras_backend, logical_cpus_from_environment
from runner.training import default_trainer_name, lazy_trainer
from runner.worker import Worker, WorkResult, restore_signal_handlers


@dataclass(frozen=True)
class SessionOptions:
    """How one session of work runs and ends."""

    job: str | None = None
    """Run only this job."""
    max_hours: float | None = None
    """Stop (with a checkpoint) after this many hours; ``None``: Colab's default, or no limit elsewhere."""
    flush: bool = False
    """At the end, push Drive's pending writes to the cloud (and unmount it)."""
    release_runtime: bool = False
    """At the end, hand the Colab runtime back (flushing Drive first, or its last writes would be lost)."""
    refresh_data: bool = False
    """Before the work, forget the local copies of the datasets of the jobs it runs, so that they are fetched again."""


def time_limit_hours(options: SessionOptions, console: Console) -> float | None:
    """The session's time limit in hours: the one given, or Colab's default (said aloud), or none."""
    if options.max_hours is not None:
        return colab.check_max_hours(options.max_hours)
    uptime_s = colab.vm_uptime_s()
    hours = colab.default_max_hours(uptime_s)
    if hours is not None and hours <= 0:
        console.print(
            f"[yellow]this Colab VM has run {(uptime_s or 0) / 3600:.1f} h, past the point where runner stops "
            f"({colab.COLAB_SESSION_HOURS - colab.COLAB_STOP_MARGIN_HOURS:g} h, before the "
            f"{colab.COLAB_SESSION_HOURS:g}-hour cap): no job is started. Start a new session (Runtime > "
            "Disconnect and delete runtime), or pass --max-hours to run anyway[/]",
            highlight=False,
        )
    elif hours is not None:
        console.print(
            f"Colab session: stopping with a checkpoint within {hours:.1f} h, before the "
            f"{colab.COLAB_SESSION_HOURS:g}-hour cap (change it with --max-hours)",
            markup=False,
            highlight=False,
        )
    return hours


def run_session(
    queue: Queue,
    options: SessionOptions,
    console: Console,
    *,
    install_signal_handlers: bool = True,
    worker_factory: Callable[..., Worker] = Worker,
    before_finish: Callable[[WorkResult], None] | None = None,
) -> WorkResult:
    """Run every runnable job of ``queue`` (or ``options.job``), then flush and release as asked.

    ``before_finish`` runs between the two, while Drive is still mounted and the runtime still there (the command
    line prints the status table then).
    """
    max_hours = time_limit_hours(options, console)
    logical_cpus_from_environment()  # refused here, before any job is claimed, not by the engine later
    check_keras_backend()
    if options.refresh_data:
        forget_datasets(queue, options.job, console)

    def warn(line: str) -> None:
        console.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True)

    worker = worker_factory(
        queue,
        lazy_trainer(default_trainer_name()),
        console=console,
        only=options.job,
        max_hours=max_hours,
        detect_device=lambda: colab.session_device(warn),
    )
    # Python lets only the main thread set signal handlers: a notebook running `runner.work()` in a background
    # thread runs without them (the kernel's Ctrl-C does not reach that thread anyway).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = worker.install_signal_handlers() if install_signal_handlers and in_main_thread else {}
    try:
        result = worker.run()
    finally:
        restore_signal_handlers(previous)
    if before_finish is not None:
        before_finish(result)
    finish_session(options, result, console)
    return result


def forget_datasets(queue: Queue, only: str | None, console: Console) -> None:
    """Forget the cached copy of the dataset of every job this work would run (``--refresh-data``)."""
    from runner.train.data.cache import forget_cached  # noqa: PLC0415 (TensorFlow loads; the work trains anyway)

    cache_dir, forgotten = default_cache_dir(), set()
    for view in queue.views():
        if view.spec is None or not view.wants_worker or (only is not None and view.name != only):
            continue
        if view.spec.dataset.source in forgotten:
            continue
        forgotten.add(view.spec.dataset.source)
        try:
            forget_cached(view.spec.dataset, cache_dir=cache_dir, console=console)
        except DatasetError:
            continue  # a source that is not there: the job's own run says so, in its place


def finish_session(options: SessionOptions, result: WorkResult, console: Console) -> None:
    """Flush Drive and release the runtime when asked, unless a person stopped the work (Ctrl-C, a signal)."""
    if result.signal is not None or not (options.flush or options.release_runtime):
        return

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    if not colab.on_colab():
        say("--flush/--release-runtime: not on Colab, nothing to do")
        return
    flushed = colab.flush_drive(say)
    if options.release_runtime:
        if not flushed and _drive_may_hold_writes():
            say("not releasing the runtime: Drive may still hold unsent writes; release it by hand in a few minutes")
            return
        colab.release_runtime(say)


def _drive_may_hold_writes() -> bool:
    try:
        return colab.drive_mounted_default()
    except DriveUnavailable:
        return True  # a broken mount may still hold writes that DriveFS uploads once it recovers
