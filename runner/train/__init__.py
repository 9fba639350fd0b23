"""The Keras training engine: the only package of runner that imports Keras, TensorFlow or JAX.

It trains on the backend Keras runs on: TensorFlow (the default), or JAX (``KERAS_BACKEND=jax``: Colab's TPU
runtime, which no longer ships TensorFlow). What differs between them is in :mod:`runner.train.backends`.

``runner work`` loads ``runner.train:KerasTrainer``. The name is resolved lazily so that importing one module
of this package (``runner.train.data.pipeline`` in a test, say) does not load all of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from runner.settings import LOGICAL_CPUS_ENV

VERBOSE_ENV = "RUNNER_TF_VERBOSE"
"""Set to 1 (or pass ``--verbose`` to ``runner work`` or ``predict``) to see TensorFlow's start-up messages."""


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes)
    ignores TF_CPP_MIN_LOG_LEVEL in current builds and buries runner's own output. Python errors still show."""
    if os.environ.get(VERBOSE_ENV):
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_NO_TENSORFLOW = (
    "Keras runs on the tensorflow backend, and TensorFlow is not installed here: pip install tensorflow, or set "
    "KERAS_BACKEND=jax to train with JAX"
)


def _start_tensorflow() -> None:
    import tensorflow

    from runner.train.backends.devices import split_cpu_from_environment

    split_cpu_from_environment()  # before the runtime starts its devices, just below
    # The runtime prints more the first time it starts its devices and runs a uint8 op (CUDA probing on a
    # machine without a GPU, a oneDNN note), and the graph optimizer once when it meets a uint8 image made
    # grayscale in a dataset map (oneDNN's "supports DT_UINT8 only on platforms with AVX-512", as an E line):
    # do all three here, inside the quiet window.
    tensorflow.config.list_physical_devices()
    tensorflow.cast(tensorflow.zeros([1], tensorflow.uint8), tensorflow.float32)

    def _decoded_made_grayscale(encoded: Any) -> Any:
        image = tensorflow.io.decode_image(encoded, channels=3, expand_animations=False)
        return tensorflow.image.rgb_to_grayscale(tensorflow.cast(image, tensorflow.float32))

    one_pixel = tensorflow.io.encode_png(tensorflow.zeros([1, 1, 3], tensorflow.uint8))
    for _ in tensorflow.data.Dataset.from_tensors(one_pixel).map(_decoded_made_grayscale):
        pass


def _split_cpu_for_jax(count: str) -> None:
    """As many JAX CPU devices as $RUNNER_LOGICAL_CPUS asks for: XLA reads the flag when JAX starts its CPU
    backend, on first use (a bad value is refused by `runner work` before any job is claimed)."""
    flag = f"--xla_force_host_platform_device_count={count}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags and count.isdigit():
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


if not os.environ.get(VERBOSE_ENV):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if (_logical_cpus := os.environ.get(LOGICAL_CPUS_ENV, "").strip()) not in ("", "1"):
    # oneDNN's CPU kernels abort the process (MaxPoolingGrad's dtype check) on an empty batch, which a device
    # gets when an epoch's last batch holds fewer images than there are devices; TensorFlow's own kernels do not.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    _split_cpu_for_jax(_logical_cpus)
with _native_stderr_silenced():
    try:
        import keras
    except ModuleNotFoundError as error:  # Keras imports its backend's package at once
        if error.name != "tensorflow":
            raise
        raise ModuleNotFoundError(_NO_TENSORFLOW, name="tensorflow") from None

    if keras.backend.backend() == "tensorflow":
        _start_tensorflow()

__all__ = ["KerasTrainer"]


def __getattr__(name: str) -> Any:
    if name == "KerasTrainer":
        from runner.train.trainer import KerasTrainer

        return KerasTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
