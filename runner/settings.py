"""Settings read from the environment (``$RUNNER_LEASE_DURATION``, ``$RUNNER_RETRY_BUDGET``): a value that is not
one is refused with one line naming the variable, never silently replaced by the default."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from runner.errors import UsageError


def seconds_from_environment(
    variable: str, default: float, *, allow_zero: bool, environ: Mapping[str, str] = os.environ
) -> float:
    """``$variable`` as seconds, or ``default`` when it is not set; :class:`UsageError` for anything else."""
    raw = environ.get(variable)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        wanted = "zero or more seconds" if allow_zero else "a positive number of seconds"
        raise UsageError(f"{variable} must be {wanted}, got {raw!r}")
    return value


LOGICAL_CPUS_ENV = "RUNNER_LOGICAL_CPUS"
"""Set to N (2 to 64) for N logical CPU devices to train on in step (tests, and machines without GPUs)."""


def logical_cpus_from_environment(environ: Mapping[str, str] = os.environ) -> int:
    """``$RUNNER_LOGICAL_CPUS``, 1 when it is not set; :class:`UsageError` for anything but a count of devices."""
    raw = environ.get(LOGICAL_CPUS_ENV, "").strip()
    if not raw:
        return 1
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if not 1 <= count <= 64:
        raise UsageError(f"{LOGICAL_CPUS_ENV} must be a whole number of devices from 1 to 64, got {raw!r}")
    return count


KERAS_BACKEND_ENV = "KERAS_BACKEND"
"""Keras' own: the backend it runs on. runner's engine trains on tensorflow (the default) or jax (no TensorFlow
needed: Colab's TPU runtime); `runner work` refuses any other before it claims a job."""
ENGINE_BACKENDS = ("tensorflow", "jax")
"""The Keras backends runner's engine trains on."""


def check_keras_backend(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse ``$KERAS_BACKEND`` naming a backend the engine does not train on (before any job is claimed)."""
    raw = environ.get(KERAS_BACKEND_ENV)
    if raw and raw not in ENGINE_BACKENDS:  # as Keras reads it: empty is unset, and the case counts
        raise UsageError(
            f"{KERAS_BACKEND_ENV}={raw}: runner's engine trains on Keras' tensorflow or jax backend: unset "
            f"{KERAS_BACKEND_ENV}, or set it to tensorflow or jax"
        )
