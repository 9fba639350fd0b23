"""A snapshot kept on local disk after its publish failed: published by the next claim here, unless a newer claim
has committed since. Real job folders, real checkpoint stores, real files; no TensorFlow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner import storage
from runner.checkpoints import CheckpointStore
from runner.job import Job
from runner.kept import find_kept, keep_snapshot, publish_kept
from runner.paths import KeptSnapshotPaths
from runner.queue import Queue
from tests.conftest import make_spec


@pytest.fixture
def job(queue: Queue) -> Job:
    job, _ = queue.submit(make_spec("job-a"))
    return job


def snapshot(folder: Path, value: bytes) -> Path:
    (folder / "nested").mkdir(parents=True)
    (folder / "variables.npz").write_bytes(value * 1000)
    (folder / "nested" / "state.json").write_text(json.dumps({"value": value.decode()}))
    return folder


def kept_of(job: Job, cache: Path, tmp_path: Path, *, generation: int, epoch: int, step: int = 0) -> None:
    folder = snapshot(tmp_path / f"snap-{generation}-{epoch}-{step}", b"k")
    meta = {"metrics": {"epoch": epoch - 1, "loss": 0.5}}
    keep_snapshot(
        folder, cache_dir=cache, job=job, generation=generation, claim_token=None, epoch=epoch, step=step, meta=meta
    )
    assert not folder.exists(), "the snapshot was copied, not moved"


def event_kinds(job: Job) -> list[str]:
    return [event["event"] for event in job.events.read()]


def test_a_kept_snapshot_with_no_newer_commit_is_published_under_its_own_claim(job: Job, tmp_path: Path) -> None:
    cache, store = tmp_path / "cache", CheckpointStore(job, keep=3)
    store.commit(snapshot(tmp_path / "older", b"o"), generation=1, epoch=3, step=0)
    kept_of(job, cache, tmp_path, generation=1, epoch=4)
    # A newer claim that never committed (killed before its first checkpoint) does not stand in the way.
    assert storage.make_dirs(job.paths.claims) is None and storage.create_exclusive(job.paths.claim_marker(2))

    info = publish_kept(cache, store)

    assert info is not None and info.id == "g000001-e000004-s000000000"
    assert [c.id for c in store.committed()][0] == info.id
    store.verify(info)
    assert (info.path / "nested" / "state.json").read_text() == json.dumps({"value": "k"})
    assert info.meta == {"metrics": {"epoch": 3, "loss": 0.5}}
    assert "kept-snapshot-published" in event_kinds(job)
    assert find_kept(cache, job) is None
    assert not KeptSnapshotPaths.of(cache, job.paths.folder).folder.exists()
    restored = store.restore(tmp_path / "restore")
    assert restored is not None and restored.id == info.id


def test_a_kept_snapshot_is_dropped_when_a_newer_claim_has_committed_since(job: Job, tmp_path: Path) -> None:
    cache, store = tmp_path / "cache", CheckpointStore(job, keep=3)
    store.commit(snapshot(tmp_path / "older", b"o"), generation=1, epoch=3, step=0)
    kept_of(job, cache, tmp_path, generation=1, epoch=5)
    newer = store.commit(snapshot(tmp_path / "newer", b"n"), generation=2, epoch=3, step=4)

    assert publish_kept(cache, store) is None

    assert [c.id for c in store.committed()] == [newer.id, "g000001-e000003-s000000000"]
    (dropped,) = [e for e in job.events.read() if e["event"] == "kept-snapshot-dropped"]
    assert dropped["checkpoint"] == "g000001-e000005-s000000000" and "claim 2 has committed" in dropped["reason"]
    assert find_kept(cache, job) is None


def test_a_kept_snapshot_whose_publish_went_through_after_all_is_discarded(job: Job, tmp_path: Path) -> None:
    cache, store = tmp_path / "cache", CheckpointStore(job, keep=3)
    committed = store.commit(snapshot(tmp_path / "done", b"k"), generation=1, epoch=4, step=0)
    kept_of(job, cache, tmp_path, generation=1, epoch=4)

    assert publish_kept(cache, store) is None
    assert [c.id for c in store.committed()] == [committed.id]
    assert find_kept(cache, job) is None
    assert "kept-snapshot-published" not in event_kinds(job)


def test_a_newer_kept_snapshot_replaces_the_older_and_a_damaged_note_is_ignored(job: Job, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    kept_of(job, cache, tmp_path, generation=1, epoch=2)
    kept_of(job, cache, tmp_path, generation=1, epoch=2, step=3)
    kept = find_kept(cache, job)
    assert kept is not None and (kept.epoch, kept.step) == (2, 3)
    KeptSnapshotPaths.of(cache, job.paths.folder).note.write_text("{ not json")
    assert find_kept(cache, job) is None
    assert publish_kept(cache, CheckpointStore(job, keep=3)) is None


def test_two_queues_with_a_job_of_the_same_name_keep_apart(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, _ = Queue(tmp_path / "q1").submit(make_spec("job-a"))
    second, _ = Queue(tmp_path / "q2").submit(make_spec("job-a"))
    kept_of(first, cache, tmp_path, generation=1, epoch=2)
    assert find_kept(cache, second) is None
    assert find_kept(cache, first) is not None
