"""What an image file is, to runner: a name and first bytes it can tell without loading TensorFlow."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
"""File name endings read as images (any case), as Keras' ``image_dataset_from_directory`` reads them."""

SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
"""How JPEG, PNG, GIF and BMP files begin: a file that does not is refused before any model sees it."""


def first_bytes(path: Path) -> bytes:
    """The first 8 bytes of a file (``OSError`` when it cannot be read)."""
    with open(path, "rb") as reader:
        return reader.read(8)


def is_image(head: bytes) -> bool:
    """Whether a file beginning with ``head`` is a JPEG, PNG, GIF or BMP."""
    return head.startswith(SIGNATURES)
