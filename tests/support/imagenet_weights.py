"""Look-alikes of the ImageNet weights files Keras publishes, to serve from 127.0.0.1 as ``$RUNNER_WEIGHTS_URL``.

Each is a Keras 2 (legacy) ``.h5`` weights file of the base without its top, written as Keras' own files are and
named as Keras names them, with random (seeded) weights: the real ones cannot be downloaded here. Its
BatchNormalization statistics are those of its own activations on random images, so that, as with trained
weights, features neither vanish nor explode and a head on them learns; EfficientNet's Normalization layer is
given ImageNet's mean and variance, as the real file holds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from runner.networks import imagenet_weights

_BASES = {"mobilenet_v2": "MobileNetV2", "efficientnet_b0": "EfficientNetB0", "resnet50": "ResNet50"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STDDEV = (0.229, 0.224, 0.225)


def lookalike_base(builtin: str, *, alpha: float = 1.0, seed: int = 5):  # noqa: ANN201 (a keras.Model)
    """The base with the seeded random weights the look-alike file holds."""
    import keras  # noqa: PLC0415 (TensorFlow only where a test needs it)

    keras.utils.set_random_seed(seed)
    options = {"alpha": alpha} if builtin == "mobilenet_v2" else {}
    base = getattr(keras.applications, _BASES[builtin])(
        include_top=False, weights=None, input_shape=(32, 32, 3), **options
    )
    normalization = None
    if builtin == "efficientnet_b0":
        normalization = next(layer for layer in base.layers if isinstance(layer, keras.layers.Normalization))
        normalization.adapt_mean.assign(np.asarray(IMAGENET_MEAN, "float32"))
        # Calibrated as Keras' imagenet model runs, which divides by the standard deviation once more.
        normalization.adapt_variance.assign(np.square(IMAGENET_STDDEV, dtype="float32") * np.float32(IMAGENET_STDDEV))
        normalization.finalize_state()
    batch_norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in batch_norms]
    for layer in batch_norms:
        layer.momentum = 0.0  # one pass in training mode sets each moving statistic to its batch's
    pixels = np.random.default_rng(seed).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    module = {"efficientnet_b0": "efficientnet"}.get(builtin, builtin)
    base(getattr(keras.applications, module).preprocess_input(pixels), training=True)
    for layer, momentum in zip(batch_norms, momenta, strict=True):
        layer.momentum = momentum
    if normalization is not None:
        normalization.adapt_variance.assign(np.square(IMAGENET_STDDEV, dtype="float32"))  # what the file holds
        normalization.finalize_state()
    return base


def write_lookalike(folder: Path, builtin: str, *, alpha: float = 1.0, image_size: tuple[int, int] = (32, 32)) -> Path:
    """Write the file ``weights: imagenet`` asks for into ``folder``; its path."""
    import h5py  # noqa: PLC0415
    from keras.src.legacy.saving import legacy_h5_format  # noqa: PLC0415 (how Keras 2 wrote the published files)

    path = folder / imagenet_weights(builtin, alpha=alpha, image_size=image_size).file
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, lookalike_base(builtin, alpha=alpha))
    return path


def sums_of(files: dict[str, bytes]) -> bytes:
    """A SHA256SUMS file for served ``files`` (path -> bytes), as ``sha256sum`` writes it."""
    lines = [f"{hashlib.sha256(body).hexdigest()}  {name.rsplit('/', 1)[-1]}" for name, body in files.items()]
    return ("\n".join(lines) + "\n").encode()
