"""runner: resumable Keras training jobs for GPU sessions that die without warning.

In a notebook: ``runner.submit("job.yaml")``, then ``runner.work()`` (run it again after every disconnect),
``runner.status()``, ``runner.plot("name")``, and once a job is done ``runner.predict("name", "images/")``.
With your own Keras code: ``runner.fit(model, data, epochs=10, job="name")`` in place of ``model.fit``, or
``model.fit(..., callbacks=[runner.keras.Checkpointing(job="name")])``.

``import runner`` stays light (no TensorFlow): specs, the queue, status and the worker loop load in a blink;
only ``runner.train`` imports TensorFlow.
"""

from runner.api import Picture, StatusReport, digits_spec, fit, logs, plot, predict, status, submit, work
from runner.checkpoints import CheckpointInfo, CheckpointStore
from runner.errors import (
    CheckpointCorrupt,
    DamagedFile,
    DriveUnavailable,
    Fenced,
    InvalidTransition,
    JobExists,
    JobNotFound,
    LeaseHeld,
    RunnerError,
    SpecError,
    StorageError,
    TrainerError,
    UsageError,
)
from runner.job import Job, JobState, JobStatus
from runner.lease import JobLease
from runner.queue import Claim, JobView, Queue
from runner.spec import JobSpec, load_spec, parse_spec
from runner.training import Outcome, RunContext, Trainer
from runner.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "CheckpointCorrupt",
    "CheckpointInfo",
    "CheckpointStore",
    "Claim",
    "DamagedFile",
    "DriveUnavailable",
    "Fenced",
    "InvalidTransition",
    "Job",
    "JobExists",
    "JobLease",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "JobStatus",
    "JobView",
    "LeaseHeld",
    "Outcome",
    "Picture",
    "Queue",
    "RunContext",
    "RunnerError",
    "SpecError",
    "StatusReport",
    "StorageError",
    "Trainer",
    "TrainerError",
    "UsageError",
    "Worker",
    "__version__",
    "digits_spec",
    "fit",
    "load_spec",
    "logs",
    "parse_spec",
    "plot",
    "predict",
    "status",
    "submit",
    "work",
]


def __getattr__(name: str) -> object:
    """``runner.keras`` and ``runner.data`` load on first use: they import TensorFlow, ``import runner`` does not."""
    if name in ("keras", "data"):
        import importlib  # noqa: PLC0415

        return importlib.import_module(f"runner.{name}")
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
