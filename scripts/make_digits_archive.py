"""Build runner/datasets/digits.tar.gz, the real data `runner demo` trains on.

The UCI optical handwritten digits (1,797 8x8 images, 10 classes), from the copy shipped with scikit-learn,
upsampled to 32x32 grayscale PNGs and split 80/20 per class into train/ and validation/ folders (one subfolder
per class). Run once by a maintainer (needs scikit-learn); the archive is committed, so users and tests never
need scikit-learn or the network.

    python scripts/make_digits_archive.py
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

TARGET = Path(__file__).resolve().parent.parent / "runner" / "datasets" / "digits.tar.gz"
SCALE = 4
VALIDATION_EVERY = 5  # every 5th image of each class goes to validation: 20%

ATTRIBUTION = """\
UCI ML hand-written digits (optical recognition of handwritten digits), the test set of 1,797 images as
shipped with scikit-learn (sklearn.datasets.load_digits).
Creators: E. Alpaydin and C. Kaynak, Bogazici University, 1998.
Source: UCI Machine Learning Repository, "Optical Recognition of Handwritten Digits", licensed CC BY 4.0.
Changes: 8x8 images of counts 0..16 scaled to 0..255 and upsampled 4x (nearest) to 32x32 grayscale PNGs;
split 80/20 per class into train/ and validation/.
"""


def png_gray(pixels: np.ndarray) -> bytes:
    """A minimal 8-bit grayscale PNG."""
    height, width = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].astype(np.uint8).tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1767225600, 0o644
    archive.addfile(info, io.BytesIO(data))


def main() -> None:
    digits = load_digits()
    seen: dict[int, int] = {}
    buffer = io.BytesIO()
    # Fixed times and a gzip mtime of 0 make the archive byte-for-byte reproducible.
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as zipped:
        with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive:
            _add(archive, "digits/ATTRIBUTION.txt", ATTRIBUTION.encode())
            for index, (image, label) in enumerate(zip(digits.images, digits.target)):
                count = seen.get(int(label), 0)
                seen[int(label)] = count + 1
                split = "validation" if count % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
                pixels = np.kron(np.round(image * 255 / 16), np.ones((SCALE, SCALE)))
                _add(archive, f"digits/{split}/{label}/{index:04d}.png", png_gray(pixels))
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_bytes(buffer.getvalue())
    print(f"wrote {TARGET} ({TARGET.stat().st_size} bytes, {len(digits.images)} images)")


if __name__ == "__main__":
    main()
