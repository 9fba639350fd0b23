"""Model factories for the Keras job tests, imported by `runner work` through ``model.factory``."""

from __future__ import annotations

from typing import Any


def not_a_model(input_shape: Any, num_classes: int) -> Any:
    """A factory that returns something other than a keras.Model."""
    return 42
