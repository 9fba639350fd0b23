"""What both backends' training loops share: how many steps a compiled call runs, and the build Keras does
before the first one."""

from __future__ import annotations

from typing import Any

import keras

AUTO_STEPS_PER_EXECUTION = 32
"""Steps per call for ``steps_per_execution: auto``, at most an epoch's: enough that the per-call dispatch of a
small model no longer shows; snapshots land between calls, so at most this many steps late."""


def resolve_steps_per_execution(setting: int | str, steps_per_epoch: int) -> int:
    """Steps per compiled call for the spec's ``training.steps_per_execution``."""
    wanted = AUTO_STEPS_PER_EXECUTION if setting == "auto" else int(setting)
    return max(1, min(wanted, steps_per_epoch))


def build_metrics(model: keras.Model, element_spec: Any) -> None:
    """Create the compiled metrics' variables now, as ``fit`` does before its first step (Keras otherwise makes
    them on the first step), so a snapshot can be loaded into them before any training."""
    model._symbolic_build(data_batch=element_spec)
