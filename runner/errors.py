"""Every error runner raises on purpose: one root, each also a built-in category, each carrying its data.

The CLI turns a :class:`RunnerError` into one line on stderr and ``exit_code``; nothing here is a traceback
a user should ever see.
"""

from __future__ import annotations

EXIT_FAILED = 1
"""A job that this command ran failed, or an operation could not be carried out."""

EXIT_USAGE = 2
"""Bad command-line usage or an invalid job spec: nothing was changed."""


class RunnerError(Exception):
    """Base class for runner errors."""

    exit_code: int = EXIT_FAILED


class SpecError(RunnerError, ValueError):
    """A job spec failed validation; ``problems`` holds one line per problem, each naming the field."""

    exit_code = EXIT_USAGE

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__("\n".join(f"{source}: {problem}" for problem in problems))
        self.source, self.problems = source, problems


class UsageError(RunnerError, ValueError):
    """A command was called with arguments that cannot work."""

    exit_code = EXIT_USAGE


class JobNotFound(RunnerError, LookupError):
    """No job of that name in the queue."""

    exit_code = EXIT_USAGE

    def __init__(self, job: str, queue: str) -> None:
        super().__init__(f"no job named {job!r} in queue {queue} (see `runner status`)")
        self.job, self.queue = job, queue


class QueueNotFound(RunnerError, LookupError):
    """No queue folder where the command looked: a mistyped path, another current folder, Drive not the one."""

    def __init__(self, root: str, chosen: str) -> None:
        super().__init__(
            f"no queue folder at {root} ({chosen}): name the folder the jobs were submitted to (--queue DIR, queue= in "
            "Python, or $RUNNER_QUEUE); submitting a job creates a new one"
        )
        self.root, self.chosen = root, chosen


class JobExists(RunnerError, FileExistsError):
    """A job of that name is already in the queue."""

    exit_code = EXIT_USAGE

    def __init__(self, job: str, queue: str) -> None:
        super().__init__(
            f"job {job!r} already exists in queue {queue} with another spec: give the spec another name, or "
            f"replace the job's spec with `runner submit --replace` (a done job: `runner delete {job}` first)"
        )
        self.job, self.queue = job, queue


class InvalidTransition(RunnerError, ValueError):
    """A job cannot move from its state to the one asked for."""

    def __init__(self, job: str, current: str, wanted: str, hint: str = "") -> None:
        message = f"job {job!r} is {current} and cannot become {wanted}"
        super().__init__(f"{message}: {hint}" if hint else message)
        self.job, self.current, self.wanted = job, current, wanted


class LeaseHeld(RunnerError, TimeoutError):
    """Another live worker holds the job's lease."""

    def __init__(self, job: str, owner: str, *, hint: str = "") -> None:
        message = f"job {job!r} is being run by {owner}"
        super().__init__(f"{message}: {hint}" if hint else message)
        self.job, self.owner = job, owner


class Fenced(RunnerError):
    """This worker's claim on a job is no longer the current one; it must stop writing."""

    def __init__(self, job: str, generation: int, reason: str) -> None:
        super().__init__(f"job {job!r}: claim generation {generation} is no longer current ({reason}); stopped writing")
        self.job, self.generation, self.reason = job, generation, reason


class StorageError(RunnerError, OSError):
    """A file operation failed for good: a permanent error, or transient errors past the retry budget."""

    def __init__(self, message: str, *, path: str | None = None, errno_: int | None = None, transient: bool = False):
        super().__init__(message)
        self.path, self.errno_, self.transient = path, errno_, transient


class DamagedFile(RunnerError, ValueError):
    """A runner file exists but cannot be read back (truncated, garbage, wrong shape)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path} is damaged: {reason}")
        self.path, self.reason = path, reason


class CheckpointCorrupt(RunnerError, ValueError):
    """A committed checkpoint does not match its manifest."""

    def __init__(self, checkpoint: str, reason: str) -> None:
        super().__init__(f"checkpoint {checkpoint} is corrupt: {reason}")
        self.checkpoint, self.reason = checkpoint, reason


class TrainerError(RunnerError):
    """A trainer could not be loaded or refused a job before training started."""


class OutOfMemory(TrainerError, MemoryError):
    """Training ran out of (GPU) memory at ``batch_size``; the message says what to change in the spec."""

    def __init__(
        self,
        batch_size: int,
        *,
        gpu: bool = True,
        halved_from: int | None = None,
        image_size: tuple[int, int] | None = None,
        building: bool = False,
    ) -> None:
        memory = f"{'GPU ' if gpu else ''}memory"
        smaller = _smaller_image_size(image_size)
        if building:  # the weights alone do not fit: the batch size is not the cause
            where = f"out of {memory} building the model for images of {_size_text(image_size)}"
            fix = f"lower dataset.image_size{smaller} or the model's size (model.params)"
            super().__init__(f"{where}: {fix}")
            self.batch_size, self.gpu, self.halved_from = batch_size, gpu, halved_from
            return
        where = f"out of {memory} at batch size {batch_size}"
        if image_size is not None:
            where += f" and image size {_size_text(image_size)}"
        if halved_from is not None:
            where += f" (halved from {halved_from})"
        if batch_size > 1 and halved_from is None:
            fix = (
                f"lower dataset.batch_size (to {batch_size // 2}, say) or dataset.image_size{smaller}, or set "
                "training.on_oom: halve_batch"
            )
        else:
            fix = f"even one image per step is too much: lower dataset.image_size{smaller}, use a smaller model, or more memory"
        super().__init__(f"{where}: {fix}")
        self.batch_size, self.gpu, self.halved_from = batch_size, gpu, halved_from


def _size_text(image_size: tuple[int, int] | None) -> str:
    return "this size" if image_size is None else f"{image_size[0]}x{image_size[1]}"


def _smaller_image_size(image_size: tuple[int, int] | None) -> str:
    """`` (to [75, 75], say)``: half of each side, the memory an image takes a quarter."""
    if image_size is None or min(image_size) < 2:
        return ""
    return f" (to [{image_size[0] // 2}, {image_size[1] // 2}], say)"


class ModelError(RunnerError, ValueError):
    """The job's model cannot be built or compiled as its spec asks (bad params, factory, loss for the labels)."""


class DatasetError(RunnerError, ValueError):
    """A dataset cannot be fetched, unpacked or read; the message names the cause and the fix."""


class DriveUnavailable(RunnerError, ConnectionError):
    """The queue is on Google Drive, and Drive is not mounted and could not be."""


class NoExport(RunnerError, LookupError):
    """A job has no exported model to predict with (not done yet, or exported without what predictions need)."""

    def __init__(self, job: str, why: str) -> None:
        super().__init__(
            f"job {job!r} has no exported model to predict with ({why}): predictions use final/, which "
            "`runner work` writes when the job is done"
        )
        self.job = job


class NoHistory(RunnerError, LookupError):
    """Nothing to plot yet: the job (or every job of the queue) has no completed epoch in its history.csv."""

    def __init__(self, queue: str, job: str | None = None) -> None:
        if job is not None:
            message = f"job {job!r} has no completed epoch yet: run `runner work`, then plot it after its first epoch"
        else:
            message = (
                f"no job in queue {queue} has a completed epoch yet: submit a job and run `runner work`, then plot"
            )
        super().__init__(message)
        self.queue, self.job = queue, job
