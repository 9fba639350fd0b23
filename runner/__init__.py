"""runner: resumable Keras training jobs for GPU sessions that die without warning.

In a notebook: ``runner.submit("job.yaml")``, then ``runner.work()`` (run it again after every disconnect),
``runner.status()``, ``runner.plot("name")``, and once a job is done ``runner.predict("name", "images/")``.

``import runner`` stays light (no TensorFlow): specs, the queue, status and the worker loop load in a blink;
only ``runner.train`` imports TensorFlow.
"""

from runner.api import Picture, StatusReport, digits_spec, logs, plot, predict, status, submit, work
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
    "load_spec",
    "logs",
    "parse_spec",
    "plot",
    "predict",
    "status",
    "submit",
    "work",
]
