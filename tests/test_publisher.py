"""The publisher thread on its own: newest-only replacement, fencing inside the thread, and what close and
shutdown leave behind. A real queue, a real claim with its lease, a real checkpoint store; the only thing added is
a gate in the store's fence, so a test can hold an upload in the middle (between manifest and rename) while it
hands over more snapshots."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

from runner import storage
from runner.checkpoints import CheckpointStore, checkpoint_id
from runner.errors import Fenced, StorageError
from runner.history import read_history
from runner.queue import Claim, Queue
from runner.train.snapshots.publisher import Publisher, Snapshot
from runner.training import RunContext
from tests.conftest import make_spec


class Gate:
    """Wraps the claim's real fence; while shut, the publishing thread waits in it (inside a commit)."""

    def __init__(self, claim: Claim) -> None:
        self.claim = claim
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()

    def shut(self) -> None:
        self.open.clear()
        self.entered.clear()

    def __call__(self) -> None:
        self.entered.set()
        assert self.open.wait(timeout=30), "the test never opened the gate"
        self.claim.fence()


@pytest.fixture
def claim(queue: Queue) -> Iterator[Claim]:
    queue.submit(make_spec("job-a"))
    lease = queue.lease("job-a")
    assert lease.try_acquire()
    claim = queue.claim("job-a", lease)
    assert claim is not None
    yield claim
    lease.release()


@pytest.fixture
def gate(claim: Claim) -> Gate:
    return Gate(claim)


def publisher_for(claim: Claim, fence: Callable[[], None], *, retry_pause_s: float = 0.05) -> Publisher:
    """A publisher on the claim's real store, whose fence (called inside each commit) is ``fence``."""
    context = RunContext(
        claim=claim,
        store=CheckpointStore(claim.job, keep=5, fence=fence),
        stop=threading.Event(),
        log=logging.getLogger("test-publisher"),
        console=Console(file=io.StringIO(), width=100),
    )
    return Publisher(context, retry_pause_s=retry_pause_s)


@pytest.fixture
def publisher(claim: Claim, gate: Gate) -> Iterator[Publisher]:
    publisher = publisher_for(claim, gate)
    yield publisher
    publisher.shutdown()


def snapshot(folder: Path, epoch: int, step: int = 0) -> Snapshot:
    local = folder / f"snap-{epoch}-{step}"
    local.mkdir(parents=True)
    (local / "variables.npz").write_bytes(bytes([epoch, step]) * 500)
    history = [{"epoch": index, "loss": 1.0 / (index + 1)} for index in range(epoch)]
    return Snapshot(local, epoch, step, history, {"metrics": history[-1] if history else {}})


def committed_ids(claim: Claim) -> list[str]:
    return [info.id for info in CheckpointStore(claim.job, keep=5).committed()]


def test_a_newer_snapshot_replaces_a_pending_one_and_the_newest_is_published_last(
    publisher: Publisher, gate: Gate, claim: Claim, tmp_path: Path
) -> None:
    first, second, third = (snapshot(tmp_path, epoch) for epoch in (1, 2, 3))
    gate.shut()
    publisher.submit(first)
    assert gate.entered.wait(timeout=30), "the first upload never reached its rename"
    publisher.submit(second)
    publisher.submit(third)  # the second was still pending: it is dropped, its local folder deleted
    assert not second.folder.exists() and third.folder.exists()
    gate.open.set()

    assert publisher.flush(30)

    g = claim.generation
    assert publisher.published == [checkpoint_id(g, 1, 0), checkpoint_id(g, 3, 0)]
    assert committed_ids(claim) == [checkpoint_id(g, 3, 0), checkpoint_id(g, 1, 0)]
    state = claim.job.read_state()
    assert (state.epoch, state.checkpoint) == (3, checkpoint_id(g, 3, 0)), "state.json went back to an older one"
    assert [row["epoch"] for row in read_history(claim.job.paths.history)] == ["0", "1", "2"]
    assert publisher.unpublished() is None
    assert not first.folder.exists() and not third.folder.exists(), "published snapshots stay on local disk"


def test_a_claim_fenced_during_an_upload_publishes_nothing_more_and_keeps_the_snapshot(
    publisher: Publisher, gate: Gate, claim: Claim, tmp_path: Path
) -> None:
    publisher.submit(snapshot(tmp_path, 1))
    assert publisher.flush(30)
    gate.shut()
    fenced = snapshot(tmp_path, 2)
    publisher.submit(fenced)
    assert gate.entered.wait(timeout=30)
    storage.create_exclusive(claim.job.paths.claim_marker(claim.generation + 1))  # another worker claims the job
    gate.open.set()

    with pytest.raises(Fenced):
        publisher.flush(30)
    with pytest.raises(Fenced):
        publisher.submit(snapshot(tmp_path, 3))
    assert committed_ids(claim) == [checkpoint_id(claim.generation, 1, 0)]
    assert [name for name in storage.list_dir(claim.job.paths.checkpoints) if name.startswith(".tmp-")] == []
    assert publisher.unpublished() == fenced and fenced.folder.is_dir(), "the fenced snapshot was not left to keep"


def test_close_publishes_what_is_pending_and_shutdown_publishes_nothing_more(
    publisher: Publisher, gate: Gate, claim: Claim, tmp_path: Path
) -> None:
    gate.shut()
    publisher.submit(snapshot(tmp_path, 1))
    assert gate.entered.wait(timeout=30)
    publisher.submit(pending := snapshot(tmp_path, 2))
    assert not publisher.flush(0.2), "flush returned while an upload was held"
    threading.Timer(0.2, gate.open.set).start()

    assert publisher.close(30)

    assert publisher.published == [checkpoint_id(claim.generation, e, 0) for e in (1, 2)]
    assert not pending.folder.exists()


def test_after_shutdown_the_newest_snapshot_is_left_unpublished_for_the_trainer_to_keep(
    publisher: Publisher, gate: Gate, claim: Claim, tmp_path: Path
) -> None:
    gate.shut()
    publisher.submit(snapshot(tmp_path, 1))
    assert gate.entered.wait(timeout=30)
    publisher.submit(newest := snapshot(tmp_path, 2))
    threading.Timer(0.2, gate.open.set).start()

    publisher.shutdown()  # waits for the held upload, then stops

    assert publisher.published == [checkpoint_id(claim.generation, 1, 0)]
    assert publisher.unpublished() == newest and newest.folder.is_dir()


class Captured:
    """Stands in for a captured snapshot (runner.train.snapshots.snapshot.CapturedSnapshot), so that the test
    knows the bytes: the members the publisher and the trainer use, and a count of local writes."""

    def __init__(self, epoch: int) -> None:
        self.payload: bytes | None = bytes([epoch]) * 1000
        self.local_writes = 0

    @property
    def held(self) -> bool:
        return self.payload is not None

    @property
    def files(self) -> dict:
        payload = self.payload
        assert payload is not None, "a released snapshot was committed"
        return {"variables.npz": lambda handle: handle.write(payload)}

    def release(self) -> None:
        self.payload = None

    def write(self, folder: Path) -> None:
        if self.payload is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "variables.npz").write_bytes(self.payload)
        self.payload = None
        self.local_writes += 1


def in_memory(folder: Path, epoch: int) -> Snapshot:
    history = [{"epoch": index, "loss": 1.0} for index in range(epoch)]
    return Snapshot(folder / f"mem-{epoch}", epoch, 0, history, {"metrics": history[-1]}, captured=Captured(epoch))


def test_a_snapshot_held_in_memory_is_committed_from_memory_and_then_released(
    publisher: Publisher, claim: Claim, tmp_path: Path
) -> None:
    taken = in_memory(tmp_path, 1)

    publisher.submit(taken)
    assert publisher.flush(30)

    assert taken.captured.local_writes == 0 and not taken.folder.exists(), "written to local disk first"
    assert not taken.captured.held, "its variables are still held after the commit"
    newest = CheckpointStore(claim.job, keep=5).committed()[0]
    assert newest.id == checkpoint_id(claim.generation, 1, 0)
    assert (newest.path / "variables.npz").read_bytes() == bytes([1]) * 1000
    assert CheckpointStore(claim.job, keep=5).verify(newest).manifest["files"]["variables.npz"]["size"] == 1000
    assert publisher.unpublished() is None


def test_a_replaced_snapshot_lets_go_of_its_memory(publisher: Publisher, gate: Gate, tmp_path: Path) -> None:
    gate.shut()
    publisher.submit(snapshot(tmp_path, 1))
    assert gate.entered.wait(timeout=30)
    publisher.submit(replaced := in_memory(tmp_path, 2))
    publisher.submit(in_memory(tmp_path, 3))
    gate.open.set()

    assert publisher.flush(30)
    assert not replaced.captured.held


def test_a_snapshot_still_in_memory_at_shutdown_is_handed_to_the_trainer_to_write_and_keep(
    publisher: Publisher, gate: Gate, claim: Claim, tmp_path: Path
) -> None:
    gate.shut()
    publisher.submit(snapshot(tmp_path, 1))
    assert gate.entered.wait(timeout=30)
    publisher.submit(newest := in_memory(tmp_path, 2))  # pending behind the held upload: never published
    threading.Timer(0.2, gate.open.set).start()

    publisher.shutdown()

    assert publisher.published == [checkpoint_id(claim.generation, 1, 0)]
    assert publisher.unpublished() == newest and newest.captured.held
    newest.write()
    assert (newest.folder / "variables.npz").read_bytes() == bytes([2]) * 1000
    assert publisher.unpublished() == newest, "written to local disk, it is still the one to keep"


def test_a_snapshot_that_waits_on_a_failing_job_folder_waits_on_local_disk_then_is_published_from_it(
    claim: Claim, tmp_path: Path
) -> None:
    failures = []

    def fence_failing_once() -> None:
        if not failures:
            failures.append(1)
            raise StorageError("the job folder: Transport endpoint is not connected", transient=True)
        claim.fence()

    publisher = publisher_for(claim, fence_failing_once, retry_pause_s=0.3)
    taken = in_memory(tmp_path, 1)
    try:
        publisher.submit(taken)
        deadline = time.monotonic() + 30
        while not failures or taken.captured.held:  # the failed commit, then the move to local disk
            assert time.monotonic() < deadline, "the waiting snapshot stayed in memory"
            time.sleep(0.01)
        assert taken.captured.local_writes == 1 and (taken.folder / "variables.npz").is_file()

        assert publisher.flush(30)
    finally:
        publisher.shutdown()

    newest = CheckpointStore(claim.job, keep=5).committed()[0]
    assert newest.id == checkpoint_id(claim.generation, 1, 0)
    assert (newest.path / "variables.npz").read_bytes() == bytes([1]) * 1000
    assert not taken.folder.exists(), "the local copy stays after the commit"
