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
