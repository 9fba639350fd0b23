"""Hostile archives: entries that try to write outside the folder they are unpacked into.

Each archive also holds a good image folder, so the only reason to refuse it is the hostile entry. Absolute
targets point into ``outside``, a folder of the test's own, so that a broken unpacker would leave a visible
``evil`` file there rather than anywhere on the machine.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

from tests.support.data_images import encode, image

ESCAPES = ["dotdot", "nested-dotdot", "absolute", "symlink-absolute", "symlink-dotdot", "through-symlink", "link-chain"]
"""Cases for both zip and tar."""

TAR_ONLY = ["hardlink-absolute", "hardlink-dotdot"]
"""Cases only tar can express."""


def _entries(case: str, outside: Path) -> list[tuple[str, str, str]]:
    """(kind, name, content or link target) of the hostile entries for ``case``."""
    return {
        "dotdot": [("file", "../../../evil.txt", "pwned")],
        "nested-dotdot": [("file", "train/a/../../../../evil.txt", "pwned")],
        "absolute": [("file", str(outside / "evil-absolute.txt"), "pwned")],
        "symlink-absolute": [("symlink", "train/a/evil", str(outside))],
        "symlink-dotdot": [("symlink", "train/a/evil", "../../../..")],
        # A link inside the folder, then a file written through it.
        "through-symlink": [("symlink", "here", "train"), ("file", "here/evil.txt", "pwned")],
        # Each link alone stays inside; together "up" leads to the parent of the folder.
        "link-chain": [("symlink", "dot", "."), ("symlink", "up", "dot/..")],
        "hardlink-absolute": [("hardlink", "train/a/evil", str(outside / "secret.txt"))],
        "hardlink-dotdot": [("hardlink", "train/a/evil", "../secret.txt")],
        "device": [("device", "train/a/evil", "")],
    }[case]


def _good_files() -> dict[str, bytes]:
    classes = enumerate("ab")
    return {f"train/{name}/{i}.png": encode(image(label, i), "png") for label, name in classes for i in range(2)}


def hostile_zip(path: Path, case: str, outside: Path) -> Path:
    """A zip with good images and the hostile entries of ``case``."""
    with zipfile.ZipFile(path, "w") as handle:
        for name, data in _good_files().items():
            handle.writestr(name, data)
        for kind, name, content in _entries(case, outside):
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix, so that the mode bits below count
            mode = {"file": stat.S_IFREG | 0o644, "symlink": stat.S_IFLNK | 0o777, "device": stat.S_IFCHR | 0o644}
            info.external_attr = mode[kind] << 16
            handle.writestr(info, content)
    return path


def hostile_tar(path: Path, case: str, outside: Path) -> Path:
    """A tar.gz with good images and the hostile entries of ``case``."""
    with tarfile.open(path, "w:gz") as handle:
        for name, data in _good_files().items():
            _add(handle, tarfile.TarInfo(name), data)
        for kind, name, content in _entries(case, outside):
            info = tarfile.TarInfo(name)
            if kind == "file":
                _add(handle, info, content.encode())
                continue
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}[kind]
            info.linkname = content
            handle.addfile(info)
    return path


def _add(handle: tarfile.TarFile, info: tarfile.TarInfo, data: bytes) -> None:
    info.size = len(data)
    handle.addfile(info, io.BytesIO(data))
