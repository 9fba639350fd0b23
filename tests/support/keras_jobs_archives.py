"""Archives and image folders for the Keras job tests: a look-alike of the tutorial's cats-and-dogs zip, and
the broken inputs a user can hand `runner work` (garbage images, a zip-slip entry).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

TUTORIAL_ROOT = "cats_and_dogs_filtered"
"""The top folder of the real tutorial archive."""

TUTORIAL_CLASSES = {"cats": "cat", "dogs": "dog"}
"""Class folder -> file name prefix, as in the real archive (cats/cat.1.jpg, dogs/dog.1.jpg)."""


def _jpeg(class_index: int, number: int, *, size: tuple[int, int] = (30, 40)) -> bytes:
    """A small random-ish JPEG (height x width), tinted by class so that the classes differ a little."""
    import tensorflow as tf  # noqa: PLC0415 (only when images are made: collecting the tests stays quick)

    rng = np.random.default_rng([class_index, number])
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    pixels[..., class_index] = np.maximum(pixels[..., class_index], 128)
    return tf.io.encode_jpeg(tf.constant(pixels), quality=90).numpy()


def tutorial_lookalike_zip(*, train_per_class: int = 10, validation_per_class: int = 5) -> bytes:
    """A zip laid out like cats_and_dogs_filtered.zip: <root>/{train,validation}/{cats,dogs}/<cat|dog>.<n>.jpg."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        number = 0
        for split, count in (("train", train_per_class), ("validation", validation_per_class)):
            archive.writestr(f"{TUTORIAL_ROOT}/{split}/", b"")
            for class_index, (folder, prefix) in enumerate(TUTORIAL_CLASSES.items()):
                archive.writestr(f"{TUTORIAL_ROOT}/{split}/{folder}/", b"")
                for _ in range(count):
                    number += 1
                    name = f"{TUTORIAL_ROOT}/{split}/{folder}/{prefix}.{number}.jpg"
                    archive.writestr(name, _jpeg(class_index, number))
    return buffer.getvalue()


def sha256_of(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def write_image_folders(root: Path, classes: dict[str, int], *, splits: tuple[str, ...] = ("train",)) -> Path:
    """``root/<split>/<class>/<n>.jpg`` with ``classes[class]`` small JPEGs each."""
    for split in splits:
        for class_index, (name, count) in enumerate(sorted(classes.items())):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                (folder / f"{number}.jpg").write_bytes(_jpeg(class_index, number, size=(12, 12)))
    return root


def zip_of_folder(folder: Path, target: Path, *, extra: dict[str, bytes] | None = None) -> Path:
    """``folder``'s files in a zip at ``target`` (names relative to ``folder``), plus ``extra`` raw entries."""
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            archive.writestr(zipfile.ZipInfo(name), data)  # ZipInfo keeps the name as given, "../" included
    return target
