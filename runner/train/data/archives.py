"""Unpacking a zip or tar archive without letting any entry write outside its folder.

Every entry is checked before anything is written: no absolute names, no ``..``, no device files, no entry
reached through a symbolic link, and links (symbolic or hard) only to places inside the folder. The checks
are lexical and done for the whole archive first, because a link declared late in an archive can redirect an
earlier one. Nothing here knows about datasets beyond the message's words.
"""

from __future__ import annotations

import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from runner.errors import DatasetError

Kind = Literal["dir", "file", "symlink", "hardlink", "special"]

_DAMAGE = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, UnicodeDecodeError)
"""What a truncated or garbled archive raises while it is read."""


@dataclass(frozen=True)
class _Entry:
    """One archive member, whatever the format."""

    raw_name: str
    kind: Kind
    link: str | None = None
    open: Callable[[], IO[bytes]] | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        """The name's components, without empty or ``.`` ones (``./a//b`` is ``a/b``)."""
        return PurePosixPath(self.raw_name).parts if not _is_absolute(self.raw_name) else ()

    @property
    def name(self) -> str:
        return "/".join(self.parts)


def unpack_archive(archive: Path, target: Path, *, label: str) -> None:
    """Unpack a zip or tar (optionally gz/bz2/xz) ``archive`` into the new folder ``target``.

    ``label`` names the archive in messages (the user's URL or path, not the cache's copy). Raises
    :class:`DatasetError` for an archive that is not a zip or tar, is damaged, or has an unsafe entry; the
    caller removes ``target`` then.
    """
    try:
        with _entries(archive, label) as entries:
            _check_all(entries, label)
            target.mkdir(parents=True, exist_ok=True)
            for entry in entries:
                _write(entry, target, label)
    except _DAMAGE as error:
        raise DatasetError(f"archive {label} is damaged ({error}): download or copy it again") from None


@contextmanager
def _entries(archive: Path, label: str) -> Iterator[list[_Entry]]:
    with open(archive, "rb") as reader:
        head = reader.read(4)
    # By its first bytes, not zipfile.is_zipfile: that one also says yes to a tar whose last member is a zip.
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        with zipfile.ZipFile(archive) as handle:
            yield [_zip_entry(handle, info) for info in handle.infolist()]
        return
    try:
        handle = tarfile.open(archive)
    except tarfile.TarError:
        raise DatasetError(
            f"{label} is not a valid zip or tar archive: point dataset.source at a .zip, .tar.gz, .tgz or .tar "
            "file (or a folder), and download or copy it again if it was cut short"
        ) from None
    with handle:
        yield [_tar_entry(handle, member) for member in handle.getmembers()]


def _zip_entry(handle: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Entry:
    mode = info.external_attr >> 16  # Unix mode bits, when a Unix tool made the archive; 0 otherwise
    if info.is_dir():
        return _Entry(info.filename, "dir")
    if stat.S_ISLNK(mode):
        return _Entry(info.filename, "symlink", link=handle.read(info).decode("utf-8"))
    if stat.S_IFMT(mode) in (0, stat.S_IFREG):
        return _Entry(info.filename, "file", open=lambda: handle.open(info))
    return _Entry(info.filename, "special")


def _tar_entry(handle: tarfile.TarFile, member: tarfile.TarInfo) -> _Entry:
    if member.isdir():
        return _Entry(member.name, "dir")
    if member.isreg():
        return _Entry(member.name, "file", open=lambda: _extracted(handle, member))
    if member.issym():
        return _Entry(member.name, "symlink", link=member.linkname)
    if member.islnk():
        return _Entry(member.name, "hardlink", link=member.linkname)
    return _Entry(member.name, "special")


def _extracted(handle: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    reader = handle.extractfile(member)
    assert reader is not None, "a regular member always has content"
    return reader


# --- checks -----------------------------------------------------------------------------------------------


def _check_all(entries: list[_Entry], label: str) -> None:
    links = {entry.name for entry in entries if entry.kind == "symlink"}
    for entry in entries:
        if entry.kind == "special":
            raise DatasetError(
                f"archive {label} has a device or other special file: {entry.raw_name}; refusing to unpack it "
                "(a dataset holds only folders and image files)"
            )
        if _escapes(entry) or _through_link(entry.parts[:-1], links) or _link_escapes(entry, links):
            shown = f"{entry.raw_name} -> {entry.link}" if entry.link is not None else entry.raw_name
            raise DatasetError(
                f"archive {label} has an entry that would write outside its folder: {shown}; refusing to unpack it"
            )


def _is_absolute(name: str) -> bool:
    # A Windows drive ("C:") or a leading backslash is absolute to the tool that made the archive.
    return name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) is not None


def _escapes(entry: _Entry) -> bool:
    return _is_absolute(entry.raw_name) or ".." in PurePosixPath(entry.raw_name).parts


def _through_link(parts: tuple[str, ...], links: set[str]) -> bool:
    """Whether a path steps through a symbolic link: the lexical checks hold only where none is crossed."""
    return any("/".join(parts[: end + 1]) in links for end in range(len(parts)))


def _link_escapes(entry: _Entry, links: set[str]) -> bool:
    """Whether a link's target lies outside the folder, or is reached through another link."""
    if entry.link is None:
        return False
    if _is_absolute(entry.link):
        return True
    # A symbolic link is relative to its own folder; a tar hard link to the archive's root.
    walked = list(entry.parts[:-1]) if entry.kind == "symlink" else []
    for part in PurePosixPath(entry.link).parts:
        if _through_link(tuple(walked), links):
            return True  # ".." after a link goes up from wherever the link points
        if part != "..":
            walked.append(part)
        elif not walked:
            return True
        else:
            walked.pop()
    # The last component may itself be a link: that one is checked on its own.
    return entry.kind == "hardlink" and not walked


# --- writing ----------------------------------------------------------------------------------------------


def _write(entry: _Entry, target: Path, label: str) -> None:
    if not entry.parts:
        return  # the archive's root folder ("./")
    path = target.joinpath(*entry.parts)
    if entry.kind == "dir":
        if not path.is_symlink():  # a folder entry named like a link: what is under it was refused already
            path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear(path, entry, label)
    if entry.kind == "symlink":
        path.symlink_to(entry.link or "")
    elif entry.kind == "hardlink":
        source = target.joinpath(*PurePosixPath(entry.link or "").parts)
        if not source.is_file():
            raise DatasetError(f"archive {label} is damaged (hard link {entry.raw_name} to a missing file)")
        shutil.copyfile(source, path)  # a copy, not a link: the cache never shares inodes with anything
    else:
        assert entry.open is not None
        with entry.open() as reader, open(path, "wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)


def _clear(path: Path, entry: _Entry, label: str) -> None:
    """Remove an earlier entry of the same name, so that a file is never written through a link."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        raise DatasetError(f"archive {label} is damaged (entry {entry.raw_name} is both a folder and a file)")
