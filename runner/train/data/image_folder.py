"""The images of a dataset's folder: one subfolder per class, every file checked to be a decodable kind.

Hidden files and folders are skipped: Colab leaves ``.ipynb_checkpoints`` folders about, and archives made on
macOS carry ``._name.jpg`` companions that are not images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runner.errors import DatasetError
from runner.images import IMAGE_EXTENSIONS, first_bytes, is_image
from runner.spec import DatasetSpec

SPLIT_STREAM = 2**31 - 1
"""Second word of the generator that picks ``validation_split``'s images: no epoch number can collide with it."""

_LISTED = 20


@dataclass(frozen=True)
class Examples:
    """Image files and their class indices, in a fixed order."""

    files: tuple[Path, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.files)

    def take(self, indices: np.ndarray) -> Examples:
        """The examples at ``indices``, in that order."""
        return Examples(tuple(self.files[i] for i in indices), self.labels[indices])


@dataclass(frozen=True)
class ImageFolder:
    """A dataset's classes and its training and validation examples."""

    root: Path
    class_names: tuple[str, ...]
    train: Examples
    validation: Examples | None


def find_images(root: Path, spec: DatasetSpec, *, seed: int) -> ImageFolder:
    """List and check the images of ``spec.train`` (and the validation ones) under ``root``."""
    class_names, train = _scan(root, spec.train, field="train", source=spec.source)
    _check_class_count(class_names, spec)
    validation: Examples | None = None
    if spec.validation is not None:
        validation_names, validation = _scan(root, spec.validation, field="validation", source=spec.source)
        _check_same_classes(class_names, validation_names, spec)
    elif spec.validation_split is not None:
        train, validation = _split(train, spec.validation_split, seed)
    for examples in (train, validation):
        if examples is not None:
            check_signatures(root, examples.files)
    return ImageFolder(root, class_names, train, validation)


def _scan(root: Path, folder: str, *, field: str, source: str) -> tuple[tuple[str, ...], Examples]:
    base = root / folder
    if not base.is_dir():
        raise DatasetError(
            f"{field} folder {folder!r} is not in {source}: {_listing(root, folder)}; set dataset.{field} to the "
            "folder that holds one subfolder per class"
        )
    classes = tuple(sorted(entry.name for entry in os.scandir(base) if entry.is_dir() and not _hidden(entry.name)))
    if not classes:
        raise DatasetError(
            f"{field} folder {folder!r} has no class subfolders: put each class's images in a subfolder of its own "
            f"({folder}/<class>/<image>)"
        )
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = _images_in(base / name)
        if not found:
            raise DatasetError(
                f"class folder {folder}/{name} has no images ({' '.join(IMAGE_EXTENSIONS)}): add some, or remove "
                "the folder"
            )
        files += found
        labels += [index] * len(found)
    return classes, Examples(tuple(files), np.asarray(labels, dtype=np.int32))


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    found = []
    for parent, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not _hidden(name)]
        found += [Path(parent, name) for name in names if not _hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


def _listing(root: Path, folder: str) -> str:
    """What the nearest existing folder on the way to ``folder`` holds, to help fix a wrong name."""
    parent = root
    for part in Path(folder).parts:
        if not (parent / part).is_dir():
            break
        parent = parent / part
    names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in os.scandir(parent))
    names = [name for name in names if not _hidden(name)]
    where = "its top level" if parent == root else f"{parent.relative_to(root)}/"
    if not names:
        return f"{where} is empty"
    more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return f"{where} holds {', '.join(names[:_LISTED])}{more}"


def _check_class_count(class_names: tuple[str, ...], spec: DatasetSpec) -> None:
    if len(class_names) == 1 and spec.label_mode in ("binary", "categorical"):
        raise DatasetError(
            f"train folder {spec.train!r} has one class subfolder ({class_names[0]}): binary and categorical labels "
            "need at least 2 classes; add a subfolder for each class"
        )
    if spec.label_mode == "binary" and len(class_names) != 2:
        raise DatasetError(
            f"label_mode binary needs exactly 2 classes, but train folder {spec.train!r} has {len(class_names)} "
            f"({', '.join(class_names)}): set dataset.label_mode to categorical or int"
        )


def _check_same_classes(train: tuple[str, ...], validation: tuple[str, ...], spec: DatasetSpec) -> None:
    if train == validation:
        return
    missing = [name for name in train if name not in validation]
    extra = [name for name in validation if name not in train]
    details = "; ".join(
        text
        for text in (
            f"missing there: {', '.join(missing)}" if missing else "",
            f"not in train: {', '.join(extra)}" if extra else "",
        )
        if text
    )
    raise DatasetError(
        f"validation folder {spec.validation!r} has other classes than train folder {spec.train!r} ({details}): "
        "give both folders the same class subfolders"
    )


def _split(train: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Hold out ``round(fraction * n)`` images, picked from the seed alone, so a resumed job holds out the same."""
    count = len(train)
    held = round(fraction * count)
    if not 1 <= held < count:
        raise DatasetError(
            f"validation_split {fraction} of {count} training images leaves {held} for validation and "
            f"{count - held} for training: both need at least one; change dataset.validation_split"
        )
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(count)
    return train.take(np.sort(order[held:])), train.take(np.sort(order[:held]))


def check_signatures(root: Path, files: tuple[Path, ...]) -> None:
    """Refuse, up front, any file that does not begin like a JPEG, PNG, GIF or BMP, naming it."""
    for path in files:
        try:
            head = first_bytes(path)
        except OSError as error:
            raise DatasetError(
                f"image {path.relative_to(root)} cannot be read ({error.strerror}): replace or delete it"
            ) from None
        if not is_image(head):
            raise DatasetError(
                f"image {path.relative_to(root)} is not a JPEG, PNG, GIF or BMP file (it begins with {head[:4]!r}): "
                "replace or delete it"
            )
