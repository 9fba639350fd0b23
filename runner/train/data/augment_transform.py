"""The geometry of ``dataset.augment`` shared by both backends' augmenters: how an image's uniform draws become
flips, a turn, a zoom and a shift, as rows of a projective transform (the form of TensorFlow's
``ImageProjectiveTransformV3`` and of ``keras.ops.image.affine_transform``).

Written once over an array namespace (``tensorflow`` or ``numpy``), so the TensorFlow pipeline and the JAX
backend's NumPy one read the same draws the same way.
"""

from __future__ import annotations

import math
from typing import Any

from runner.spec import AugmentSpec

DRAWS = 8
"""Uniform numbers drawn per image: two flips, turn, zoom, two shifts, contrast, brightness."""

EPOCH_STRIDE = 1 << 32
"""Seeds of one epoch's images lie apart from the next epoch's: (epoch x this + image index)."""


def transform_rows(spec: AugmentSpec, spread: Any, height: Any, width: Any, ops: Any) -> Any:
    """One row of 8 per image, for the turn about the centre, the zoom and the shift that ``spread`` (each draw
    in [-1, 1), shape (b, DRAWS)) asks for; ``ops`` is the array namespace (``tf`` or ``np``)."""
    angle = spec.rotation * 2.0 * math.pi * spread[:, 2]
    scale = 1.0 + spec.zoom * spread[:, 3]  # above 1: zoomed in
    shift_x, shift_y = spec.translation * width * spread[:, 4], spec.translation * height * spread[:, 5]
    cos, sin = ops.cos(angle) / scale, ops.sin(angle) / scale
    centre_x, centre_y = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    # Each output pixel (x, y) reads the input at (a0 x + a1 y + a2, b0 x + b1 y + b2).
    return ops.stack(
        [
            cos,
            sin,
            centre_x - cos * centre_x - sin * centre_y - shift_x,
            -sin,
            cos,
            centre_y + sin * centre_x - cos * centre_y - shift_y,
            ops.zeros_like(cos),
            ops.zeros_like(cos),
        ],
        axis=1,
    )
