"""What the engine asks of Keras' JAX backend (``KERAS_BACKEND=jax``): where it trains, determinism, what its
out-of-memory errors look like, and how batches are made (NumPy and Pillow: no TensorFlow needed).

Several JAX devices (a TPU's cores, several GPUs, or host devices from
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` or ``RUNNER_LOGICAL_CPUS=N``) train in step with Keras'
``keras.distribution.DataParallel``: the variables are replicated, each batch is split along its first axis,
and XLA sums the gradients across the devices inside the compiled step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import jax
import keras
from jax.sharding import NamedSharding, PartitionSpec

from runner.errors import TrainerError
from runner.spec import JobSpec
from runner.train.data.arrays import DECODE_ERRORS, image_reader, prepare_dataset
from runner.train.engine.jax_loop import JaxEvaluateLoop
from runner.train.engine.jax_loop import JaxStepLoop as StepLoop

__all__ = [
    "BACKEND",
    "DECODE_ERRORS",
    "RUNTIME_ERRORS",
    "JaxPlacement",
    "StepLoop",
    "check_exports",
    "configure_determinism",
    "determinism_warning",
    "evaluate_loop",
    "image_reader",
    "is_out_of_memory",
    "jit_by_default",
    "mixed_policy",
    "no_gpu_advice",
    "place",
    "prepare_dataset",
    "sees_an_accelerator",
    "xla_problem",
]

BACKEND = "jax"


RUNTIME_ERRORS: tuple[type[BaseException], ...] = (jax.errors.JaxRuntimeError,)
"""What a failing step raises (out of memory among them)."""

_OUT_OF_MEMORY_SIGNS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")

_warned: set[str] = set()


def _accelerators() -> list[Any]:
    return [device for device in jax.devices() if device.platform in ("gpu", "tpu")]


def sees_an_accelerator() -> bool:
    """Whether JAX runs on a GPU or a TPU."""
    return bool(_accelerators())


def mixed_policy() -> str:
    """Keras' mixed-precision policy for this accelerator: bfloat16 on a TPU (its native type, no loss scaling),
    float16 on a GPU."""
    return "mixed_bfloat16" if jax.default_backend() == "tpu" else "mixed_float16"


def jit_by_default(*, deterministic: bool) -> bool:
    """``jit_compile: auto``: on JAX every step is XLA-compiled (it is how JAX runs at speed, and deterministic
    on the CPU)."""
    return True


def xla_problem() -> str | None:
    """Why XLA does not work here, or ``None``: on JAX it is always there."""
    return None


def no_gpu_advice() -> str:
    """What follows "nvidia-smi reports <GPU>, but " when JAX uses none (a CPU-only jaxlib): why, and the fix."""
    return (
        f"JAX {jax.__version__} runs on {jax.default_backend()}, so training runs on the CPU: install a JAX with "
        "CUDA support (pip install 'jax[cuda12]')"
    )


GPU_DETERMINISM_FLAG = "--xla_gpu_deterministic_ops=true"
"""What XLA on a GPU needs for bit-identical steps. XLA reads its flags once, when JAX first starts a device, so a
worker cannot turn it on for one job: it is the user's to set before Python starts."""


def configure_determinism(spec: JobSpec) -> str | None:
    """Seed every generator from the spec; a warning to show when ``deterministic`` cannot hold here, or ``None``.
    XLA on the CPU (and a TPU) is deterministic; on a GPU only with :data:`GPU_DETERMINISM_FLAG`."""
    keras.utils.set_random_seed(spec.training.seed)
    return determinism_warning(
        deterministic=spec.training.deterministic,
        platform=jax.default_backend(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )


def determinism_warning(*, deterministic: bool, platform: str, xla_flags: str) -> str | None:
    """Why ``deterministic: true`` does not hold on ``platform`` with these XLA flags, and the fix; or ``None``."""
    if not deterministic or platform != "gpu" or _flag_on(xla_flags, GPU_DETERMINISM_FLAG.split("=")[0]):
        return None
    return (
        f"training.deterministic: true, but XLA on the GPU is deterministic only with XLA_FLAGS={GPU_DETERMINISM_FLAG}, "
        "which is not set: a resumed run may differ from an uninterrupted one in the last bits; set it before Python "
        "starts (in a notebook, os.environ in the first cell, before keras is imported)"
    )


def _flag_on(xla_flags: str, name: str) -> bool:
    """Whether the boolean XLA flag ``name`` is on in ``xla_flags`` (``--name``, ``--name=true``, ``=1``...)."""
    values = [word.partition("=")[2] for word in xla_flags.split() if word.partition("=")[0] == name]
    return bool(values) and values[-1].lower() in ("", "true", "1")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is XLA running out of device memory."""
    return isinstance(error, RUNTIME_ERRORS) and any(sign in str(error) for sign in _OUT_OF_MEMORY_SIGNS)


@dataclass(frozen=True)
class JaxPlacement:
    """The devices one job trains on, and Keras' distribution over them (``None``: one device)."""

    devices: tuple[str, ...]
    distribution: Any = None

    @property
    def replicas(self) -> int:
        return len(self.devices) if self.distribution is not None else 1

    @property
    def strategy_name(self) -> str:
        return "data_parallel" if self.distribution is not None else "none"

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """The distribution is set for the process when the placement is made (Keras reads it as it creates
        variables): nothing more to enter."""
        return contextlib.nullcontext()

    def put(self, batch: Any) -> Any:
        """A batch on the devices: split along its first axis between them, on several. A batch that does not
        split evenly (JAX shards only in equal parts; an epoch's last batch, often) goes whole to every device."""
        if self.distribution is None:
            return jax.tree_util.tree_map(jax.device_put, batch)
        distribution, devices = self.distribution, len(self.devices)

        def placed(array: Any) -> Any:
            if array.shape[0] % devices:
                return jax.device_put(array, NamedSharding(distribution.device_mesh.backend_mesh, PartitionSpec()))
            return keras.distribution.distribute_tensor(array, distribution.get_data_layout(array.shape))

        return jax.tree_util.tree_map(placed, batch)

    def describe(self) -> str:
        count = len(self.devices)
        parallel = ", data parallel" if self.distribution is not None else ""
        return f"{count} device{'s' if count != 1 else ''} ({', '.join(self.devices)}){parallel}"


def place(setting: str, *, batch_size: int) -> tuple[JaxPlacement, str | None]:
    """The placement for ``training.distribute`` (``mirrored`` is data parallel on JAX), set as Keras' global
    distribution, and a warning to show (once per process), or ``None``."""
    devices = jax.devices()
    names = tuple(f"{device.platform.upper()}:{device.id}" for device in devices)
    if setting == "none" or (setting == "auto" and len(devices) < 2) or len(devices) < 2:
        keras.distribution.set_distribution(None)
        warning = None
        if setting == "mirrored" and len(devices) < 2:
            warning = (
                f"training.distribute: mirrored, but JAX sees one device ({names[0]}): training on it alone; set "
                "distribute to auto to silence this"
            )
            warning = None if warning in _warned else warning
            _warned.add(warning or "")
        return JaxPlacement(names[:1]), warning
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    uneven = None
    if batch_size % len(devices):
        uneven = (
            f"dataset.batch_size {batch_size} does not split evenly between {len(devices)} devices, so each batch runs "
            f"whole on every device (JAX shards only in equal parts): use a multiple of {len(devices)}"
        )
    return JaxPlacement(names, distribution), uneven


def check_exports(spec: JobSpec) -> None:
    """Refuse, before training, an export this machine cannot write: a SavedModel from JAX needs TensorFlow."""
    if "saved_model" in spec.export.formats and importlib.util.find_spec("tensorflow") is None:
        raise TrainerError(
            "export.formats has saved_model, which Keras writes from JAX only with TensorFlow installed, and this "
            "machine has none: remove saved_model from export.formats (model.keras loads on any backend), or "
            "pip install tensorflow-cpu"
        )


def evaluate_loop(model: keras.Model, placement: JaxPlacement) -> JaxEvaluateLoop:
    """Validation that places batches as training does (Keras' ``evaluate`` fails on an uneven one)."""
    return JaxEvaluateLoop(model, placement)
