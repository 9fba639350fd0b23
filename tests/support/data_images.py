"""Builders for the data tests: tiny image folders (real PNG/JPEG/GIF/BMP files) and archives of them.

Each PNG image carries its identity in its first pixel: red is ``60 * class index``, green the image's id, so a
test can read off, from any batch, which file every image came from (PNG is lossless and the tests resize
12x12 images to 12x12, which leaves every value as it is).
"""

from __future__ import annotations

import base64
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf

SIZE = (12, 12)

TINY_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
"""A 1x1 GIF: TensorFlow has no GIF encoder."""


def image(class_index: int, image_id: int, *, size: tuple[int, int] = SIZE) -> np.ndarray:
    """Random uint8 RGB pixels, with the class and the id in the first pixel."""
    pixels = np.random.default_rng([class_index, image_id]).integers(0, 256, (*size, 3), dtype=np.uint8)
    pixels[0, 0, 0], pixels[0, 0, 1] = 60 * class_index, image_id
    return pixels


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    """The pixels as a PNG, JPEG or BMP file's bytes."""
    if fmt == "png":
        return tf.io.encode_png(pixels).numpy()
    if fmt == "jpg":
        return tf.io.encode_jpeg(pixels).numpy()
    if fmt == "bmp":
        return bmp(pixels)
    raise ValueError(fmt)


def bmp(pixels: np.ndarray) -> bytes:
    """A 24-bit BMP: TensorFlow has no BMP encoder."""
    height, width, _ = pixels.shape
    row = (width * 3 + 3) // 4 * 4
    body = b"".join(pixels[y, :, ::-1].tobytes().ljust(row, b"\0") for y in range(height - 1, -1, -1))
    header = struct.pack("<2sIHHI", b"BM", 54 + len(body), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(body), 2835, 2835, 0, 0)
    return header + info + body


def write_classes(folder: Path, classes: dict[str, int], *, first_id: int = 0, fmt: str = "png") -> list[int]:
    """``folder/<class>/<id>.<fmt>`` for each class and count; returns the ids in the order they are listed."""
    ids = []
    next_id = first_id
    for class_index, (name, count) in enumerate(sorted(classes.items())):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            (folder / name / f"{next_id:03d}.{fmt}").write_bytes(encode(image(class_index, next_id), fmt))
            ids.append(next_id)
            next_id += 1
    return ids


def write_dataset(
    root: Path, train: dict[str, int], validation: dict[str, int] | None = None, *, fmt: str = "png"
) -> Path:
    """A dataset folder: ``root/train`` (and ``root/validation``), ids 0.. in train then on in validation."""
    ids = write_classes(root / "train", train, fmt=fmt)
    if validation is not None:
        write_classes(root / "validation", validation, first_id=len(ids), fmt=fmt)
    return root


def make_archive(folder: Path, archive: Path) -> Path:
    """``folder``'s contents as a .zip, .tar.gz, .tgz or .tar named ``archive`` (chosen by its suffix)."""
    files = sorted(path for path in folder.rglob("*"))
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as handle:
            for path in files:
                handle.write(path, path.relative_to(folder).as_posix())
        return archive
    mode = "w:gz" if archive.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(archive, mode) as handle:
        for path in files:
            handle.add(path, path.relative_to(folder).as_posix(), recursive=False)
    return archive


def ids_and_classes(images: np.ndarray) -> tuple[list[int], list[int]]:
    """The ids and class indices a batch of PNG-made images carries in its first pixel."""
    return [int(value) for value in images[:, 0, 0, 1]], [int(value) // 60 for value in images[:, 0, 0, 0]]
