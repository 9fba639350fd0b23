"""What both input pipelines share: TensorFlow's (``pipeline.py``, tf.data) and the one of NumPy and Pillow
(``arrays.py``) that the JAX backend uses where there is no TensorFlow. Both give each epoch's examples in the
same order, a pure function of (seed, epoch), so a resumed run sees the batches an uninterrupted one would have.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from runner.errors import DatasetError
from runner.paths import default_cache_dir
from runner.spec import AugmentSpec, DatasetSpec
from runner.train.data.cache import fetch_source
from runner.train.data.image_folder import ImageFolder

MEMORY_BUDGET_BYTES = 2 * 1024**3
"""Decoded images (uint8) up to this many bytes are kept in memory; a larger dataset is decoded every epoch.

2 GiB leaves most of a Colab VM's 12 GB to TensorFlow and the model, and holds the tutorial's cats and dogs
(3,000 images of 150x150x3, 200 MB) many times over.
"""


def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The order of the ``count`` training examples in ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def first_sample(data: Any, *, epoch: int, start_step: int, start_sample: int | None) -> int:
    """Where in ``epoch``'s order a pass over ``data``'s training examples starts: at batch ``start_step``, or at
    sample ``start_sample`` (after the batch size changed mid-epoch, the samples done are no longer a multiple of
    the batch size). A value out of range is a ``ValueError`` that names it."""
    if epoch < 0:
        raise ValueError(f"epoch must be 0 or more, got {epoch!r}")
    if not 0 <= start_step <= data.steps_per_epoch:
        raise ValueError(f"start_step must be between 0 and {data.steps_per_epoch}, got {start_step!r}")
    if start_sample is None:
        return int(min(start_step * data.batch_size, data.num_train))
    if start_step or not 0 <= start_sample <= data.num_train:
        limits = f"between 0 and {data.num_train}, without start_step"
        raise ValueError(f"start_sample must be {limits}, got {start_sample!r}")
    return start_sample


def naming_the_copy(error: DatasetError, root: Path, cache_dir: Path) -> DatasetError:
    """``error``, naming the local copy it was found in when runner reads one (not the user's own folder)."""
    if not root.is_relative_to(cache_dir):
        return error
    return DatasetError(f"{error} (in the local copy {root}; `runner work --refresh-data` fetches the source again)")


def describe(data: Any, console: Console | None) -> None:
    """One line on the console: how many images and classes, whether they are kept in memory, and the changes
    ``dataset.augment`` makes to the training images."""
    if console is None:
        return
    names = ", ".join(data.class_names[:10]) + (", ..." if data.num_classes > 10 else "")
    where = "kept in memory" if data.in_memory else "decoded from disk every epoch"
    changes = "" if data.augment is None else f", augmented ({augment_changes(data.augment)})"
    console.print(
        escape(
            f"dataset: {data.num_train} training and {data.num_validation} validation images, "
            f"{data.num_classes} classes ({names}), {where}{changes}"
        )
    )


def augment_changes(augment: AugmentSpec) -> str:
    """What ``augment`` changes, in the spec's own words: ``flip horizontal, rotation 0.05``."""
    return ", ".join(f"{name} {value}" for name, value in augment.model_dump().items() if value)


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


def read_source(
    spec: DatasetSpec,
    read: Callable[[Path], Any],
    *,
    cache_dir: Path | None,
    console: Console | None,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Fetch, check and unpack the source into the local cache (once), give its folder to ``read``, and describe
    what it returned on the console; a problem in runner's local copy says so (`--refresh-data` fetches again)."""
    cache_dir = cache_dir or default_cache_dir()
    root = fetch_source(spec, cache_dir=cache_dir, console=console, sleep=sleep)
    try:
        data = read(root)
    except DatasetError as error:
        raise naming_the_copy(error, root, cache_dir) from None
    describe(data, console)
    return data


def folder_fields(folder: ImageFolder, spec: DatasetSpec, *, seed: int, memory_budget: int | None) -> dict[str, Any]:
    """What both pipelines' data hold of a folder of images: the classes, sizes and counts, and whether the
    decoded images fit ``memory_budget`` (default :data:`MEMORY_BUDGET_BYTES`) to be kept in memory."""
    channels = 1 if spec.color_mode == "grayscale" else 3
    count = len(folder.train) + (len(folder.validation) if folder.validation is not None else 0)
    budget = MEMORY_BUDGET_BYTES if memory_budget is None else memory_budget
    return {
        "class_names": folder.class_names,
        "image_size": spec.image_size,
        "channels": channels,
        "label_mode": spec.label_mode,
        "batch_size": spec.batch_size,
        "num_train": len(folder.train),
        "num_validation": len(folder.validation) if folder.validation is not None else 0,
        "seed": seed,
        "in_memory": count * spec.image_size[0] * spec.image_size[1] * channels <= budget,
        "train_counts": tuple(
            int(count) for count in np.bincount(folder.train.labels, minlength=len(folder.class_names))
        ),
    }
