"""What people see: the status table (rich) and the status JSON contract."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from runner import storage
from runner.device import short_device, short_engine
from runner.errors import StorageError
from runner.lease import process_exists
from runner.paths import default_cache_dir, publish_note
from runner.queue import INTERRUPTED, JobView, Queue
from runner.words import counted

STATE_STYLES = {
    "queued": "cyan",
    "running": "bold green",
    INTERRUPTED: "bold yellow",
    "done": "green",
    "failed": "bold red",
    "cancelled": "dim",
}


def eta_seconds(view: JobView, now: float) -> float | None:
    """Seconds until a running job's last epoch, from its pace since this session's claim; ``None`` if unknown."""
    state = view.state
    if state is None or view.epochs is None or view.shown_state(now) != "running":
        return None
    if state.session_started_at is None or state.checkpoint_at is None:
        return None
    done_since_claim = state.epoch - state.session_start_epoch
    spent = state.checkpoint_at - state.session_started_at
    if done_since_claim <= 0 or spent <= 0:
        return None
    remaining = ((view.epochs or 0) - state.epoch) * spent / done_since_claim
    return max(0.0, remaining - (now - state.checkpoint_at))


def local_publish_note(view: JobView, now: float, cache_dir: Path | None = None) -> dict[str, Any] | None:
    """This machine's note that the job's newest checkpoint waits on local disk (the job folder is failing)."""
    note = _read_note(publish_note(cache_dir or default_cache_dir(), view.name))
    current = note is not None and view.state is not None and note.get("generation") == view.state.generation
    if not (current and view.shown_state(now) == "running"):
        return None  # left by a worker that has gone: not news any more
    return note


def notes_kept_here(queue: Queue, now: float, cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """This machine's notes for the queue's jobs whose newest checkpoint waits on local disk, read without the
    queue folder (for when it is the folder that fails), newest failure first."""
    notes = []
    for path in sorted((cache_dir or default_cache_dir()).joinpath("publishing").glob("*.json")):
        note = _read_note(path)
        if note is None or not _written_by_a_live_worker_here(note):
            continue  # a worker killed during an outage left it: not news any more
        if note.get("folder") == os.path.abspath(queue.paths.job(path.stem).folder):
            failing_for_s = round(max(0.0, now - float(note.get("since", now))), 1)
            notes.append(note | {"job": path.stem, "failing_for_s": failing_for_s})
    return sorted(notes, key=lambda note: note["failing_for_s"])


def _read_note(path: Path) -> dict[str, Any] | None:
    """A publishing note as written, or ``None`` where there is none (or one being replaced, or damaged)."""
    try:
        note = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def _written_by_a_live_worker_here(note: dict[str, Any]) -> bool:
    pid = note.get("pid")
    return isinstance(pid, int) and note.get("host") == socket.gethostname() and process_exists(pid)


def queue_failing(queue: Queue, error: Exception, now: float) -> Group:
    """What status shows when the queue folder itself fails: the error, and what this machine keeps meanwhile."""
    lines = [Text.assemble(("error: ", "red"), str(error))]
    for note in notes_kept_here(queue, now):
        lines.append(
            Text(
                f"{note['job']}: the checkpoint at epoch {note.get('epoch')} step {note.get('step')} is kept on this "
                f"machine's disk (publishing has been failing for {format_age(note['failing_for_s'])}) and is "
                "published when the folder answers again",
                style="yellow",
            )
        )
    return Group(*lines)


class FolderSizes:
    """Each job folder's size on disk, measured again once ``max_age_s`` has passed (a walk of a folder on Drive is
    not free: ``--watch`` measures every 30 s, not every refresh)."""

    def __init__(self, *, max_age_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s, self.clock = max_age_s, clock
        self._measured: dict[Path, tuple[float, int | None]] = {}

    def of(self, view: JobView) -> int | None:
        """Bytes in the job's folder, or ``None`` when it cannot be read."""
        if view.folder is None:
            return None
        now = self.clock()
        measured = self._measured.get(view.folder)
        if measured is None or now - measured[0] >= self.max_age_s:
            measured = (now, storage.tree_size(view.folder))
            self._measured[view.folder] = measured
        return measured[1]


def format_size(size: int | None) -> str:
    """``4.2 GB``, ``850 MB``, ``12 kB``: decimal units, as Drive counts its 15 GB."""
    if size is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if size < 10 * scale else f"{size / scale:.0f} {unit}"
    return f"{size} B"


def status_record(view: JobView, now: float, size_bytes: int | None = None) -> dict[str, Any]:
    """One job as the ``runner status --json`` contract describes it (plus a few extra keys)."""
    state, spec = view.state, view.spec
    holder = view.holder
    return {
        "name": view.name,
        "state": view.shown_state(now),
        "epoch": state.epoch if state else 0,
        "epochs": view.epochs,
        "step": state.step if state else 0,
        "restarts": state.restarts if state else 0,
        "checkpoint": state.checkpoint if state else None,
        "metrics": dict(state.metrics) if state else {},
        "batch_size": (state.batch_size if state else None) or (spec.dataset.batch_size if spec else None),
        "error": view.error,
        "priority": spec.priority if spec else None,
        "generation": state.generation if state else None,
        "worker": holder.describe() if holder else (state.worker if state else None),
        "heartbeat_age_s": round(holder.heartbeat_age(now), 1) if holder else None,
        "checkpoint_age_s": round(now - state.checkpoint_at, 1) if state and state.checkpoint_at else None,
        "eta_s": _round(eta_seconds(view, now)),
        "submitted_at": state.submitted_at if state else None,
        "updated_at": state.updated_at if state else None,
        "publishing": _publishing(view, now),
        "device": state.device if state else None,
        "size_bytes": size_bytes,
        "stopped_early": state.stopped_early if state else None,
        "trained_by": view.code.kind if view.code is not None else "spec",
        "devices": state.devices if state else None,
        "backend": state.backend if state else None,
        "trajectory_changed": state.trajectory_changed if state else None,
    }


def _publishing(view: JobView, now: float) -> dict[str, Any] | None:
    note = local_publish_note(view, now)
    if note is None:
        return None
    return {
        "kept_locally": f"epoch {note.get('epoch')} step {note.get('step')}",
        "failing_for_s": round(max(0.0, now - float(note.get("since", now))), 1),
        "error": note.get("error"),
    }


def status_records(views: list[JobView], now: float, sizes: FolderSizes | None = None) -> list[dict[str, Any]]:
    """Every job as JSON-able records, in claim order."""
    sizes = sizes or FolderSizes()
    return [status_record(view, now, sizes.of(view)) for view in views]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def format_age(seconds: float | None) -> str:
    """A short human duration: 42s, 5m, 2h 05m, 3d 4h."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _metrics_text(metrics: dict[str, float]) -> str:
    return " ".join(f"{key}={value:.4g}" for key, value in list(metrics.items())[:4]) or "-"


_BAR_CELLS = 6


def _epochs_cell(epoch: int, epochs: int) -> Text:
    filled = round(_BAR_CELLS * epoch / epochs) if epochs else 0
    return Text.assemble(("━" * filled, "green"), ("─" * (_BAR_CELLS - filled), "dim"), f" {epoch}/{epochs or '?'}")


HEADERS = ("job", "state", "epochs", "step", "metrics", "saved", "size", "restarts", "worker", "eta")

DROPPED_FIRST = ("eta", "restarts", "step", "worker", "size", "saved")
"""On a screen too narrow for every column (80 columns: Colab's ``!`` cells), these go, in this order, until the
table fits; the metrics wrap one per line before any is cut. ``--json`` always has every value."""


def status_table(
    views: list[JobView],
    now: float,
    *,
    title: str | None = None,
    width: int | None = None,
    sizes: FolderSizes | None = None,
) -> Group:
    """The status table, one row per job in claim order, with full error lines beneath it; the title ends with the
    space all the jobs take.

    Every column but the metrics keeps its full width; the metrics wrap on a narrow screen. Given the screen's
    ``width``, columns are dropped in the order of :data:`DROPPED_FIRST` until the table fits.
    """
    headers = HEADERS
    rows, errors = [], []
    sizes = sizes or FolderSizes()
    total = 0
    for view in views:
        record = status_record(view, now, sizes.of(view))
        total += record["size_bytes"] or 0
        shown = record["state"]
        if record["error"]:
            errors.append(Text.assemble((f"{view.name}: ", "bold"), (record["error"], "red")))
            notes = Text("error (below)", style="red")
        elif publishing := record["publishing"]:
            waiting = (
                f"the job folder has been failing for {format_age(publishing['failing_for_s'])}: the checkpoint at "
                f"{publishing['kept_locally']} is kept on local disk and is published when it recovers "
                f"({publishing['error']})"
            )
            errors.append(Text.assemble((f"{view.name}: ", "bold"), (waiting, "yellow")))
            notes = Text("kept locally (below)", style="yellow")
        else:
            notes = Text(_metrics_text(record["metrics"]))
        if view.code is not None and shown in ("queued", INTERRUPTED):
            own = (
                f"trained by the user's own code ({view.code.kind}), not by `runner work`: run that code again (the "
                "same job name) to resume it"
            )
            errors.append(Text.assemble((f"{view.name}: ", "bold"), (own, "cyan")))
        if record["trajectory_changed"]:
            errors.append(Text.assemble((f"{view.name}: ", "bold"), (record["trajectory_changed"], "yellow")))
        if record["stopped_early"]:
            errors.append(Text.assemble((f"{view.name}: ", "bold"), (record["stopped_early"], "green")))
        if spec_batch := (view.spec.dataset.batch_size if view.spec else None):
            if record["batch_size"] and record["batch_size"] != spec_batch:
                halved = (
                    f"batch size {record['batch_size']} (the spec says {spec_batch}): halved after running out of "
                    "memory (training.on_oom: halve_batch)"
                )
                errors.append(Text.assemble((f"{view.name}: ", "bold"), (halved, "yellow")))
        worker = "-"
        if view.holder is not None:
            worker = f"{view.holder.describe()} {format_age(record['heartbeat_age_s'])}"
        if record["device"]:  # what the current or last session trained on
            worker = f"{worker} · {short_device(record['device'])}" if view.holder else short_device(record["device"])
        if record["backend"]:  # and how: the Keras backend, and the devices in step
            engine = short_engine(record["backend"], record["devices"])
            worker = engine if worker == "-" else f"{worker} · {engine}"
        rows.append(
            (
                Text(view.name, style="bold"),
                Text(shown, style=STATE_STYLES.get(shown, "")),
                _epochs_cell(record["epoch"], record["epochs"] or 0),
                Text(str(record["step"])),
                notes,
                Text(format_age(record["checkpoint_age_s"])),
                Text(format_size(record["size_bytes"])),
                Text(str(record["restarts"])),
                Text(worker),
                Text(format_age(record["eta_s"])),
            )
        )
    if title is not None and views:
        title = f"{title} · {format_size(total)} in {counted(len(views), 'job')}"
    table = Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    needed = {header: _column_width(header, [row[index] for row in rows]) for index, header in enumerate(headers)}
    shown = _columns_that_fit(needed, width)
    for index, header in enumerate(headers):
        if header not in shown:
            continue
        right = header in ("step", "saved", "size", "restarts", "eta")
        if header == "metrics":
            table.add_column(header, min_width=min(needed[header], 12))  # wraps between metrics on a narrow screen
        else:
            table.add_column(header, no_wrap=True, min_width=needed[header], justify="right" if right else "left")
    for row in rows:
        table.add_row(*(cell for header, cell in zip(headers, row, strict=True) if header in shown))
    if not views:
        table.caption = "no jobs yet: add one with `runner submit SPEC`"
    return Group(table, *errors)


def _column_width(header: str, cells: list[Text]) -> int:
    """The width a column needs: its widest cell, or for the metrics (which wrap between metrics) its widest one."""
    if header == "metrics":
        return max([len(header), *(len(word) for cell in cells for word in cell.plain.split())])
    return max([len(header), *(cell.cell_len for cell in cells)])


def _columns_that_fit(needed: dict[str, int], width: int | None) -> set[str]:
    shown = set(needed)
    for header in DROPPED_FIRST:
        if width is None or sum(needed[name] for name in shown) + 2 * (len(shown) - 1) <= width:  # 2 between columns
            break
        shown.discard(header)
    return shown


def render_status(
    queue: Queue,
    *,
    clock: Callable[[], float] = time.time,
    width: int | None = None,
    sizes: FolderSizes | None = None,
) -> Group:
    """The queue's status table, read now (fitted to ``width`` columns when given)."""
    return status_table(queue.views(), clock(), title=f"queue {queue.root}", width=width, sizes=sizes)


WATCH_SIZE_MAX_AGE_S = 30.0
"""``--watch`` measures the job folders' sizes this often, not at every refresh."""


def watch_status(
    queue: Queue,
    console: Console,
    *,
    interval: float,
    sleep: Callable[[float], None] = time.sleep,
    rounds: int | None = None,
) -> None:
    """Refresh the status table in place every ``interval`` seconds (until Ctrl-C, or ``rounds`` refreshes).

    A queue folder that fails (Drive dropped for a while) is shown, with what this machine keeps, until it answers.
    """
    sizes = FolderSizes(max_age_s=WATCH_SIZE_MAX_AGE_S)
    with Live(_render_or_failure(queue, console.width, sizes), console=console, auto_refresh=False) as live:
        done = 0
        while rounds is None or done < rounds:
            sleep(interval)
            live.update(_render_or_failure(queue, console.width, sizes), refresh=True)
            done += 1


def _render_or_failure(queue: Queue, width: int | None = None, sizes: FolderSizes | None = None) -> Group:
    try:
        return render_status(queue, width=width, sizes=sizes)
    except StorageError as error:
        return queue_failing(queue, error, time.time())
