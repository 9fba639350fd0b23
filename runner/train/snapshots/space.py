"""Space for checkpoints: enough in the job folder for ``keep`` of them (warned before training), and one line
naming the local disk when a snapshot does not fit there."""

from __future__ import annotations

import errno
from pathlib import Path

import keras
import numpy as np

from runner import defaults, storage
from runner.errors import StorageError
from runner.training import RunContext


def checkpoint_bytes(model: keras.Model) -> int:
    """Bytes of one checkpoint of ``model``: every model and optimizer variable (the manifest and state are tiny)."""
    variables = [*model.variables, *model.optimizer.variables]
    return sum(int(np.prod(variable.shape)) * np.dtype(variable.dtype).itemsize for variable in variables)


def warn_if_short_of_space(context: RunContext, model: keras.Model) -> bool:
    """Warn (console, log, events) when the job folder cannot hold ``keep`` checkpoints plus one being written."""
    each = checkpoint_bytes(model)
    needed = each * (context.spec.checkpoint.keep + 1)
    free = storage.free_bytes(context.job.paths.folder)
    if free is None or free >= needed:
        return False
    message = (
        f"the job folder has {free / 1e6:.1f} MB free, but {context.spec.checkpoint.keep} checkpoints of this model "
        f"plus one being written need about {needed / 1e6:.1f} MB ({each / 1e6:.1f} MB each): free some space "
        "(on Drive, empty the trash: deleted files count for 30 days) or lower checkpoint.keep"
    )
    context.warn(message)
    context.job.events.append("space-warning", free_bytes=free, needed_bytes=needed, checkpoint_bytes=each)
    return True


def local_disk_error(error: OSError, folder: Path) -> StorageError:
    """A failed local snapshot as one line that names the local disk and what to do."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(
            f"{folder}: no space left on the local disk for a checkpoint snapshot: free some space there, "
            f"or point ${defaults.CACHE_ENV} at a bigger disk",
            path=str(folder),
            errno_=error.errno,
        )
    return storage.storage_error(error)
