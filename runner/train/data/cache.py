"""The local copy of a dataset: downloaded, or copied off Drive, checked and unpacked once into the cache.

```
<cache>/datasets/
    <key>.lock          one process at a time fills an entry
    <key>/
        archive         a downloaded or copied archive, kept only until its tree is committed
        data/           the unpacked (or copied) tree: renamed into place once complete
        READY.json      written last (atomically): data/ is complete, from which source, and (for a URL) the
                        server's ETag, Last-Modified and size of the file then
        .tmp-*          the work of a process that was killed: removed before the entry is filled again
```

A URL without ``dataset.sha256`` is asked again each time (one HEAD request): a file changed on the server since
it was cached is fetched again; a server that does not answer leaves the cached copy in use, said in a line.
``runner work --refresh-data`` forgets the copy (:func:`forget_cached`).

Training never reads images from Drive: Drive is slow at many small files (about one a second has been seen),
so a folder on Drive is copied once, and an archive on Drive is copied in one sequential read and unpacked on
local disk. A local folder is used where it is; a local archive is unpacked from where it is.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock
from rich.console import Console
from rich.markup import escape

from runner import storage
from runner.errors import DamagedFile, DatasetError, StorageError
from runner.paths import DatasetCachePaths, is_temp_name, temp_sibling
from runner.spec import DatasetSpec
from runner.train.data.archives import unpack_archive
from runner.train.data.download import Identity, download, probe, same_file

DRIVE_ROOT = Path("/content/drive")
"""Where Colab mounts Google Drive: sources under it are copied to local disk before training reads them."""


@dataclass(frozen=True)
class DatasetSource:
    """What ``dataset.source`` names: a URL, an archive file or a folder."""

    text: str
    kind: Literal["url", "archive", "folder"]
    path: Path | None = None
    sha256: str | None = None

    @classmethod
    def parse(cls, spec: DatasetSpec) -> DatasetSource:
        """Classify the spec's source; a missing file or folder is a :class:`DatasetError`."""
        text, sha256 = spec.source, spec.sha256.lower() if spec.sha256 else None
        if re.match(r"(?i)https?://", text):
            return cls(text, "url", sha256=sha256)
        if "://" in text:
            raise DatasetError(f"dataset.source {text} is a URL runner cannot fetch: use http(s)://, or a file path")
        path = Path(text).expanduser().absolute()
        if not storage.exists(path):
            hint = " (is Drive mounted?)" if _on_drive(path) else ""
            raise DatasetError(
                f"dataset source {text} does not exist{hint}: "
                "fix dataset.source (a URL, a .zip/.tar.gz file or a folder)"
            )
        return cls(text, "folder" if storage.is_dir(path) else "archive", path=path, sha256=sha256)

    @property
    def on_drive(self) -> bool:
        """Whether the source is on the mounted Google Drive (and so must be copied before use)."""
        return self.path is not None and _on_drive(self.path)

    @property
    def key(self) -> str:
        """The cache entry's name: readable, and distinct for each source and checksum."""
        where = self.text if self.kind == "url" else str(self.path)
        digest = hashlib.sha256(f"{where}\n{self.sha256 or ''}".encode()).hexdigest()[:16]
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", where.rstrip("/").rsplit("/", 1)[-1])[:40].lstrip(".")
        return f"{name or 'dataset'}-{digest}"

    def stamp(self) -> dict[str, Any]:
        """What must not have changed for a cached copy to be reused: a local archive's size and mtime too."""
        stamp: dict[str, Any] = {"source": self.text, "sha256": self.sha256}
        if self.kind == "archive" and self.path is not None:
            stat = self.path.stat()
            stamp |= {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return stamp


def _on_drive(path: Path) -> bool:
    return path.is_relative_to(DRIVE_ROOT)


class CacheEntry(DatasetCachePaths):
    """One source's folder in the cache, and how it is checked, cleared and committed."""

    def is_ready(self, stamp: dict[str, Any]) -> bool:
        """Whether the committed tree is complete and from this very source."""
        marker = self.read_marker()
        return marker is not None and marker.get("stamp") == stamp and self.data.is_dir()

    def read_marker(self) -> dict[str, Any] | None:
        """READY.json, or ``None`` when there is none (or it is damaged)."""
        try:
            marker = storage.read_json(self.marker)
        except (StorageError, DamagedFile):
            return None
        return marker if isinstance(marker, dict) else None

    def clear(self, *, keep_archive: bool) -> None:
        """Remove everything but (optionally) a complete archive; the marker first, so a kill leaves no lie."""
        storage.remove_file(self.marker)
        storage.remove_tree(self.data)
        if not keep_archive:
            storage.remove_file(self.archive)
        for name in storage.list_dir(self.folder):
            if is_temp_name(name):
                path = self.folder / name
                storage.remove(path)

    def commit(self, stamp: dict[str, Any], remote: Identity | None = None) -> None:
        """Mark the tree complete; the archive it came from is no longer needed."""
        # No fsync of the tree's files: a killed process loses nothing the kernel already holds, only a crash of
        # the whole machine could, and on Colab that takes the local disk (and the cache) with it.
        storage.atomic_write_json(self.marker, {"stamp": stamp, "committed_at": time.time(), "remote": remote})
        storage.remove_file(self.archive)


def fetch_source(
    spec: DatasetSpec, *, cache_dir: Path, console: Console | None = None, sleep: Callable[[float], None] = time.sleep
) -> Path:
    """The local folder holding the dataset's tree (``spec.train`` is relative to it), filled once.

    ``sleep`` is the pause between download retries (tests pass a fake one).
    """
    source = DatasetSource.parse(spec)
    if source.kind == "folder" and not source.on_drive:
        return source.path  # type: ignore[return-value]  # a folder source always has a path
    entry = CacheEntry(DatasetCachePaths.of(cache_dir, source.key).folder)
    storage.make_dirs(entry.folder)
    try:
        with FileLock(entry.lock):
            return _fill(source, entry, console, sleep)
    except DatasetError as error:
        raise DatasetError(f"{error} (the local copy: {entry.folder})") from None


def _fill(source: DatasetSource, entry: CacheEntry, console: Console | None, sleep: Callable[[float], None]) -> Path:
    stamp = source.stamp()
    ready = entry.is_ready(stamp)
    if ready and _still_current(source, entry, console):
        _say(console, f"dataset: using the cached copy of {source.text} ({entry.data})")
        return entry.data
    fetched = None
    if ready and (fetched := _fetched_again(source, entry, console, sleep)) is None:  # the server's file changed
        return entry.data
    entry.clear(keep_archive=source.kind == "url")
    remote = None
    if source.kind == "folder":
        _copy_folder(source, entry, console)
    else:
        archive, remote = _stage(source, entry, console, sleep, fetched)
        _unpack(source, archive, entry, console)
    entry.commit(stamp, remote)
    return entry.data


def _still_current(source: DatasetSource, entry: CacheEntry, console: Console | None) -> bool:
    """Whether a cached copy of a URL is still the file the server has (always, for other sources and for a URL
    pinned by ``dataset.sha256``). A server that cannot be asked leaves the copy in use, said in a line."""
    if source.kind != "url" or source.sha256 is not None:
        return True
    current, problem = probe(source.text)
    if current is None:
        _say(console, f"dataset: could not ask {source.text} whether it changed ({problem}): using the cached copy")
        return True
    cached = (entry.read_marker() or {}).get("remote")
    if same_file(cached, current) is False:
        difference = _difference(cached, current)
        _say(console, f"dataset: {source.text} has changed since it was cached ({difference}): fetching it again")
        return False
    return True


def _fetched_again(
    source: DatasetSource, entry: CacheEntry, console: Console | None, sleep: Callable[[float], None]
) -> Identity | None:
    """Download the changed file, keeping the copy in use until it is here: its identity, or ``None`` (and a line)
    when the download fails, and the cached copy goes on being used."""
    storage.remove_file(entry.archive)
    try:
        return download(source.text, entry.archive, console=console, sleep=sleep)
    except DatasetError as error:
        _say(console, f"dataset: could not fetch the changed file ({error}): using the cached copy")
        return None


def _difference(cached: Identity, current: Identity) -> str:
    for key, label in (("etag", "ETag"), ("last_modified", "Last-Modified"), ("size", "size")):
        if cached.get(key) is not None and current.get(key) is not None and cached[key] != current[key]:
            return f"{label} {cached[key]} then, {current[key]} now"
    return "another file"


def forget_cached(spec: DatasetSpec, *, cache_dir: Path, console: Console | None = None) -> bool:
    """Remove the cached copy of the dataset's source, so that the next run fetches it again; whether there was one.

    A local folder is read where it is, so there is nothing to forget for it.
    """
    source = DatasetSource.parse(spec)
    if source.kind == "folder" and not source.on_drive:
        return False
    entry = CacheEntry(DatasetCachePaths.of(cache_dir, source.key).folder)
    if not entry.folder.exists():
        return False
    with FileLock(entry.lock):
        entry.clear(keep_archive=False)
    _say(console, f"dataset: forgot the cached copy of {source.text} ({entry.folder}): it is fetched again")
    return True


def _say(console: Console | None, message: str) -> None:
    if console is not None:
        console.print(escape(message))


def _copy_folder(source: DatasetSource, entry: CacheEntry, console: Console | None) -> None:
    _say(console, f"dataset: copying {source.text} from Drive to {entry.data} (once)")
    partial = temp_sibling(entry.data)
    try:
        shutil.copytree(source.path, partial, copy_function=shutil.copyfile)  # type: ignore[arg-type]
    except BaseException as error:
        storage.remove_tree(partial)
        if isinstance(error, OSError):
            raise DatasetError(
                f"copying {source.text} from Drive failed ({_first_problem(error)}): check that Drive is still "
                "mounted, then run again"
            ) from None
        raise
    storage.commit_dir(partial, entry.data)


def _first_problem(error: OSError) -> str:
    """One line for a copy error: ``shutil.Error`` carries a list of (source, target, reason), one per file."""
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        failed, _, reason = error.args[0][0]
        return f"{failed}: {reason}"
    return str(error)


def _stage(
    source: DatasetSource,
    entry: CacheEntry,
    console: Console | None,
    sleep: Callable[[float], None],
    fetched: Identity | None = None,
) -> tuple[Path, Identity | None]:
    """The archive on local disk, checked against ``sha256`` (downloaded, copied off Drive, or where it is), and
    the identity the server gave a downloaded one (``fetched``: it has just been downloaded)."""
    remote = fetched
    if source.kind == "url":
        if fetched is None and entry.archive.exists():  # downloaded by a run killed before it was unpacked
            remote = probe(source.text)[0]
        elif fetched is None:
            remote = download(source.text, entry.archive, console=console, sleep=sleep)
        archive = entry.archive
    elif source.on_drive:
        _say(console, f"dataset: copying {source.text} from Drive to the local cache (once)")
        partial = temp_sibling(entry.archive)
        storage.copy_file(source.path, partial)  # type: ignore[arg-type]
        os.replace(partial, entry.archive)
        archive = entry.archive
    else:
        archive = source.path  # type: ignore[assignment]
    _check_sha256(source, archive, entry)
    return archive, remote


def _check_sha256(source: DatasetSource, archive: Path, entry: CacheEntry) -> None:
    if source.sha256 is None:
        return
    _, actual = storage.file_digest(archive)
    if actual != source.sha256:
        if archive == entry.archive:
            storage.remove_file(archive)  # our copy: the next run fetches it again
        raise DatasetError(
            f"{source.text} has sha256 {actual}, but dataset.sha256 is {source.sha256}: fix dataset.sha256 if the "
            "file is the right one, or dataset.source if it is not"
        )


def _unpack(source: DatasetSource, archive: Path, entry: CacheEntry, console: Console | None) -> None:
    _say(console, f"dataset: unpacking {source.text} into {entry.data} (once)")
    partial = temp_sibling(entry.data)
    try:
        unpack_archive(archive, partial, label=source.text)
    except BaseException as error:
        storage.remove_tree(partial)
        if isinstance(error, DatasetError) and archive == entry.archive:
            storage.remove_file(archive)  # a bad download or copy: fetch it again next time
        raise
    storage.commit_dir(partial, entry.data)
