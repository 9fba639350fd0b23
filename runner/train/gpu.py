"""TensorFlow's side of the session's device: a GPU that nvidia-smi sees but TensorFlow cannot use.

This is a common way to lose a day on a paid GPU: the driver is there, but the installed TensorFlow is a CPU
build (``tensorflow-cpu``) or its CUDA libraries do not match, and training silently runs on the CPU.
"""

from __future__ import annotations

import tensorflow as tf
from rich.markup import escape

from runner.training import RunContext


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
