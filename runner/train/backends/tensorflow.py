"""What the engine asks of Keras' TensorFlow backend: whether it sees a GPU, determinism, what its
out-of-memory errors look like, which devices to train on, and how batches are made (``tf.data``) and stepped
through. :mod:`runner.train.backends.jax` answers the same questions for JAX; the trainer asks whichever Keras
runs on (:func:`runner.train.backends.current`) and branches nowhere else.

A GPU that nvidia-smi sees but TensorFlow cannot use is a common way to lose a day on a paid GPU: the driver is
there, but the installed TensorFlow is a CPU build (``tensorflow-cpu``) or its CUDA libraries do not match, and
training silently runs on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from runner.spec import JobSpec
from runner.train.backends.devices import Placement, place
from runner.train.data.pipeline import image_loader, prepare_dataset
from runner.train.engine.loop import EvaluateLoop, StepLoop

__all__ = [
    "BACKEND",
    "DECODE_ERRORS",
    "RUNTIME_ERRORS",
    "StepLoop",
    "check_exports",
    "configure_determinism",
    "evaluate_loop",
    "image_reader",
    "is_out_of_memory",
    "jit_by_default",
    "mixed_policy",
    "no_gpu_advice",
    "place",
    "prepare_dataset",
    "sees_an_accelerator",
    "tensorflow_sees_a_gpu",
    "xla_problem",
]

BACKEND = "tensorflow"
"""The Keras backend this engine trains on (recorded in every snapshot and shown by status)."""

RUNTIME_ERRORS: tuple[type[BaseException], ...] = (tf.errors.OpError,)
"""What a failing step raises (out of memory among them)."""

_OUT_OF_MEMORY_SIGNS = (
    "OOM when allocating",  # the BFC allocator (graph and eager)
    "Out of memory while trying to allocate",  # XLA
    "Dst tensor is not initialized",  # a batch that cannot be copied to the GPU, reported as an internal error
)


def tensorflow_sees_a_gpu() -> bool:
    """Whether TensorFlow can place work on a GPU."""
    return bool(tf.config.list_physical_devices("GPU"))


def no_gpu_advice() -> str:
    """What follows "nvidia-smi reports <GPU>, but " when TensorFlow sees none: why, and the fix."""
    return (
        f"TensorFlow {tf.__version__} sees no GPU, so training runs on the CPU: install a TensorFlow with GPU "
        "support (pip install 'tensorflow[and-cuda]') whose CUDA libraries match the driver, and check that "
        "$CUDA_VISIBLE_DEVICES does not hide the GPU"
    )


def configure_determinism(spec: JobSpec) -> str | None:
    """Seed every generator from the spec; with ``deterministic``, also make TensorFlow's ops deterministic (which
    holds everywhere: no warning to give)."""
    keras.utils.set_random_seed(spec.training.seed)
    if spec.training.deterministic:
        tf.config.experimental.enable_op_determinism()
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is TensorFlow running out of memory, in the forms a training step and evaluate raise."""
    if isinstance(error, tf.errors.ResourceExhaustedError):
        return True
    return isinstance(error, tf.errors.OpError) and any(sign in (error.message or "") for sign in _OUT_OF_MEMORY_SIGNS)


def sees_an_accelerator() -> bool:
    """Whether TensorFlow trains on a GPU."""
    return tensorflow_sees_a_gpu()


def mixed_policy() -> str:
    """Keras' mixed-precision policy on a GPU."""
    return "mixed_float16"


def jit_by_default(*, deterministic: bool) -> bool:
    """``jit_compile: auto`` (given that every layer supports XLA): on a GPU, without op determinism (TensorFlow's
    has no XLA version of several ops)."""
    return not deterministic and tensorflow_sees_a_gpu()


def xla_problem() -> str | None:
    """Why a one-line function does not XLA-compile here, or ``None`` when it does."""
    try:
        value: Any = tf.function(lambda x: x * 2.0, jit_compile=True)(tf.constant(1.0))
        float(value)
    except (tf.errors.OpError, NotImplementedError, ValueError) as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


def evaluate_loop(model: keras.Model, placement: Placement) -> EvaluateLoop | None:
    """Validation on several devices (Keras' ``evaluate`` fails on batches that do not split evenly); ``None``:
    Keras' own ``evaluate`` on one device."""
    return EvaluateLoop(model, placement) if placement.strategy is not None else None


def check_exports(spec: JobSpec) -> None:
    """Every export format is written by TensorFlow's Keras."""


DECODE_ERRORS: tuple[type[BaseException], ...] = (tf.errors.InvalidArgumentError, ValueError)
"""What decoding an image that is not one raises (for `runner predict`)."""


def image_reader(image_size: tuple[int, int], channels: int) -> Callable[[Path], np.ndarray]:
    """A function from an image file to its uint8 pixels, decoded and resized as the training pipeline does."""
    load = image_loader(image_size, channels)
    return lambda path: load(tf.constant(str(path))).numpy()
