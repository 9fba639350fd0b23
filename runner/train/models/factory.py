"""The user's network: ``model.factory: "package.module:function"``, imported from the working directory too."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import keras

from runner.errors import ModelError
from runner.train import backends
from runner.train.models.builtin import InputShape, one_line


def from_factory(
    dotted: str, params: dict[str, Any], *, input_shape: InputShape, num_classes: int
) -> keras.Model:
    """Call ``package.module:function(input_shape=..., num_classes=..., **params)`` and check it made a model."""
    function = import_factory(dotted)
    try:
        model = function(input_shape=input_shape, num_classes=num_classes, **params)
    except (Exception, SystemExit) as error:  # a script's argparse exits: that must fail the job, not the worker
        if isinstance(error, MemoryError) or backends.current().is_out_of_memory(error):
            raise  # the weights do not fit: the trainer names the image size
        raise ModelError(f"factory {dotted!r} raised {type(error).__name__}: {one_line(error)}") from error
    if not isinstance(model, keras.Model):
        raise ModelError(f"factory {dotted!r} returned {type(model).__name__}, not a keras.Model")
    return model


def import_factory(dotted: str) -> Callable[..., Any]:
    """The factory function ``package.module:function``, its module imported (from the working directory too)."""
    module_name, _, attribute = dotted.partition(":")
    try:
        with _cwd_on_path():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name == missing or module_name.startswith(f"{missing}."):
            fix = "put the module on PYTHONPATH or next to the notebook, in the working directory"
        else:  # the factory's own module imports something that is not installed
            fix = f"the factory's module needs {missing!r}: install it"
        raise ModelError(f"cannot import factory {dotted!r}: {error}: {fix}") from None
    except (Exception, SystemExit) as error:  # a module that exits on import must fail the job, not the worker
        raise ModelError(f"cannot import factory {dotted!r}: {type(error).__name__}: {one_line(error)}") from error
    function = getattr(module, attribute, None)
    if function is None:
        raise ModelError(f"cannot import factory {dotted!r}: module {module_name!r} has no attribute {attribute!r}")
    if not callable(function):
        raise ModelError(f"factory {dotted!r} is not a function (it is {type(function).__name__})")
    return function


@contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The working directory on sys.path for the import, so that a module next to the notebook is found."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    # The import system caches directory listings: a module written since the last import would be missed.
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
