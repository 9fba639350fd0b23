"""A snapshot that could not be published, kept on this machine's disk until the job's next claim here publishes it.

When the last publish of a claim cannot finish (the job folder failing past the flush timeout, the lease lost),
the trainer keeps its newest unpublished snapshot in the local cache, noting the claim that trained it and how
far. The next claim of the job on this machine commits it before restoring, so that the work is not lost and
the job is not marked done without it. That happens only if no newer claim has committed since: a checkpoint of a
newer generation means that another worker took the job over and trained on from an older point, and the kept
snapshot is off the job's line of training. This is the rule that fences a stale writer, applied late.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import storage
from runner.checkpoints import CheckpointInfo, CheckpointStore, checkpoint_id
from runner.errors import DamagedFile, StorageError
from runner.job import Job
from runner.paths import KeptSnapshotPaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeptSnapshot:
    """A snapshot kept on local disk: its files and the claim and position it was taken at."""

    files: Path
    job_folder: str
    generation: int
    claim_token: str | None
    """The token of the claim that trained it, written into its manifest as that claim's own commits were."""
    epoch: int
    step: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The checkpoint id it gets when published: its own claim's, so it sorts where that claim left off."""
        return checkpoint_id(self.generation, self.epoch, self.step)


def keep_snapshot(
    folder: Path,
    *,
    cache_dir: Path,
    job: Job,
    generation: int,
    claim_token: str | None,
    epoch: int,
    step: int,
    meta: dict[str, Any],
) -> KeptSnapshot:
    """Move the snapshot in ``folder`` (local disk) into the job's kept place, replacing an older kept one."""
    paths = KeptSnapshotPaths.of(cache_dir, job.paths.folder)
    temp = paths.in_progress
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    os.replace(folder, temp / paths.files.name)
    note = {
        "job_folder": str(job.paths.folder.absolute()),
        "generation": generation,
        "claim_token": claim_token,
        "epoch": epoch,
        "step": step,
        "meta": meta,
    }
    storage.atomic_write_json(temp / paths.note.name, note)  # last: without it the folder is not a kept snapshot
    shutil.rmtree(paths.folder, ignore_errors=True)
    os.replace(temp, paths.folder)
    return _read(paths)  # type: ignore[return-value]


def find_kept(cache_dir: Path, job: Job) -> KeptSnapshot | None:
    """The job's kept snapshot on this machine, or ``None``."""
    return _read(KeptSnapshotPaths.of(cache_dir, job.paths.folder))


def _read(paths: KeptSnapshotPaths) -> KeptSnapshot | None:
    try:
        note = storage.read_json(paths.note)
        return KeptSnapshot(
            files=paths.files,
            job_folder=note["job_folder"],
            generation=int(note["generation"]),
            claim_token=note.get("claim_token"),
            epoch=int(note["epoch"]),
            step=int(note["step"]),
            meta=dict(note.get("meta") or {}),
        )
    except StorageError as error:
        if error.errno_ == 2:
            return None
        raise
    except (DamagedFile, KeyError, TypeError, ValueError) as error:
        log.warning("ignoring a damaged kept snapshot in %s: %s", paths.folder, error)
        return None


def discard_kept(cache_dir: Path, job: Job) -> None:
    """Delete the job's kept snapshot on this machine, if any."""
    shutil.rmtree(KeptSnapshotPaths.of(cache_dir, job.paths.folder).folder, ignore_errors=True)


def _not_this_jobs(job: Job, kept: KeptSnapshot) -> str | None:
    """Why the kept snapshot belongs to another spec or another job of this name; ``None`` when it is this one's.

    A job deleted and submitted again has the same folder, so the folder alone does not tell: the claim marker of the
    generation that kept it must still name that claim. And a spec replaced with another model or data starts again
    from the generation of the replacement.
    """
    if kept.claim_token is not None:
        marker = job.claim_token(kept.generation) if storage.exists(job.paths.claim_marker(kept.generation)) else ""
        if marker is not None and marker != kept.claim_token:  # None: unreadable for now, which proves nothing
            return f"claim {kept.generation} that kept it is not from this job (it was deleted and submitted again)"
    fresh_from = job.read_state().fresh_from
    if kept.generation < fresh_from:
        return (
            f"the spec was replaced with another model or data at claim {fresh_from}, "
            f"after claim {kept.generation} kept it"
        )
    return None


def publish_kept(cache_dir: Path, store: CheckpointStore) -> CheckpointInfo | None:
    """Commit the job's kept snapshot, unless a newer claim has committed since; the checkpoint, or ``None``.

    Call it with the job's lease held, before restoring: the restore then takes the kept snapshot when it is the
    newest. Either way the kept copy is gone afterwards, and an event says what became of it.
    """
    job = store.job
    kept = find_kept(cache_dir, job)
    if kept is None:
        return None
    committed = store.committed()
    newer = [info for info in committed if info.generation > kept.generation]
    reason = _not_this_jobs(job, kept)
    if reason is None and newer:
        reason = f"claim {newer[0].generation} has committed {newer[0].id} since claim {kept.generation} kept it"
    if reason:
        job.events.append("kept-snapshot-dropped", checkpoint=kept.id, reason=reason)
        log.warning("dropping the snapshot kept on this machine (%s): %s", kept.id, reason)
        discard_kept(cache_dir, job)
        return None
    if any(info.id == kept.id for info in committed):  # its publish went through after all
        discard_kept(cache_dir, job)
        return None
    info = store.commit(
        kept.files, generation=kept.generation, epoch=kept.epoch, step=kept.step, meta=kept.meta, claim=kept.claim_token
    )
    job.events.append("kept-snapshot-published", checkpoint=info.id)
    log.info("published the checkpoint kept on this machine: %s", info.id)
    discard_kept(cache_dir, job)
    return info
