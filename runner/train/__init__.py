"""The Keras training engine: the only package of runner that imports TensorFlow.

``runner work`` loads ``runner.train:KerasTrainer``. The name is resolved lazily so that importing one module
of this package (``runner.train.data`` in a test, say) does not load all of them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KerasTrainer"]


def __getattr__(name: str) -> Any:
    if name == "KerasTrainer":
        from runner.train.trainer import KerasTrainer

        return KerasTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
