"""The spec's speed options, resolved against the stack the job landed on: mixed precision and XLA.

Both are known to fit only when a job is claimed (the machine that submits it may not be the one that trains
it), so a misfit fails the claim with one line that names the field and the fix.
"""

from __future__ import annotations

import os

import keras

from runner.errors import TrainerError
from runner.spec import JobSpec
from runner.train import backends

MIXED_PRECISION_ON_CPU_ENV = "RUNNER_MIXED_PRECISION_ON_CPU"
"""Set to 1 to allow ``mixed_precision: true`` without a GPU (for tests: float16 on a CPU is slow, not faster)."""


def configure_precision(spec: JobSpec) -> str:
    """Set Keras' global dtype policy for the job's model (set for every job: a worker runs one after another)."""
    backend = backends.current()
    policy = backend.mixed_policy() if spec.training.mixed_precision else "float32"
    allowed_on_cpu = os.environ.get(MIXED_PRECISION_ON_CPU_ENV) == "1"
    if policy != "float32" and not backend.sees_an_accelerator() and not allowed_on_cpu:
        raise TrainerError(
            f"training.mixed_precision: true needs a GPU, and {backend.BACKEND} sees none here (float16 on a CPU is "
            "slower, not faster): set it to false, or run the job on a GPU runtime"
        )
    keras.config.set_dtype_policy(policy)
    return policy


def resolve_jit_compile(setting: bool | str, model: keras.Model, *, deterministic: bool) -> bool:
    """Whether to XLA-compile the training step, for ``training.jit_compile``: ``auto`` is on a GPU, when every
    layer supports XLA and op determinism is off (the spec refuses ``true`` with ``deterministic: true``)."""
    unsupported = _layers_without_jit(model)
    backend = backends.current()
    if setting == "auto":
        return not unsupported and backend.jit_by_default(deterministic=deterministic)
    if not setting:
        return False
    if unsupported:
        names = ", ".join(unsupported[:3]) + (f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else "")
        raise TrainerError(
            f"training.jit_compile: true, but XLA cannot compile the model's layer(s) {names}: set it to auto (XLA "
            "only where every layer supports it) or false"
        )
    if (problem := backend.xla_problem()) is not None:
        raise TrainerError(
            f"training.jit_compile: true, but XLA does not work in this TensorFlow ({problem}): set it to auto or false"
        )
    return True


def _layers_without_jit(model: keras.Model) -> list[str]:
    """The layers Keras marks as not XLA-compilable (its random augmentation layers, a ``py_function``...)."""
    layers = model._flatten_layers(include_self=False)
    return [f"{layer.name} ({type(layer).__name__})" for layer in layers if not getattr(layer, "supports_jit", True)]
