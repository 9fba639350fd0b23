"""Keras' ReduceLROnPlateau and EarlyStopping, as state that every checkpoint holds.

Keras' callbacks keep their best value, the epochs waited and the cooldown in Python attributes, which a
disconnect loses: a resumed ``fit`` starts waiting again from zero, and stops (or lowers the rate) later than an
uninterrupted run would. Here the same decisions are made at each epoch's end, by the same rules as Keras 3's
callbacks (a test runs both on the same values), from a small dict stored in the checkpoint's ``state.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from runner.spec import EarlyStoppingSpec, JobSpec, PlateauSpec, monitor_mode, resolved_monitor


def improved(value: float, best: float | None, *, mode: str, min_delta: float) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (anything beats no best yet), compared in float32
    as Keras' callbacks compare them (``ops.less(value - delta, best)``)."""
    if best is None:
        return True
    if mode == "max":
        return bool(np.float32(value - min_delta) > np.float32(best))
    return bool(np.float32(value + min_delta) < np.float32(best))


def _fresh(state: dict[str, Any] | None, monitor: str, mode: str, empty: dict[str, Any]) -> dict[str, Any]:
    """The state to go on from: a copy of ``state``, or ``empty`` when there is none or it watched another metric
    or direction (`runner edit` changed the monitor: the old best means nothing for the new one)."""
    if state is None or state.get("monitor", monitor) != monitor or state.get("mode", mode) != mode:
        return {**empty, "monitor": monitor, "mode": mode}
    return {**state, "monitor": monitor, "mode": mode}


@dataclass(frozen=True)
class PlateauStep:
    """What a plateau decided at an epoch's end."""

    state: dict[str, Any]
    scale: float
    """The factor on the learning rate from now on."""
    lowered: bool


def plateau_epoch_end(
    spec: PlateauSpec, monitor: str, state: dict[str, Any] | None, value: float, *, rate: float, scale: float
) -> PlateauStep:
    """ReduceLROnPlateau's ``on_epoch_end``: ``rate`` is the learning rate now, ``scale`` its factor so far."""
    mode = monitor_mode(monitor, spec.mode)
    state = _fresh(state, monitor, mode, {"best": None, "wait": 0, "cooldown": 0})
    if state["cooldown"] > 0:
        state["cooldown"] -= 1
        state["wait"] = 0
    if improved(value, state["best"], mode=mode, min_delta=spec.min_delta):
        state["best"], state["wait"] = value, 0
        return PlateauStep(state, scale, lowered=False)
    if state["cooldown"] > 0:
        return PlateauStep(state, scale, lowered=False)
    state["wait"] += 1
    if state["wait"] < spec.patience or rate <= float(np.float32(spec.min_lr)):  # as Keras compares them
        return PlateauStep(state, scale, lowered=False)
    state["cooldown"], state["wait"] = spec.cooldown, 0
    return PlateauStep(state, scale * spec.factor, lowered=True)


@dataclass(frozen=True)
class StopStep:
    """What an early stop decided at an epoch's end."""

    state: dict[str, Any]
    best: bool
    """This epoch is the best so far (its weights are the ones to keep)."""
    stop: bool


def early_stopping_epoch_end(
    spec: EarlyStoppingSpec, monitor: str, state: dict[str, Any] | None, value: float, *, epoch: int
) -> StopStep:
    """EarlyStopping's ``on_epoch_end`` for the 0-based ``epoch``."""
    mode = monitor_mode(monitor, spec.mode)
    state = _fresh(state, monitor, mode, {"best": None, "best_epoch": None, "wait": 0})
    state["wait"] += 1
    if improved(value, state["best"], mode=mode, min_delta=spec.min_delta):
        state["best"], state["best_epoch"], state["wait"] = value, epoch, 0
        return StopStep(state, best=True, stop=False)
    return StopStep(state, best=False, stop=state["wait"] >= spec.patience and epoch > 0)


def best_monitor(spec: JobSpec, *, validated: bool) -> tuple[str, str]:
    """The metric and direction that decide the best epoch: the early stop's, else val_loss (loss)."""
    stopping = spec.training.early_stopping
    if stopping is not None:
        monitor = resolved_monitor(spec, stopping.monitor)
        return monitor, monitor_mode(monitor, stopping.mode)
    return ("val_loss" if validated else "loss"), "min"
