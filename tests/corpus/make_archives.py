"""Build the corpus's archives: `python tests/corpus/make_archives.py [OUT_DIR]` (default: ./archives here).

The archives are checked in; this script is how they were made. It needs only the standard library and is
deterministic (fixed timestamps, owners and gzip headers), so running it again gives the same bytes, and a test
checks that. Images are tiny grayscale PNGs written by hand (8x8 pixels, a few hundred bytes).
"""

from __future__ import annotations

import gzip
import io
import struct
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATE = (2024, 1, 1, 0, 0, 0)
MTIME = 1704067200

ESCAPE_NAME = "runner-corpus-escaped"
"""Every entry that tries to write outside its folder is named like this: a test looks for it everywhere."""


def png(shade: int, number: int, size: int = 8) -> bytes:
    """A grayscale PNG: a gradient, offset by ``shade`` (the class) and ``number`` (the image)."""
    rows = b"".join(
        b"\x00" + bytes((shade + number * 7 + x * 3 + y * 5) % 256 for x in range(size)) for y in range(size)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def images(classes: dict[str, int], split: str = "train") -> dict[str, bytes]:
    """``split/<class>/<n>.png`` for each class, ``classes[class]`` images each."""
    files = {}
    for index, (name, count) in enumerate(sorted(classes.items())):
        for number in range(count):
            files[f"{split}/{name}/{number}.png"] = png(index * 90, number)
    return files


GOOD = images({"a": 3, "b": 3})


# --- writers ----------------------------------------------------------------------------------------------------


def write_zip(path: Path, files: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> None:
    """A zip of ``files`` (names kept exactly as given, ``../`` and ``/`` included) and Unix ``symlinks``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, DATE)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name, DATE)
            info.create_system = 3  # Unix: the mode bits say "symbolic link"
            info.external_attr = 0o120777 << 16
            archive.writestr(info, target.encode())


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A .tar.gz of ``members`` with a fixed gzip header (no name, no time)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", filename="", mtime=0) as writer:
        writer.write(raw.getvalue())
    return packed.getvalue()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info, data


def special(name: str, kind: bytes, *, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o777 if kind == tarfile.SYMTYPE else 0o644
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    return info, None


def good_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [regular(name, data) for name, data in GOOD.items()]


# --- the corpus -------------------------------------------------------------------------------------------------


def build(out: Path) -> list[Path]:
    """Write every archive into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []

    def zipped(name: str, files: dict[str, bytes], **kwargs: dict[str, str]) -> None:
        write_zip(out / name, files, **kwargs)
        made.append(out / name)

    def tarred(name: str, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
        (out / name).write_bytes(tar_bytes(members))
        made.append(out / name)

    # A valid dataset: two classes of three images (the good job, the checksum and factory cases use it).
    zipped("good.zip", GOOD)
    # Entries that would write outside the folder they are unpacked into.
    zipped("zip-slip.zip", {**GOOD, f"../../{ESCAPE_NAME}-zip-slip.txt": b"escaped"})
    zipped("zip-absolute.zip", {**GOOD, f"/tmp/{ESCAPE_NAME}-zip-absolute.txt": b"escaped"})
    zipped("zip-windows-drive.zip", {**GOOD, f"C:\\{ESCAPE_NAME}-zip-drive.txt": b"escaped"})
    zipped("zip-symlink-out.zip", GOOD, symlinks={"train/a/up": "../../../.."})
    tarred("tar-slip.tar.gz", [*good_members(), regular(f"../../{ESCAPE_NAME}-tar-slip.txt", b"escaped")])
    tarred("tar-absolute.tar.gz", [*good_members(), regular(f"/tmp/{ESCAPE_NAME}-tar-absolute.txt", b"escaped")])
    tarred(
        "tar-symlink-out.tar.gz",
        [
            *good_members(),
            special("train/b/up", tarfile.SYMTYPE, link="../../.."),
            regular(f"train/b/up/{ESCAPE_NAME}-tar-through-link.txt", b"escaped"),
        ],
    )
    tarred("tar-hardlink-out.tar.gz", [*good_members(), special("train/a/passwd", tarfile.LNKTYPE, link="../etc/passwd")])
    tarred("tar-device.tar.gz", [*good_members(), special("train/a/null", tarfile.CHRTYPE)])
    # Damaged or mislabelled archives.
    good_zip = (out / "good.zip").read_bytes()
    (out / "truncated.zip").write_bytes(good_zip[: len(good_zip) // 2])
    made.append(out / "truncated.zip")
    good_tar = tar_bytes(good_members())
    (out / "truncated.tar.gz").write_bytes(good_tar[: len(good_tar) // 2])
    made.append(out / "truncated.tar.gz")
    (out / "not-an-archive.zip").write_bytes(b"<html><body>404 Not Found</body></html>\n")
    made.append(out / "not-an-archive.zip")
    # Datasets laid out wrong.
    zipped("no-class-folders.zip", {f"train/{number}.png": png(0, number) for number in range(4)})
    zipped("one-class.zip", images({"only": 4}))
    zipped("three-classes.zip", images({"a": 2, "b": 2, "c": 2}))
    zipped("empty-class.zip", {**images({"b": 3}), "train/a/notes.txt": b"no images here"})
    zipped("validation-other-classes.zip", {**GOOD, **images({"a": 2, "c": 2}, split="validation")})
    # Images that are not images: a garbage file with an image's name, and a PNG cut short after its header.
    zipped("garbage-image.zip", {**GOOD, "train/b/3.png": b"\x00\n\x01\rnot an image at all\n" * 4})
    zipped("truncated-image.zip", {**GOOD, "train/a/3.png": png(0, 3)[:40]})
    return made


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "archives"
    for path in build(target):
        print(f"{path.stat().st_size:6d}  {path}")
