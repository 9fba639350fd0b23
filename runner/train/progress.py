"""The epoch progress bar (steps, rate, ETA, live metrics) and the one-line summary per epoch.

rich renders the bar in place in a terminal and as one updating widget in a notebook; a low refresh rate
keeps notebook output small.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def format_metrics(metrics: dict[str, float]) -> str:
    """``loss=0.4123 accuracy=0.8100``."""
    return " ".join(f"{name}={value:.4f}" for name, value in metrics.items() if name != "epoch")


class EpochProgress:
    """A progress bar for one epoch at a time."""

    def __init__(self, console: Console, *, job: str, epochs: int) -> None:
        self.console, self.job, self.epochs = console, job, epochs
        self._progress: Progress | None = None
        self._task = None

    def start(self, epoch: int, *, total: int, completed: int) -> None:
        """Show the bar of ``epoch`` (0-based), already ``completed`` steps in after a resume."""
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
        self._task = self._progress.add_task(
            f"{self.job} epoch {epoch + 1}/{self.epochs}", total=total, completed=completed, metrics="", rate=""
        )
        self._started, self._steps = time.monotonic(), 0

    def advance(self, metrics: dict[str, float]) -> None:
        """One more step done."""
        if self._progress is not None and self._task is not None:
            self._steps += 1
            rate = self._steps / max(time.monotonic() - self._started, 1e-9)
            self._progress.update(self._task, advance=1, metrics=format_metrics(metrics), rate=f"{rate:.1f} it/s")

    def stop(self) -> None:
        """Remove the bar."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def summary(self, epoch: int, metrics: dict[str, float], seconds: float) -> str:
        """The line printed when an epoch ends."""
        line = f"{self.job} epoch {epoch + 1}/{self.epochs} {format_metrics(metrics)} ({seconds:.1f}s)"
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        return line
