"""The Python API for notebooks: ``runner.submit``, ``work``, ``status``, ``plot`` and ``logs``; ``runner.fit`` for
the user's own Keras code.

The same operations as the command line, with the same defaults (the queue is ``$RUNNER_QUEUE``, Drive on
Colab, else ``./runner-queue``), but returning objects instead of exit codes and raising :class:`RunnerError`
instead of printing: a notebook shows the error's one line. On Colab, Drive is mounted on first use (a notebook
cell can ask for consent; a ``!runner`` shell cell cannot).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from runner import colab, storage
from runner.console import FolderSizes, status_records, status_table
from runner.errors import JobNotFound, QueueNotFound, StorageError
from runner.lease import lease_duration_from
from runner.paths import queue_choice
from runner.queue import Queue
from runner.session import SessionOptions, run_session
from runner.spec import JobSpec, load_spec, parse_spec
from runner.worker import WorkResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

QueueLike = str | Path | Queue | None


def open_queue(queue: QueueLike = None, *, must_exist: bool = False) -> Queue:
    """The queue at ``queue`` (a folder), or the default one; mounts Drive on Colab when the queue is there.

    ``must_exist``: :class:`QueueNotFound` (naming the folder and how it was chosen) where there is no folder,
    for every use but submitting, which creates it: "no jobs yet" would hide a mistyped path."""
    if isinstance(queue, Queue):
        return queue
    storage.check_retry_budget_environment()  # a bad value is one line, not silently the default
    root, chosen = queue_choice(queue)
    colab.ensure_drive(root, can_prompt=colab.in_notebook_kernel())
    if must_exist and not _may_exist(root):
        raise QueueNotFound(str(root.absolute()), chosen)
    return Queue(root, lease_duration=lease_duration_from(queue_root=root))


def _may_exist(root: Path) -> bool:
    """``False`` only where the file system says there is nothing at ``root``. Asked once, not retried: a mount
    that does not answer (Drive dropped) is left to the command's own reads, under the command's own budget (10 s
    for status), which say so; a path through a file is the storage layer's one line."""
    try:
        os.stat(root)
    except FileNotFoundError:
        return False
    except OSError as error:
        if storage.is_transient(error):
            return True
        raise storage.storage_error(error) from None
    return True


def submit(spec: str | Path | Mapping[str, Any] | JobSpec, *, queue: QueueLike = None) -> str:
    """Validate a job spec (a YAML/JSON file, a dict, or a :class:`JobSpec`) and add it to the queue.

    Submitting the same spec again is not an error (re-running a notebook cell): the job is left as it is.
    Returns the job's name.
    """
    if isinstance(spec, JobSpec):
        parsed = spec
    elif isinstance(spec, Mapping):
        parsed = parse_spec(dict(spec), source="spec")
    else:
        parsed = load_spec(Path(spec))
    open_queue(queue).submit(parsed)
    return parsed.name


def work(
    *,
    queue: QueueLike = None,
    job: str | None = None,
    max_hours: float | None = None,
    flush: bool = False,
    release_runtime: bool = False,
    refresh_data: bool = False,
) -> WorkResult:
    """Run every runnable job (or only ``job``), resuming each from its newest checkpoint: the one-line resume.

    Interrupting the kernel checkpoints and stops (a second interrupt stops at once); run it again to continue.
    ``max_hours``, ``flush``, ``release_runtime`` and ``refresh_data`` are ``runner work``'s options of the same
    names.
    """
    options = SessionOptions(
        job=job, max_hours=max_hours, flush=flush, release_runtime=release_runtime, refresh_data=refresh_data
    )
    return run_session(open_queue(queue, must_exist=True), options, Console(stderr=True))


def status(*, queue: QueueLike = None) -> StatusReport:
    """The queue's jobs now: shows as the status table in a notebook, and is a list of JSON-able records in code."""
    resolved = open_queue(queue, must_exist=True)
    now = time.time()
    views, sizes = resolved.views(), FolderSizes(max_age_s=60.0)  # one walk of each folder for both
    table = status_table(views, now, title=f"queue {resolved.root}", sizes=sizes)
    return StatusReport(resolved.root, status_records(views, now, sizes), table)


def plot(name: str | None = None, *, queue: QueueLike = None) -> Picture:
    """Learning curves of one job, or of every job compared; shown inline by notebooks, ``.save(path)`` to keep."""
    from runner.curves import figure_for_job, figure_for_queue  # noqa: PLC0415 (matplotlib loads only when asked)

    resolved = open_queue(queue, must_exist=True)
    return Picture(figure_for_queue(resolved) if name is None else figure_for_job(resolved, name))


def predict(
    name: str, images: str | Path | Sequence[str | Path], *, queue: QueueLike = None, last: bool = False
) -> list[dict[str, Any]]:
    """Classify images (files, or folders of them) with a finished job's exported model, decoded and resized as
    the job's own were: one ``{"image", "class", "probabilities", "model"}`` per image.

    The model is the best epoch's (``final/best.keras``) when the job exported one, unless ``last`` is true;
    ``model`` says which (``best`` or ``last``)."""
    from runner.train.outputs.predict import predict_images  # noqa: PLC0415 (TensorFlow loads only when asked)

    given = [images] if isinstance(images, (str, Path)) else list(images)
    job = open_queue(queue, must_exist=True).job(name)
    return [prediction.as_dict() for prediction in predict_images(job, given, last=last)]


def fit(model: Any, x: Any = None, y: Any = None, *, job: str, queue: str | Path | None = None, **kwargs: Any) -> Any:
    """``model.fit(x, y, **kwargs)``, resumable: the job ``job`` keeps its checkpoints in the queue, and calling
    this again in a new session continues from the newest one; on a done job the model gets its final weights.

    Takes what ``model.fit`` takes (``epochs``, ``validation_data``, ``callbacks``, ...), plus ``every_epochs``,
    ``every_minutes`` and ``keep`` for the checkpoints, and returns a Keras ``History`` of every epoch of the job.
    ``x`` may be ``runner.data.image_folder(...)``: then a resume is exact part way through an epoch too. See
    docs/own_code.md. Imports TensorFlow."""
    from runner.train.own_code.fit import fit as fit_resumable  # noqa: PLC0415 (TensorFlow loads only here)

    return fit_resumable(model, x, y, job=job, queue=None if queue is None else str(queue), **kwargs)


def digits_spec() -> JobSpec:
    """The bundled digits job (real handwritten digits, a small CNN, 10 epochs): a quick first job anywhere."""
    from runner.demo import demo_spec  # noqa: PLC0415

    return demo_spec()


class Picture:
    """A matplotlib figure that a notebook shows as a PNG (no pyplot state, no backend set-up needed)."""

    def __init__(self, figure: Figure) -> None:
        self.figure = figure

    def png(self) -> bytes:
        """The figure as PNG bytes."""
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png")
        return buffer.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write the figure to ``path`` (the format follows the suffix: .png, .pdf, .svg)."""
        from runner.curves import save_figure  # noqa: PLC0415

        return save_figure(self.figure, Path(path))

    def _repr_png_(self) -> bytes:
        return self.png()


def logs(name: str, *, queue: QueueLike = None) -> str:
    """The job's log (every session that ran it), as text."""
    path = open_queue(queue, must_exist=True).job(name).paths.log
    try:
        return storage.read_bytes(path).decode("utf-8", errors="replace")
    except StorageError as error:
        if error.errno_ == 2:
            return ""
        raise


class StatusReport:
    """The status of a queue: a sequence of records (the ``runner status --json`` contract) that renders as the
    status table in Jupyter and Colab and as text in a terminal."""

    def __init__(self, root: Path, records: list[dict[str, Any]], table: Any) -> None:
        self.root, self.records, self._table = root, records, table

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __getitem__(self, key: int | str) -> dict[str, Any]:
        """A job's record by position or by name."""
        if isinstance(key, int):
            return self.records[key]
        for record in self.records:
            if record["name"] == key:
                return record
        raise JobNotFound(key, str(self.root))

    def to_json(self) -> str:
        """The records as ``runner status --json`` prints them."""
        return json.dumps(self.records, indent=2)

    def __rich__(self) -> Any:
        return self._table

    def _rendered(self, *, html: bool) -> str:
        console = Console(file=io.StringIO(), record=True, width=140, force_terminal=False, force_jupyter=False)
        console.print(self._table)
        return console.export_html(inline_styles=True) if html else console.export_text()

    def __str__(self) -> str:
        return self._rendered(html=False)

    def __repr__(self) -> str:
        return self._rendered(html=False)

    def _repr_html_(self) -> str:
        return self._rendered(html=True)
