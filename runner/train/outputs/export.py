"""Exporting the finished model into the job's ``final/`` folder, all formats at once or none.

The files are written on local disk first, then copied into a temporary folder in the job folder and renamed to
``final/``, so a kill during the export never leaves a half-written model where users look for one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras

from runner import storage
from runner.errors import StorageError
from runner.paths import JobPaths, temp_sibling
from runner.spec import JobSpec
from runner.train.models.build import use_model_weights

FILE_NAMES = {"keras": "model.keras", "h5": "model.h5", "saved_model": "saved_model"}
"""What each export format is called inside ``final/``."""

BEST_FILE = "best.keras"
"""The best epoch's model beside the last one in ``final/``, when the job exports it: what predictions use first."""

DESCRIPTION_FILE = "model.json"
"""Beside the exported model: what it takes (raw pixels, the size, the channels) and what it gives (the classes)."""

DESCRIPTION_FORMAT = 1

RAW_PIXELS = (
    "float32 pixel values 0-255, as the job trained on: do not divide by 255 (the model rescales them itself, or "
    "was trained without rescaling)"
)

OUTPUTS = {
    "binary": "one value per image: the probability of the second class (classes[1])",
    "categorical": "one probability per class, in the order of classes",
    "int": "one probability per class, in the order of classes",
}


def describe_model(
    spec: JobSpec, class_names: tuple[str, ...], history: list[dict[str, float]], *, best: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The exported model's input contract and classes: what ``final/model.json`` holds; with ``export.best``,
    which epoch ``best.keras`` is (1-based) and its monitored value."""
    height, width = spec.dataset.image_size
    last = dict(history[-1]) if history else {}
    last.pop("epoch", None)
    return {
        "format": DESCRIPTION_FORMAT,
        "job": spec.name,
        "input": {
            "height": height,
            "width": width,
            "channels": 1 if spec.dataset.color_mode == "grayscale" else 3,
            "color_mode": spec.dataset.color_mode,
            "pixels": RAW_PIXELS,
            "resize": f"bilinear, to {height}x{width} (height x width), not keeping the aspect ratio",
        },
        "classes": list(class_names),
        "label_mode": spec.dataset.label_mode,
        "output": OUTPUTS[spec.dataset.label_mode],
        "epochs": len(history),
        "metrics": last,
        "optimizer": spec.export.optimizer,
        "best": None
        if not (spec.export.best and best)
        else {
            "file": BEST_FILE,
            "epoch": best["epoch"] + 1,
            "monitor": best["monitor"],
            "value": best["value"],
        },
    }


def write_exports(
    model: keras.Model,
    spec: JobSpec,
    folder: Path,
    description: dict[str, Any],
    *,
    best_weights: list[Any] | None = None,
) -> list[str]:
    """Save ``model`` in every format the spec asks for into ``folder`` (local disk), and its description; with
    ``best_weights``, the model with those weights as ``best.keras`` too (the model keeps them afterwards)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [FILE_NAMES[kind] for kind in spec.export.formats]
    for kind in spec.export.formats:
        target = folder / FILE_NAMES[kind]
        if kind == "saved_model":
            model.export(str(target), verbose=False)  # a TF SavedModel for serving
            continue
        with _without_legacy_warning(), _optimizer_left_out(model, unless=spec.export.optimizer):
            model.save(str(target), **({"include_optimizer": spec.export.optimizer} if kind == "h5" else {}))
    if best_weights is not None:
        use_model_weights(model, best_weights)
        with _optimizer_left_out(model, unless=False):
            model.save(str(folder / BEST_FILE))
        names.append(BEST_FILE)
    (folder / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return [*names, DESCRIPTION_FILE]


@contextlib.contextmanager
def _optimizer_left_out(model: keras.Model, *, unless: bool) -> Iterator[None]:
    """Save ``model`` as if it had never been compiled: the optimizer's state (two slots per weight with Adam)
    is two thirds of the tutorial network's file and serves only training, which the job's checkpoints already
    hold. Keras' ``.keras`` writer has no switch for it, and a compile config without the optimizer's state makes
    every later load warn that the optimizer's variables were skipped; so both are hidden while it writes."""
    if unless or model.optimizer is None:
        yield
        return
    optimizer, compiled = model.optimizer, model.compiled
    model.optimizer, model.compiled = None, False
    try:
        yield
    finally:
        model.optimizer, model.compiled = optimizer, compiled


@contextlib.contextmanager
def _without_legacy_warning() -> Iterator[None]:
    """Keras calls the ``.h5`` the user asked for "legacy" through absl, which also gives the root logger a
    handler as a side effect, and every log record of the process is then printed (again) in raw form. The
    warning is dropped and the handler taken away."""
    absl, root = logging.getLogger("absl"), logging.getLogger()
    level, handlers = absl.level, list(root.handlers)
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)
        for added in [handler for handler in root.handlers if handler not in handlers]:
            root.removeHandler(added)


def publish_exports(local: Path, paths: JobPaths, *, fence: Callable[[], None]) -> None:
    """Copy a local export folder to ``final/`` in the job folder, replacing an older one atomically, and read the
    copy back: a job is done only once its export is in the job folder as written."""
    temp = temp_sibling(paths.final)
    written: dict[Path, tuple[int, str]] = {}
    try:
        for source in sorted(p for p in local.rglob("*") if p.is_file()):
            relative = source.relative_to(local)
            storage.make_dirs((temp / relative).parent)
            written[relative] = storage.copy_file(source, temp / relative)
        fence()
        if storage.exists(paths.final):
            # A previous session exported but died before marking the job done: replace its export.
            old = temp_sibling(paths.final, "old-final")
            storage.commit_dir(paths.final, old)
            storage.remove_tree(old)
        storage.commit_dir(temp, paths.final)
    except BaseException:
        storage.remove_tree(temp)
        raise
    for relative, expected in written.items():
        if storage.file_digest(paths.final / relative) != expected:
            raise StorageError(
                f"{paths.final / relative} does not read back as it was written: run `runner work` again",
                path=str(paths.final / relative),
                transient=True,
            )
