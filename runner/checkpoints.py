"""Committed checkpoints in a job folder, for any framework: a checkpoint is a folder of files plus a manifest.

Commit protocol (each step safe to cut by a kill):

1. copy the files into ``checkpoints/.tmp-<id>-<pid>-<rand>/`` and fsync them;
2. write ``MANIFEST.json`` (name, size, sha256 of each file, progress and metadata) last;
3. check that this worker's claim is still current (fencing), then rename the folder to ``checkpoints/<id>/``;
4. verify the committed copy, and only then prune older checkpoints down to ``keep``.

Restore goes newest first by (generation, epoch, step), copies each candidate to local disk while hashing it,
and takes the first that matches its manifest; every one it passes over is logged as a ``fallback`` event.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from runner import killpoints, storage
from runner.errors import CheckpointCorrupt, DamagedFile, StorageError
from runner.job import Job
from runner.paths import MANIFEST_NAME, is_temp_name

FileWriter = Callable[[BinaryIO], None]
"""Writes one checkpoint file's bytes to an open handle (a file made in memory, not copied from disk)."""

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1

_ID = re.compile(r"^g(\d{6})-e(\d{6})-s(\d{9})$")


def checkpoint_id(generation: int, epoch: int, step: int) -> str:
    """The folder name of a checkpoint: sorts by claim generation, completed epochs, steps into the next epoch."""
    return f"g{generation:06d}-e{epoch:06d}-s{step:09d}"


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: where it is and how far training had come."""

    id: str
    path: Path
    generation: int
    epoch: int
    step: int
    manifest: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def meta(self) -> dict[str, Any]:
        """What the trainer stored beside the files (metrics, elapsed time, ...); empty until read."""
        return self.manifest.get("meta", {})

    @property
    def created_at(self) -> float | None:
        """When the checkpoint was committed (wall clock of the writer)."""
        return self.manifest.get("created_at")


def parse_checkpoint_id(name: str) -> tuple[int, int, int] | None:
    """(generation, epoch, step) from a checkpoint folder name, or ``None`` for anything else."""
    match = _ID.match(name)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


class CheckpointStore:
    """The committed checkpoints of one job."""

    def __init__(
        self,
        job: Job,
        *,
        keep: int,
        fence: Callable[[], None] = lambda: None,
        claim_token: str | None = None,
        clock: Callable[[], float] = time.time,
        fresh_from: int = 0,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep!r}")
        self.job, self.keep, self.fence, self.clock = job, keep, fence, clock
        self.claim_token = claim_token
        """Written into each manifest: a restore skips checkpoints whose claim lost its generation's marker."""
        self.fresh_from = fresh_from
        """Checkpoints of claims before this generation belong to a spec that `runner edit` replaced: never restored."""
        self.fallbacks: list[tuple[str, str]] = []
        """``(checkpoint id, reason)`` of each checkpoint the last :meth:`restore` passed over as damaged."""
        self.folder = job.paths.checkpoints

    def committed(self) -> list[CheckpointInfo]:
        """Committed checkpoints, newest first, from folder names alone (cheap on a slow mount)."""
        found = []
        for name in storage.list_dir(self.folder):
            if (parsed := parse_checkpoint_id(name)) is not None:
                found.append(CheckpointInfo(name, self.folder / name, *parsed))
        return sorted(found, key=lambda info: (info.generation, info.epoch, info.step), reverse=True)

    def newest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint (not verified), or ``None``."""
        committed = self.committed()
        return committed[0] if committed else None

    def commit(
        self,
        source: Path | Mapping[str, FileWriter],
        *,
        generation: int,
        epoch: int,
        step: int,
        meta: dict[str, Any] | None = None,
        claim: str | None = None,
    ) -> CheckpointInfo:
        """Publish ``source`` as a checkpoint; fenced, verified, then older ones pruned.

        ``source``: a folder whose files are copied, or the files' names each with the function that writes its
        bytes (a snapshot held in memory goes into the job folder in one write, with no local copy first).

        ``claim``: the token of the claim that trained it, when not this store's (a kept snapshot of an earlier one).
        """
        ident = checkpoint_id(generation, epoch, step)
        target = self.job.paths.checkpoint(ident)
        storage.make_dirs(self.folder)
        if storage.exists(target):
            # A retried commit whose rename went through before the error was seen.
            return self._verified(CheckpointInfo(ident, target, generation, epoch, step))
        temp = self.job.paths.checkpoint_in_progress(ident)
        try:
            storage.make_dirs(temp)
            files = {}
            for relative, put in _file_sources(source):
                storage.make_dirs((temp / relative).parent)
                size, digest = put(temp / relative)
                files[relative] = {"size": size, "sha256": digest}
            killpoints.reached("commit-copied")
            manifest = {
                "format": MANIFEST_FORMAT,
                "id": ident,
                "generation": generation,
                "epoch": epoch,
                "step": step,
                "created_at": round(self.clock(), 3),
                "files": files,
                "meta": meta or {},
            }
            if claim := claim or self.claim_token:
                manifest["claim"] = claim
            storage.atomic_write_json(temp / MANIFEST_NAME, manifest)
            killpoints.reached("commit-manifest")
            self.fence()
            storage.commit_dir(temp, target)
            killpoints.reached("commit-renamed")
        except BaseException:
            storage.remove_tree(temp)
            raise
        info = self._arrived(CheckpointInfo(ident, target, generation, epoch, step, manifest))
        self.job.events.append("checkpoint", checkpoint=ident, generation=generation, epoch=epoch, step=step)
        self.prune(keep_id=ident)
        return info

    def read_manifest(self, info: CheckpointInfo) -> dict[str, Any]:
        """A checkpoint's manifest; :class:`CheckpointCorrupt` when missing or malformed."""
        try:
            manifest = storage.read_json(info.path / MANIFEST_NAME)
        except DamagedFile as error:
            raise CheckpointCorrupt(info.id, f"manifest unreadable ({error.reason})") from None
        except StorageError as error:
            if error.errno_ == 2:
                raise CheckpointCorrupt(info.id, "no MANIFEST.json") from None
            raise
        if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)):
            raise CheckpointCorrupt(info.id, "manifest has no file list")
        if manifest.get("id") != info.id:
            raise CheckpointCorrupt(info.id, f"manifest belongs to {manifest.get('id')!r}")
        return manifest

    def _arrived(self, info: CheckpointInfo) -> CheckpointInfo:
        """Check that every file of a checkpoint just committed is there at its size: not a second read and hash.

        copy_file hashed the bytes as it wrote them, and on Drive a read right after the write is served from this
        VM's own cache, so reading the copy back would prove nothing more about what reaches Drive. What comes back
        from Drive is hashed where it matters: by :meth:`restore`, before anything is loaded from it."""
        for relative, expected in info.manifest["files"].items():
            size = storage.file_size(info.path / relative)
            if size != expected["size"]:
                found = "missing" if size is None else f"{size} bytes"
                raise CheckpointCorrupt(info.id, f"{relative} is {found} after the commit, {expected['size']} were written")
        return info

    def verify(self, info: CheckpointInfo) -> CheckpointInfo:
        """Check every file against the manifest (size and sha256); return the info with its manifest."""
        return self._verified(info)

    def _verified(self, info: CheckpointInfo, copy_to: Path | None = None) -> CheckpointInfo:
        manifest = self.read_manifest(info)
        for relative, expected in manifest["files"].items():
            source = info.path / relative
            if not storage.is_file(source):
                raise CheckpointCorrupt(info.id, f"{relative} is missing")
            if copy_to is not None:
                storage.make_dirs((copy_to / relative).parent)
                size, digest = storage.copy_file(source, copy_to / relative, durable=False)  # a scratch copy
            else:
                size, digest = storage.file_digest(source)
            if size != expected.get("size"):
                raise CheckpointCorrupt(info.id, f"{relative} has {size} bytes, manifest says {expected.get('size')}")
            if digest != expected.get("sha256"):
                raise CheckpointCorrupt(info.id, f"{relative} does not match its sha256")
        return CheckpointInfo(info.id, info.path, info.generation, info.epoch, info.step, manifest)

    def restore(self, target: Path) -> CheckpointInfo | None:
        """Copy the newest checkpoint that verifies into ``target`` (local disk); ``None`` when none does."""
        self.fallbacks = []
        for info in self.committed():
            if info.generation < self.fresh_from:
                log.warning("checkpoint %s was trained for the spec that replaced it: not restored", info.id)
                continue
            scratch = Path(target) / f".restore-{info.id}"
            storage.remove_tree(scratch)
            storage.make_dirs(scratch)  # a checkpoint may hold no files at all (everything in its meta)
            try:
                restored = self._verified(info, copy_to=scratch)
                self._check_claim(restored)
            except CheckpointCorrupt as error:
                storage.remove_tree(scratch)
                self.job.events.append("fallback", checkpoint=info.id, reason=error.reason)
                log.warning("checkpoint %s does not verify (%s): trying the one before", info.id, error.reason)
                self.fallbacks.append((info.id, error.reason))
                continue
            for child in scratch.iterdir():
                child.rename(Path(target) / child.name)
            scratch.rmdir()
            self._log_stale(restored)
            return restored
        return None

    def _check_claim(self, info: CheckpointInfo) -> None:
        """A checkpoint written by a claim that another VM's claim of the same generation displaced is not on the
        job's line of training: :class:`CheckpointCorrupt` (so restore passes over it and logs why)."""
        written_by = info.manifest.get("claim")
        holder = self.job.claim_token(info.generation) if written_by else None
        if holder is not None and holder != written_by:
            raise CheckpointCorrupt(
                info.id, f"written by a claim of generation {info.generation} that another machine's claim displaced"
            )

    def _log_stale(self, restored: CheckpointInfo) -> None:
        """Log checkpoints of an older claim that are ahead of the one restored: written (or made visible, on a
        lagging mount) after a newer claim had taken over, so not on the job's line of training. Ordering by
        generation already keeps them from being restored; pruning removes them."""
        for info in self.committed():
            if info.generation < restored.generation and (info.epoch, info.step) > (restored.epoch, restored.step):
                self.job.events.append(
                    "stale-checkpoint",
                    checkpoint=info.id,
                    reason=f"generation {info.generation} is older than {restored.generation} but ahead of it",
                )

    def prune(self, *, keep_id: str | None = None) -> list[str]:
        """Delete committed checkpoints beyond the newest ``keep``; never ``keep_id``. Returns what went."""
        return self._remove([info for info in self.committed()[self.keep :] if info.id != keep_id])

    def prune_done(self, keep: int) -> list[str]:
        """Once the job is done (its model in ``final/``): keep only the newest ``keep`` checkpoints, none for 0."""
        if keep < 0:
            raise ValueError(f"keep must be 0 or more, got {keep!r}")
        return self._remove(self.committed()[keep:])

    def _remove(self, doomed: list[CheckpointInfo]) -> list[str]:
        for info in doomed:
            # Leave the committed name first (one atomic rename): a kill while deleting then leaves a temporary
            # folder for collect_garbage, never a half-deleted folder under a committed name.
            temporary = self.job.paths.checkpoint_in_progress(info.id)
            storage.commit_dir(info.path, temporary)
            storage.remove_tree(temporary)
        return [info.id for info in doomed]

    def collect_garbage(self) -> list[str]:
        """Delete temporary folders left by publishers that were cut off. Only the lease holder may call this."""
        removed = [name for name in storage.list_dir(self.folder) if is_temp_name(name)]
        for name in removed:
            path = self.folder / name
            if storage.is_dir(path, follow_symlinks=False):
                storage.remove_tree(path)
            else:
                storage.remove_file(path)
        return removed


def _file_sources(source: Path | Mapping[str, FileWriter]) -> list[tuple[str, Callable[[Path], tuple[int, str]]]]:
    """Each file of a checkpoint's source, by name, with what puts it at a path and returns its size and sha256."""
    if isinstance(source, Mapping):
        return [(name, functools.partial(storage.write_file, produce=put)) for name, put in sorted(source.items())]
    folder = Path(source)
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    return [(path.relative_to(folder).as_posix(), functools.partial(storage.copy_file, path)) for path in paths]
