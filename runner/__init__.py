"""runner: resumable Keras training jobs for GPU sessions that die without warning.

``import runner`` stays light (no TensorFlow): specs, the queue, status and the worker loop load in a blink;
only ``runner.train`` imports TensorFlow.
"""

from runner.checkpoints import CheckpointInfo, CheckpointStore
from runner.errors import (
    CheckpointCorrupt,
    DamagedFile,
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
    "Queue",
    "RunContext",
    "RunnerError",
    "SpecError",
    "StorageError",
    "Trainer",
    "TrainerError",
    "UsageError",
    "Worker",
    "__version__",
    "load_spec",
    "parse_spec",
]
