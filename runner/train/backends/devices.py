"""Which devices a job trains on: one, or several GPUs (or logical CPUs) in step with
``tf.distribute.MirroredStrategy``.

Under the strategy each replica holds a copy of the variables; each global batch (``dataset.batch_size``) is split
between the replicas; their gradients are summed (Keras scales each replica's loss by 1 / replicas) and every copy
takes the same step. A snapshot reads the variables once (the copies are equal), and a restore assigns all copies.

``RUNNER_LOGICAL_CPUS=N`` splits the CPU into N logical devices before TensorFlow starts its runtime: how the tests
(and a user without GPUs) get several devices to mirror over.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from runner.settings import logical_cpus_from_environment

_warned: set[str] = set()


def split_cpu_from_environment() -> int:
    """Make ``$RUNNER_LOGICAL_CPUS`` logical CPU devices; must run before TensorFlow's runtime starts. Returns how
    many CPU devices there are."""
    count = logical_cpus_from_environment()
    if count > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError:  # the runtime started already (the user's own code ran TensorFlow first)
            return len(tf.config.list_logical_devices("CPU"))
    return count


@dataclass(frozen=True)
class Placement:
    """The devices one job trains on, and the strategy that keeps them in step (``None``: one device)."""

    devices: tuple[str, ...]
    strategy: tf.distribute.Strategy | None = None

    @property
    def replicas(self) -> int:
        """How many copies of the model train in step."""
        return len(self.devices) if self.strategy is not None else 1

    @property
    def strategy_name(self) -> str:
        """``mirrored`` or ``none``, for the job's events."""
        return "mirrored" if self.strategy is not None else "none"

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """Where the model, its optimizer and its metrics must be built: their variables are mirrored."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def distribute(self, dataset: tf.data.Dataset) -> Any:
        """``dataset`` as the replicas read it: each global batch split between them."""
        if self.strategy is None:
            return dataset
        return self.strategy.experimental_distribute_dataset(dataset)

    def describe(self) -> str:
        """``1 device (CPU:0)`` or ``2 devices (GPU:0, GPU:1), mirrored``."""
        names = ", ".join(name.split("device:")[-1] for name in self.devices)
        count = len(self.devices)
        mirrored = ", mirrored" if self.strategy is not None else ""
        return f"{count} device{'s' if count != 1 else ''} ({names}){mirrored}"


def _visible_devices() -> list[str]:
    """The devices worth mirroring over: every GPU, or without GPUs every logical CPU."""
    gpus = tf.config.list_logical_devices("GPU")
    return [device.name for device in gpus or tf.config.list_logical_devices("CPU")]


def place(setting: str, *, batch_size: int) -> tuple[Placement, str | None]:
    """The placement for ``training.distribute`` and a warning to show (once per process), or ``None``. Any
    ``batch_size`` splits (unevenly where it must: a device may get one image fewer, or none)."""
    devices = _visible_devices()
    if setting == "none" or (setting == "auto" and len(devices) < 2):
        return Placement(tuple(devices[:1])), None
    if len(devices) < 2:
        warning = (
            f"training.distribute: mirrored, but TensorFlow sees one device ({devices[0].split('device:')[-1]}): "
            "training on it alone; set distribute to auto to silence this"
        )
        first = warning not in _warned
        _warned.add(warning)
        return Placement(tuple(devices[:1])), warning if first else None
    return Placement(tuple(devices), tf.distribute.MirroredStrategy(devices)), None


def _per_device(variable: Any) -> tf.distribute.DistributedValues | None:
    """The TensorFlow variable behind a Keras one when each device keeps its own part (a metric's total under a
    strategy: summed when read); ``None`` for any other."""
    inner = getattr(variable, "_value", variable)
    if isinstance(inner, tf.distribute.DistributedValues) and getattr(inner, "synchronization", None) == (
        tf.VariableSynchronization.ON_READ
    ):
        return inner
    return None


def local_values(variable: Any) -> list[np.ndarray]:
    """Each device's own part of ``variable``, in the devices' order; empty unless each device keeps its own."""
    inner = _per_device(variable)
    return [] if inner is None else [np.asarray(part.numpy()) for part in inner.values]


def assign_local_values(variable: Any, values: list[np.ndarray]) -> bool:
    """Give each device its own part back; ``False`` (nothing assigned) when the devices are not as many.

    Assigning the sum instead (what a plain assign does, one share per device) gives the same total, but the
    next additions round differently: a resume would not go on bit for bit."""
    inner = _per_device(variable)
    if inner is None or len(inner.values) != len(values):
        return False
    for part, value in zip(inner.values, values, strict=True):
        part.assign(value)
    return True
