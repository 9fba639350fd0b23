"""The epoch progress display (steps, rate, ETA, live metrics) and the one-line summary per epoch.

Three ways to show it, chosen by where the output goes:

- a terminal: a rich progress bar, redrawn in place;
- a notebook (Jupyter, Colab's ``runner.work()``): one output area updated in place at most once a second, and
  reused for every epoch, so a long run leaves one line per epoch in the notebook rather than thousands;
- anything else (a log file, Colab's ``!runner work`` cell, which does not redraw terminal escapes): a plain
  line at most every :data:`PLAIN_PROGRESS_INTERVAL_S` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from runner.paths import on_colab

PLAIN_PROGRESS_INTERVAL_S = 30.0
"""Seconds between two progress lines where nothing can be redrawn in place."""

NOTEBOOK_REFRESH_S = 1.0
"""Seconds between two updates of a notebook's progress line (each update is a message to the browser)."""

METRICS_REFRESH_S = 1.0
"""Seconds between two reads of the live metrics for a terminal's bar (each read waits for the device)."""

_BAR_WIDTH = 24


def format_metrics(metrics: dict[str, float]) -> str:
    """``loss=0.4123 accuracy=0.8100``."""
    return " ".join(f"{name}={value:.4f}" for name, value in metrics.items() if name != "epoch")


def format_duration(seconds: float) -> str:
    """``0:07:05``."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(
    description: str, *, completed: int, total: int, rate: float, metrics: dict[str, float], bar: bool
) -> str:
    """``digits epoch 3/10 [######------] 12/23 4.1 it/s eta 0:00:03 loss=0.41``."""
    parts = [description]
    if bar:
        filled = round(_BAR_WIDTH * completed / total) if total else 0
        parts.append("[" + "#" * filled + "-" * (_BAR_WIDTH - filled) + "]")
    parts.append(f"{completed}/{total}")
    if rate > 0:
        parts.append(f"{rate:.1f} it/s eta {format_duration((total - completed) / rate)}")
    if text := format_metrics(metrics):
        parts.append(text)
    return " ".join(parts)


def display_mode(console: Console) -> str:
    """``terminal``, ``notebook`` or ``plain``: see the module docstring."""
    if console.is_jupyter:
        return "notebook"
    if console.is_terminal and not console.is_dumb_terminal and not on_colab():
        return "terminal"
    return "plain"


class EpochProgress:
    """A progress display for one epoch at a time."""

    def __init__(
        self,
        console: Console,
        *,
        job: str,
        epochs: int,
        mode: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console, self.job, self.epochs, self.clock = console, job, epochs, clock
        self.mode = mode or display_mode(console)
        self._progress: Progress | None = None
        self._task: Any = None
        self._notebook: Any = None  # an IPython display handle, made on first use and reused every epoch
        self._active = False
        self._completed = self._total = self._steps = 0
        self._started = self._shown_at = 0.0
        self._description = ""

    def start(self, epoch: int, *, total: int, completed: int) -> None:
        """Show the display of ``epoch`` (0-based), already ``completed`` steps in after a resume."""
        self._description = f"{self.job} epoch {epoch + 1}/{self.epochs}"
        self._completed, self._total, self._steps = completed, total, 0
        self._started = self._shown_at = self.clock()
        self._active = True
        if self.mode == "terminal":
            self._start_bar(completed, total)
        elif self.mode == "notebook":
            self._show_in_notebook(self._line({}))

    def advance(self, steps: int, read_metrics: Callable[[], dict[str, float]]) -> None:
        """``steps`` more steps done; ``read_metrics`` (a device-to-host read) is called at most once a second."""
        if not self._active:
            return
        self._steps += steps
        self._completed += steps
        now = self.clock()
        if self._progress is not None and self._task is not None:
            fields = {"rate": f"{self._rate(now):.1f} it/s"}
            if now - self._shown_at >= METRICS_REFRESH_S:
                self._shown_at = now
                fields["metrics"] = format_metrics(read_metrics())
            self._progress.update(self._task, advance=steps, **fields)
        elif self.mode == "notebook" and now - self._shown_at >= NOTEBOOK_REFRESH_S:
            self._shown_at = now
            self._show_in_notebook(self._line(read_metrics(), now))
        elif self.mode == "plain" and now - self._shown_at >= PLAIN_PROGRESS_INTERVAL_S:
            self._shown_at = now
            self.console.print(self._line(read_metrics(), now, bar=False), markup=False, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        """Remove the display (the epoch's summary line replaces it)."""
        self._active = False
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._notebook is not None:
            self._notebook.update(_PlainText(""))

    def summary(self, epoch: int, metrics: dict[str, float], seconds: float) -> str:
        """The line printed when an epoch ends."""
        line = f"{self.job} epoch {epoch + 1}/{self.epochs} {format_metrics(metrics)} ({seconds:.1f}s)"
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        return line

    # --- the three displays ---------------------------------------------------------------------------------

    def _rate(self, now: float) -> float:
        return self._steps / max(now - self._started, 1e-9)

    def _line(self, metrics: dict[str, float], now: float | None = None, *, bar: bool = True) -> str:
        rate = self._rate(now) if now is not None and self._steps else 0.0
        return progress_line(
            self._description, completed=self._completed, total=self._total, rate=rate, metrics=metrics, bar=bar
        )

    def _start_bar(self, completed: int, total: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
            transient=True,
            refresh_per_second=2,
        )
        self._progress.start()
        self._task = self._progress.add_task(self._description, total=total, completed=completed, metrics="", rate="")

    def _show_in_notebook(self, line: str) -> None:
        from IPython.display import display  # noqa: PLC0415 (only in a notebook, where IPython is loaded)

        if self._notebook is None:
            self._notebook = display(_PlainText(line), display_id=True)
        else:
            self._notebook.update(_PlainText(line))


class _PlainText:
    """A line a notebook shows as preformatted text (IPython's own objects would add quotes)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.text)
