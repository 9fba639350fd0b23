"""Learning curves: a job's loss and metrics per epoch with its restarts marked, or every job of a queue compared.

matplotlib is imported inside the functions, never at module level, so ``import runner`` stays fast and free of
it. Figures use the object API on the Agg canvas, never pyplot's global state: they draw with no display, in a
script, a worker's shell or a notebook (which shows the returned :class:`~matplotlib.figure.Figure` inline).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import storage
from runner.errors import NoHistory, UsageError
from runner.history import read_history
from runner.queue import Queue
from runner.words import counted

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
"""Picture formats written, by the output file's suffix."""

QUEUE_PICTURE = "queue.png"
"""Default output of the all-jobs comparison (one job's default is ``<name>.png``)."""

DPI = 120
"""Dots per inch of raster output: sharp on a laptop screen, still a small file."""

SUBPLOT_SIZE_IN = (5.0, 4.0)
"""Width and height of one subplot, in inches."""

RESTART_COLOUR = "grey"
EARLY_STOP_COLOUR = "firebrick"
LOWERED_COLOUR = "darkorange"
FINE_TUNE_COLOUR = "seagreen"
LEARNING_RATE = "lr"
"""history.csv's column of the learning rate: drawn on a subplot of its own when it moved."""


@dataclass(frozen=True)
class Curves:
    """One job's history.csv as numbers: epochs counted from 1, one value per epoch per column (NaN if none)."""

    job: str
    epochs: list[int]
    columns: dict[str, list[float]]

    @property
    def empty(self) -> bool:
        """Whether there is nothing to draw: no completed epoch, or no number in any column."""
        return not self.epochs or not self.metrics

    def has(self, column: str) -> bool:
        """Whether ``column`` holds at least one number."""
        return any(not math.isnan(value) for value in self.columns.get(column, []))

    @property
    def metrics(self) -> list[str]:
        """Metric names with any value, train or validation, in the file's order (``loss`` first)."""
        names: list[str] = []
        for column in self.columns:
            name = column.removeprefix("val_")
            if name == LEARNING_RATE:
                continue  # drawn on its own, not as a metric
            if name not in names and (self.has(name) or self.has(f"val_{name}")):
                names.append(name)
        return names

    def best_epoch(self) -> tuple[str, int, float] | None:
        """(monitor, epoch, value) of the lowest ``val_loss``, or ``loss`` without validation; the earliest on ties."""
        for monitor in ("val_loss", "loss"):
            found = [
                (value, index) for index, value in enumerate(self.columns.get(monitor, [])) if not math.isnan(value)
            ]
            if found:
                value, index = min(found)
                return monitor, self.epochs[index], value
        return None


@dataclass(frozen=True)
class Restart:
    """Where a run resumed from a checkpoint, on the curves' x axis."""

    number: int
    x: float
    checkpoint: str | None


def read_curves(queue: Queue, name: str) -> Curves:
    """The job's history as numbers; :class:`~runner.errors.JobNotFound` for an unknown job."""
    rows = read_history(queue.job(name).paths.history)
    columns: dict[str, list[float]] = {key: [] for key in (rows[0] if rows else {}) if key not in ("epoch", None)}
    epochs = []
    for row in rows:
        epoch = _number(row.get("epoch"))
        if not math.isfinite(epoch):
            continue
        # history.csv counts epochs from 0; Keras prints "Epoch 1/15" for the first, and so do the plots.
        epochs.append(int(epoch) + 1)
        for column, values in columns.items():
            values.append(_number(row.get(column)))
    return Curves(name, epochs, columns)


def read_restarts(queue: Queue, name: str) -> list[Restart]:
    """The job's resumes from its ``resumed`` events, numbered in order from 1."""
    restarts: list[Restart] = []
    for event in queue.job(name).events.read():
        if event.get("event") != "resumed" or not math.isfinite(epoch := _number(event.get("epoch"))):
            continue
        # The point at x = n is the end of epoch n, i.e. after n completed epochs. A checkpoint with `epoch`
        # completed epochs and `step` batches of the next one done lies step/steps_per_epoch of the way from
        # point `epoch` to point `epoch + 1`: with 3 epochs done and step 0 the line sits at x = 3, right on the
        # last point kept, and training goes on towards the point at 4. Older folders do not record
        # steps_per_epoch: the line then marks the start of the interrupted epoch.
        step, steps_per_epoch = _number(event.get("step")), _number(event.get("steps_per_epoch"))
        fraction = step / steps_per_epoch if steps_per_epoch > 0 and step > 0 else 0.0
        restarts.append(Restart(len(restarts) + 1, epoch + fraction, event.get("checkpoint")))
    return restarts


def figure_for_job(queue: Queue, name: str) -> Figure:
    """One job's learning curves: a subplot for the loss and one per metric, train and validation, and one for
    the learning rate when it moved; restarts as dashed lines, an early stop as a solid one, the start of
    fine-tuning as a dash-dotted one, the best epoch starred; :class:`~runner.errors.NoHistory` before its first epoch."""
    curves = read_curves(queue, name)
    if curves.empty:
        raise NoHistory(str(queue.root), name)
    restarts = read_restarts(queue, name)
    events = queue.job(name).events.read()
    stopped = next((event for event in events if event.get("event") == "early-stopped"), None)
    # A session killed after the switch and before its checkpoint switches again: the same epoch, one mark.
    tuned = next((event for event in events if event.get("event") == "fine-tuning"), None)
    metrics = curves.metrics
    rates = curves.columns.get(LEARNING_RATE, [])
    moving = curves.has(LEARNING_RATE) and len({value for value in rates if not math.isnan(value)}) > 1
    panels = [*metrics, LEARNING_RATE] if moving else metrics
    figure = _new_figure(len(panels))
    for axes, metric in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        handles = []
        if metric == LEARNING_RATE:
            handles += axes.plot(curves.epochs, rates, marker="o", markersize=3, label="rate of the epoch's last step")
            lowered = [event for event in events if event.get("event") == "lr-reduced"]
            for event in lowered:
                axes.axvline(_number(event.get("epoch")), color=LOWERED_COLOUR, linestyle=":", linewidth=1)
            if lowered:
                handles.append(axes.plot([], [], color=LOWERED_COLOUR, linestyle=":", label="lowered on a plateau")[0])
            axes.set_yscale("log")
        else:
            for column, label in ((metric, "train"), (f"val_{metric}", "validation")):
                if curves.has(column):
                    handles += axes.plot(curves.epochs, curves.columns[column], marker="o", markersize=3, label=label)
            if metric == "loss" and (best := curves.best_epoch()) is not None:
                handles.append(_mark_best(axes, *best))
        _mark_restarts(axes, restarts)
        if stopped is not None:
            handles.append(_mark_early_stop(axes, stopped))
        if tuned is not None:
            handles.append(_mark_fine_tune(axes, tuned))
        _finish_axes(axes, "learning rate" if metric == LEARNING_RATE else metric, handles)
    done = counted(len(curves.epochs), "epoch")
    resumed = f", {counted(len(restarts), 'restart')}" if restarts else ""
    early = ", stopped early" if stopped is not None else ""
    fine = f", fine-tuned from epoch {_number(tuned.get('epoch')):.0f}" if tuned is not None else ""
    figure.suptitle(f"{name}: {done}{resumed}{fine}{early}")
    return figure


def figure_for_queue(queue: Queue) -> Figure:
    """Every job of the queue compared: the loss and the first metric all jobs share, one colour per job,
    validation dashed; jobs with no history yet are named in a note. :class:`~runner.errors.NoHistory` if none
    has any."""
    from matplotlib import colormaps  # noqa: PLC0415 (see the module docstring)

    plotted, waiting = [], []
    for view in queue.views():
        curves = read_curves(queue, view.name)
        if not curves.empty:
            plotted.append(curves)
        else:
            waiting.append(view.name)
    if not plotted:
        raise NoHistory(str(queue.root))
    shared = [name for name in plotted[0].metrics if name != "loss" and all(name in c.metrics for c in plotted)]
    metrics = ["loss", *shared[:1]]
    colours = colormaps["tab10" if len(plotted) <= 10 else "tab20"]
    palette = [colours(index) for index in range(colours.N)]  # beyond 20 jobs colours repeat
    figure = _new_figure(len(metrics))
    for axes, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics):
        handles = []
        for index, curves in enumerate(plotted):
            colour = palette[index % len(palette)]
            lines = []
            for column, style, label in ((metric, "-", curves.job), (f"val_{metric}", "--", f"{curves.job} val")):
                if curves.has(column):
                    lines += axes.plot(curves.epochs, curves.columns[column], style, color=colour, label=label)
            handles += lines[:1]  # one legend entry per job; the title says which style is which
        _finish_axes(axes, f"{metric} (solid: train, dashed: validation)", handles)
    figure.suptitle(f"queue {queue.root.name or queue.root}: {counted(len(plotted), 'job')}")
    if waiting:
        figure.supxlabel(f"no history yet: {', '.join(waiting)}", fontsize=9, color="grey")
    return figure


def plot_job(queue: Queue, name: str, output: str | Path | None = None) -> Path:
    """Write one job's learning curves to ``output`` (default ``<name>.png`` here); returns the path written."""
    target = _output_path(output, f"{name}.png")
    return save_figure(figure_for_job(queue, name), target)


def plot_queue(queue: Queue, output: str | Path | None = None) -> Path:
    """Write every job's curves compared to ``output`` (default ``queue.png`` here); returns the path written."""
    target = _output_path(output, QUEUE_PICTURE)
    return save_figure(figure_for_queue(queue), target)


def picture_format(path: Path) -> str:
    """matplotlib's format name for ``path``'s suffix; :class:`~runner.errors.UsageError` for any other suffix."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        shown = f"format {suffix!r}" if suffix else "format (no suffix)"
        raise UsageError(f"cannot write {path}: unknown picture {shown}; name the file .png, .pdf or .svg")
    return FORMATS[suffix]


def save_figure(figure: Figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` in the format its suffix names, creating its folder; returns the path."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=picture_format(path), dpi=DPI)
    storage.make_dirs(path.parent)
    # Rendered whole in memory, then written beside the target and renamed over it: a kill at any instant leaves
    # the previous picture or none, never half of one.
    storage.atomic_write_bytes(path, buffer.getvalue())
    return path


def _output_path(output: str | Path | None, default: str) -> Path:
    path = Path(output).expanduser() if output is not None else Path(default)
    picture_format(path)  # refuse a bad suffix before reading anything
    return path.absolute()


def _new_figure(subplots: int) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (see the module docstring)
    from matplotlib.figure import Figure  # noqa: PLC0415

    width, height = SUBPLOT_SIZE_IN
    figure = Figure(figsize=(width * max(subplots, 1), height), layout="constrained")
    FigureCanvasAgg(figure)  # draws without a display; no pyplot, so no global figure list in a notebook
    return figure


def _mark_best(axes: Axes, monitor: str, epoch: int, value: float) -> Any:
    label = f"best: epoch {epoch} ({monitor} {value:.4g})"
    marker = axes.plot([epoch], [value], linestyle="none", marker="*", markersize=14, color="gold", label=label)[0]
    marker.set_markeredgecolor("black")
    return marker


def _mark_early_stop(axes: Axes, stopped: dict[str, Any]) -> Any:
    epoch = _number(stopped.get("epoch"))
    label = f"stopped early after epoch {epoch:.0f}"
    return axes.axvline(epoch, color=EARLY_STOP_COLOUR, linestyle="-", linewidth=1.5, label=label)


def _mark_fine_tune(axes: Axes, tuned: dict[str, Any]) -> Any:
    """A line between the last epoch of the frozen base and the first fine-tuned one."""
    epoch = _number(tuned.get("epoch"))
    label = f"fine-tuning from epoch {epoch:.0f}"
    return axes.axvline(epoch - 0.5, color=FINE_TUNE_COLOUR, linestyle="-.", linewidth=1.5, label=label)


def _mark_restarts(axes: Axes, restarts: list[Restart]) -> None:
    labels: dict[float, list[int]] = {}
    for restart in restarts:
        axes.axvline(restart.x, color=RESTART_COLOUR, linestyle="--", linewidth=1, label=f"restart {restart.number}")
        labels.setdefault(restart.x, []).append(restart.number)
    for x, numbers in labels.items():
        # Runs killed again before a new checkpoint resume at the same place: one text names them all.
        text = f"restart {', '.join(str(number) for number in numbers)}"
        axes.text(
            x, 0.98, text, transform=axes.get_xaxis_transform(), rotation=90, ha="right", va="top",
            fontsize=8, color=RESTART_COLOUR,
        )  # fmt: skip


def _finish_axes(axes: Axes, title: str, handles: list[Any]) -> None:
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 (see the module docstring)

    axes.set_title(title)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    if handles:
        axes.legend(handles=handles, fontsize=8)  # restart lines are labelled on the plot, not in the legend


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
