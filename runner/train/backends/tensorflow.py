"""What the engine asks of TensorFlow itself: whether it sees a GPU, determinism, and what its out-of-memory
errors look like. Each backend-specific question has its one place here, so that another backend (Keras on
JAX) branches here and nowhere else.

A GPU that nvidia-smi sees but TensorFlow cannot use is a common way to lose a day on a paid GPU: the driver is
there, but the installed TensorFlow is a CPU build (``tensorflow-cpu``) or its CUDA libraries do not match, and
training silently runs on the CPU.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from rich.markup import escape

from runner.spec import JobSpec
from runner.training import RunContext

BACKEND = "tensorflow"
"""The Keras backend this engine trains on (recorded in every snapshot and shown by status)."""

_OUT_OF_MEMORY_SIGNS = (
    "OOM when allocating",  # the BFC allocator (graph and eager)
    "Out of memory while trying to allocate",  # XLA
    "Dst tensor is not initialized",  # a batch that cannot be copied to the GPU, reported as an internal error
)


def tensorflow_sees_a_gpu() -> bool:
    """Whether TensorFlow can place work on a GPU."""
    return bool(tf.config.list_physical_devices("GPU"))


def warn_if_gpu_unused(context: RunContext) -> bool:
    """Warn (console, log, a ``gpu-unused`` event) when the session has a GPU that TensorFlow does not see."""
    device = context.claim.claimed.device
    if not device or device == "CPU" or tensorflow_sees_a_gpu():
        return False
    message = (
        f"nvidia-smi reports {device}, but TensorFlow {tf.__version__} sees no GPU, so training runs on the CPU: "
        "install a TensorFlow with GPU support (pip install 'tensorflow[and-cuda]') whose CUDA libraries match the "
        "driver, and check that $CUDA_VISIBLE_DEVICES does not hide the GPU"
    )
    context.console.print(f"[yellow]warning:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    context.log.warning("%s", message)
    context.job.events.append("gpu-unused", generation=context.generation, device=device)
    return True


def configure_determinism(spec: JobSpec) -> None:
    """Seed every generator from the spec; with ``deterministic``, also make TensorFlow's ops deterministic."""
    keras.utils.set_random_seed(spec.training.seed)
    if spec.training.deterministic:
        tf.config.experimental.enable_op_determinism()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is TensorFlow running out of memory, in the forms a training step and evaluate raise."""
    if isinstance(error, tf.errors.ResourceExhaustedError):
        return True
    return isinstance(error, tf.errors.OpError) and any(sign in (error.message or "") for sign in _OUT_OF_MEMORY_SIGNS)
