"""What both input pipelines share: TensorFlow's (``pipeline.py``, tf.data) and the one of NumPy and Pillow
(``arrays.py``) that the JAX backend uses where there is no TensorFlow. Both give each epoch's examples in the
same order, a pure function of (seed, epoch), so a resumed run sees the batches an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from runner.errors import DatasetError

MEMORY_BUDGET_BYTES = 2 * 1024**3
"""Decoded images (uint8) up to this many bytes are kept in memory; a larger dataset is decoded every epoch.

2 GiB leaves most of a Colab VM's 12 GB to TensorFlow and the model, and holds the tutorial's cats and dogs
(3,000 images of 150x150x3, 200 MB) many times over.
"""


def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The order of the ``count`` training examples in ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def naming_the_copy(error: DatasetError, root: Path, cache_dir: Path) -> DatasetError:
    """``error``, naming the local copy it was found in when runner reads one (not the user's own folder)."""
    if not root.is_relative_to(cache_dir):
        return error
    return DatasetError(f"{error} (in the local copy {root}; `runner work --refresh-data` fetches the source again)")


def describe(data: Any, console: Console | None) -> None:
    """One line on the console: how many images and classes, and whether they are kept in memory."""
    if console is None:
        return
    names = ", ".join(data.class_names[:10]) + (", ..." if data.num_classes > 10 else "")
    where = "kept in memory" if data.in_memory else "decoded from disk every epoch"
    console.print(
        escape(
            f"dataset: {data.num_train} training and {data.num_validation} validation images, "
            f"{data.num_classes} classes ({names}), {where}"
        )
    )


@contextmanager
def decode_progress(console: Console | None, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar of images decoded; what it yields advances it by a count."""
    if console is None:
        yield lambda _: None
        return
    columns = (TextColumn("decode"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("decode", total=total)
        yield lambda done: progress.advance(task, done)
