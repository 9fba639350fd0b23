"""The engine's backend-specific parts, one module per Keras backend: TensorFlow's (``tensorflow.py``) and JAX's
(``jax.py``). Each answers the same questions (does it see a GPU, what is running out of memory, which devices
to train on, how batches are made and stepped through), so the trainer asks :func:`current` and branches nowhere.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from runner.errors import TrainerError
from runner.settings import ENGINE_BACKENDS
from runner.training import RunContext

SUPPORTED = ENGINE_BACKENDS


def backend_name() -> str:
    """The Keras backend this process runs (``$KERAS_BACKEND``, else Keras' config file, else tensorflow)."""
    import keras

    return str(keras.backend.backend())


def check_supported(name: str) -> None:
    """Refuse, in one line, a Keras backend runner's engine does not train on."""
    if name not in SUPPORTED:
        raise TrainerError(
            f"Keras runs on the {name} backend (KERAS_BACKEND={os.environ.get('KERAS_BACKEND', name)}), and runner's "
            "engine trains on tensorflow or jax: unset KERAS_BACKEND, or set it to tensorflow or jax"
        )


def warn_if_gpu_unused(context: RunContext, backend: ModuleType) -> bool:
    """Warn (console, log, a ``gpu-unused`` event) when the session has a GPU that ``backend`` does not use."""
    device = context.claim.claimed.device
    if not device or device == "CPU" or backend.sees_an_accelerator():
        return False
    message = f"nvidia-smi reports {device}, but {backend.no_gpu_advice()}"
    context.warn(message)
    context.job.events.append("gpu-unused", generation=context.generation, device=device)
    return True


def current() -> ModuleType:
    """The module of the backend Keras runs on here."""
    name = backend_name()
    check_supported(name)
    return importlib.import_module(f"runner.train.backends.{name}")
