"""CheckpointStore on a real job folder: commit, order, prune, fencing, restore with fallbacks, and SIGKILLs.

No fakes: checkpoints are real folders, corruption is done to real files, fencing reads the real state.json,
and kills are SIGKILLs of real processes committing real checkpoints.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runner.checkpoints import CheckpointInfo, CheckpointStore, checkpoint_id, parse_checkpoint_id
from runner.errors import CheckpointCorrupt, Fenced
from runner.job import Job
from runner.paths import MANIFEST_NAME, is_temp_name
from runner.queue import Queue
from tests.conftest import REPO, make_spec, runner_env

COMMITTER = REPO / "tests" / "support" / "checkpoint_committer.py"


@pytest.fixture
def job(queue: Queue) -> Job:
    """A freshly submitted job (claim generation 0 on disk)."""
    job, _ = queue.submit(make_spec("job-a"))
    return job


def make_source(folder: Path, seed: int) -> dict[str, bytes]:
    """A local snapshot with nested folders; returns its files by relative name."""
    rng = random.Random(seed)
    files = {
        "weights.bin": rng.randbytes(70_000 + seed),
        "state.json": json.dumps({"seed": seed}).encode(),
        "optimizer/adam.bin": rng.randbytes(30_000),
        "optimizer/slots/dense/m.bin": rng.randbytes(5_000),
        "rng/empty.bin": b"",
    }
    for relative, data in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
    return files


def commit(store: CheckpointStore, tmp_path: Path, generation: int, epoch: int, step: int = 0) -> CheckpointInfo:
    """Commit a fresh snapshot seeded by its position."""
    source = tmp_path / f"snapshot-{generation}-{epoch}-{step}"
    make_source(source, seed=generation * 1000 + epoch * 10 + step)
    return store.commit(source, generation=generation, epoch=epoch, step=step, meta={"epoch": epoch})


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def entries(store: CheckpointStore) -> list[str]:
    return sorted(os.listdir(store.folder))


def events(job: Job, name: str) -> list[dict]:
    return [event for event in job.events.read() if event["event"] == name]


def assert_all_committed_verify(store: CheckpointStore) -> None:
    committed = store.committed()
    for info in committed:
        try:
            store.verify(info)
        except CheckpointCorrupt as error:
            held = len(list(info.path.iterdir())) if info.path.exists() else 0
            pytest.fail(
                f"committed checkpoint does not verify: {error} (its folder holds {held} entries; "
                f"committed, newest first: {[other.id for other in committed]})"
            )


# --- commit ---------------------------------------------------------------------------------------------------


def test_commit_publishes_every_file_with_a_matching_manifest(job: Job, tmp_path: Path) -> None:
    store = CheckpointStore(job, keep=2, clock=lambda: 1234.5)
    source = tmp_path / "snapshot"
    files = make_source(source, seed=1)

    info = store.commit(source, generation=3, epoch=7, step=12, meta={"loss": 0.5})

    ident = checkpoint_id(3, 7, 12)
    assert (info.id, info.path, info.generation, info.epoch, info.step) == (ident, store.folder / ident, 3, 7, 12)
    assert info.meta == {"loss": 0.5}
    assert info.created_at == 1234.5
    assert entries(store) == [ident], "a temporary folder was left behind"
    assert files_under(info.path) == {**files, MANIFEST_NAME: (info.path / MANIFEST_NAME).read_bytes()}
    manifest = json.loads((info.path / MANIFEST_NAME).read_text())
    assert (manifest["id"], manifest["generation"], manifest["epoch"], manifest["step"]) == (ident, 3, 7, 12)
    assert manifest["meta"] == {"loss": 0.5}
    assert manifest["files"] == {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
    }
    [event] = events(job, "checkpoint")
    assert (event["checkpoint"], event["generation"], event["epoch"], event["step"]) == (ident, 3, 7, 12)


def test_committed_is_newest_first_by_generation_then_epoch_then_step(job: Job, tmp_path: Path) -> None:
    store = CheckpointStore(job, keep=10)
    for generation, epoch, step in [(1, 5, 0), (2, 1, 0), (1, 5, 10), (1, 3, 999), (1, 12, 0)]:
        commit(store, tmp_path, generation, epoch, step)
    (store.folder / ".tmp-g000003-e000009-s000000000-1-ab").mkdir()  # in progress: not a checkpoint
    (store.folder / "notes.txt").write_text("not a checkpoint either")

    order = [(info.generation, info.epoch, info.step) for info in store.committed()]

    assert order == [(2, 1, 0), (1, 12, 0), (1, 5, 10), (1, 5, 0), (1, 3, 999)]
    assert store.newest().id == checkpoint_id(2, 1, 0)
    assert parse_checkpoint_id(checkpoint_id(2, 1, 0)) == (2, 1, 0)


def test_commit_of_an_existing_id_returns_the_existing_checkpoint(job: Job, tmp_path: Path) -> None:
    store = CheckpointStore(job, keep=2)
    first_files = make_source(tmp_path / "first", seed=1)
    first = store.commit(tmp_path / "first", generation=1, epoch=2, step=0, meta={"try": 1})
    make_source(tmp_path / "second", seed=2)

    again = store.commit(tmp_path / "second", generation=1, epoch=2, step=0, meta={"try": 2})

    assert again.id == first.id
    assert again.manifest == first.manifest
    assert again.meta == {"try": 1}
    assert entries(store) == [first.id]
    assert {k: v for k, v in files_under(first.path).items() if k != MANIFEST_NAME} == first_files
    store.verify(again)


# --- prune ----------------------------------------------------------------------------------------------------


def test_prune_keeps_the_newest(job: Job, tmp_path: Path) -> None:
    store = CheckpointStore(job, keep=2)
    committed = [commit(store, tmp_path, 1, epoch) for epoch in range(4)]

    assert entries(store) == sorted(info.id for info in committed[-2:])
    assert_all_committed_verify(store)


def test_prune_never_removes_the_checkpoint_just_committed(job: Job, tmp_path: Path) -> None:
    store = CheckpointStore(job, keep=1)
    newer = commit(store, tmp_path, 2, 5)

    older = commit(store, tmp_path, 1, 9)  # e.g. a late publish: older than what is there

    assert older.path.is_dir()
    assert entries(store) == sorted([newer.id, older.id])
    assert store.prune() == [older.id]  # a later prune, with nothing to protect, does remove it
    assert entries(store) == [newer.id]


# --- fencing --------------------------------------------------------------------------------------------------


def test_a_fenced_commit_publishes_nothing(job: Job, tmp_path: Path) -> None:
    # The fence is the real one: it re-reads the claim generation in state.json.
    store = CheckpointStore(job, keep=5, fence=functools.partial(job.check_generation, 0))
    older = [commit(store, tmp_path, 0, epoch) for epoch in range(2)]
    state = job.read_state()
    job.write_state(state.model_copy(update={"generation": 1}), generation=None)  # another worker claimed it

    with pytest.raises(Fenced):
        commit(store, tmp_path, 0, 2)

    assert entries(store) == sorted(info.id for info in older), "the fenced checkpoint or its temp folder stayed"
    assert_all_committed_verify(store)
    assert [event["checkpoint"] for event in events(job, "checkpoint")] == [info.id for info in older]


# --- restore --------------------------------------------------------------------------------------------------


def test_restore_copies_the_newest_checkpoint(job: Job, tmp_path: Path) -> None:
    store = CheckpointStore(job, keep=3)
    commit(store, tmp_path, 1, 1)
    source = tmp_path / "newest"
    files = make_source(source, seed=99)
    store.commit(source, generation=1, epoch=2, step=40, meta={"loss": 0.125, "elapsed": 12.0})
    target = tmp_path / "restored"

    info = store.restore(target)

    assert info is not None
    assert (info.id, info.epoch, info.step) == (checkpoint_id(1, 2, 40), 2, 40)
    assert info.meta == {"loss": 0.125, "elapsed": 12.0}
    assert files_under(target) == files, "restore must copy exactly the checkpoint's files, no scratch left"
    assert events(job, "fallback") == []


def test_restore_of_a_checkpoint_without_files(job: Job, tmp_path: Path) -> None:
    # A trainer may keep all of its state in meta; such a checkpoint must restore like any other.
    store = CheckpointStore(job, keep=2)
    (tmp_path / "empty").mkdir()
    store.commit(tmp_path / "empty", generation=1, epoch=3, step=0, meta={"value": 42})
    target = tmp_path / "restored"
    target.mkdir()

    info = store.restore(target)

    assert info is not None and info.meta == {"value": 42}
    assert os.listdir(target) == []


def truncate(info: CheckpointInfo, previous: CheckpointInfo) -> None:
    path = info.path / "weights.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_bit(info: CheckpointInfo, previous: CheckpointInfo) -> None:
    path = info.path / "optimizer" / "adam.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def delete_a_file(info: CheckpointInfo, previous: CheckpointInfo) -> None:
    (info.path / "optimizer" / "slots" / "dense" / "m.bin").unlink()


def delete_the_manifest(info: CheckpointInfo, previous: CheckpointInfo) -> None:
    (info.path / MANIFEST_NAME).unlink()


def garble_the_manifest(info: CheckpointInfo, previous: CheckpointInfo) -> None:
    (info.path / MANIFEST_NAME).write_bytes(b'{"format": 1, "files": {"weights.bin": {"si\x00\xff')


def manifest_without_a_file_list(info: CheckpointInfo, previous: CheckpointInfo) -> None:
    (info.path / MANIFEST_NAME).write_text(json.dumps(["weights.bin"]))


def another_checkpoints_content(info: CheckpointInfo, previous: CheckpointInfo) -> None:
    # A whole, self-consistent checkpoint under the wrong name (e.g. a folder copied by hand): it must not pass.
    shutil.rmtree(info.path)
    shutil.copytree(previous.path, info.path)


CORRUPTIONS = {
    truncate: "bytes",
    flip_a_bit: "sha256",
    delete_a_file: "missing",
    delete_the_manifest: "manifest",
    garble_the_manifest: "manifest",
    manifest_without_a_file_list: "file list",
    another_checkpoints_content: checkpoint_id(1, 1, 0),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS), ids=lambda corrupt: corrupt.__name__)
def test_restore_falls_back_past_a_damaged_newest_checkpoint(job: Job, tmp_path: Path, corrupt) -> None:
    store = CheckpointStore(job, keep=3)
    commit(store, tmp_path, 1, 0)
    previous = commit(store, tmp_path, 1, 1)
    newest = commit(store, tmp_path, 1, 2)
    expected = files_under(previous.path)
    expected.pop(MANIFEST_NAME)
    corrupt(newest, previous)
    with pytest.raises(CheckpointCorrupt):
        store.verify(newest)
    target = tmp_path / "restored"

    info = store.restore(target)

    assert info is not None and info.id == previous.id
    assert info.meta == {"epoch": 1}
    assert files_under(target) == expected
    [fallback] = events(job, "fallback")
    assert fallback["checkpoint"] == newest.id
    assert CORRUPTIONS[corrupt].lower() in fallback["reason"].lower(), fallback["reason"]


def test_restore_with_every_checkpoint_damaged_returns_none(job: Job, tmp_path: Path) -> None:
    store = CheckpointStore(job, keep=3)
    damaged = [commit(store, tmp_path, 1, epoch) for epoch in range(3)]
    truncate(damaged[0], damaged[0])
    delete_the_manifest(damaged[1], damaged[1])
    flip_a_bit(damaged[2], damaged[2])
    target = tmp_path / "restored"
    target.mkdir()

    assert store.restore(target) is None

    assert [event["checkpoint"] for event in events(job, "fallback")] == [info.id for info in reversed(damaged)]
    assert os.listdir(target) == [], "a failed restore left files behind"


# --- garbage --------------------------------------------------------------------------------------------------


def test_collect_garbage_removes_temp_folders_only(job: Job, tmp_path: Path) -> None:
    store = CheckpointStore(job, keep=2)
    kept = commit(store, tmp_path, 1, 1)
    abandoned = [job.paths.checkpoint_in_progress(checkpoint_id(1, epoch, 0)) for epoch in (2, 3)]
    (abandoned[0] / "optimizer").mkdir(parents=True)
    (abandoned[0] / "optimizer" / "adam.bin").write_bytes(b"half")
    abandoned[1].mkdir()

    removed = store.collect_garbage()

    assert sorted(removed) == sorted(folder.name for folder in abandoned)
    assert entries(store) == [kept.id]
    store.verify(kept)


def test_collect_garbage_is_not_stopped_by_a_stray_temp_file(job: Job, tmp_path: Path) -> None:
    # ``.tmp-`` names a temporary file or folder (paths.is_temp_name); a stray file there (a sync tool's, or a
    # file write cut short) must not make the cleanup, and so every claim of the job, fail.
    store = CheckpointStore(job, keep=2)
    kept = commit(store, tmp_path, 1, 1)
    stray = store.folder / ".tmp-MANIFEST.json-123-abcd"
    stray.write_text("{")

    store.collect_garbage()

    assert entries(store) == [kept.id]


# --- SIGKILL in the middle of commits --------------------------------------------------------------------------


def start_committer(job: Job, scratch: Path, keep: int = 2) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(
        [sys.executable, str(COMMITTER), str(job.paths.folder), str(scratch), str(keep)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=runner_env(),
        cwd=REPO,
    )
    assert child.stdout is not None
    ready = child.stdout.readline()
    if ready != b"ready\n":
        _, stderr = child.communicate()
        pytest.fail(f"committer did not start: {ready!r}\n{stderr.decode()}")
    return child


@pytest.mark.slow
def test_commits_killed_at_random_leave_only_checkpoints_that_verify(job: Job, tmp_path: Path) -> None:
    rng = random.Random(1979)
    for kill in range(10):
        child = start_committer(job, tmp_path / "scratch")
        try:
            child.wait(timeout=rng.uniform(0.0, 0.25))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate()
        assert child.returncode == -signal.SIGKILL, f"committer died by itself:\n{stderr.decode()}"

        store = CheckpointStore(job, keep=2)
        assert_all_committed_verify(store)
        target = tmp_path / f"restored-{kill}"
        restored = store.restore(target)
        newest = store.newest()
        if newest is None:
            assert restored is None
            continue
        assert restored is not None and restored.id == newest.id
        assert json.loads((target / "state.json").read_text()) == {"epoch": restored.epoch}
        assert restored.meta == {"epoch": restored.epoch}

    store = CheckpointStore(job, keep=2)
    assert store.newest() is not None and store.newest().epoch >= 3, "too few commits for the kills to mean much"
    assert events(job, "fallback") == []
    store.collect_garbage()
    assert not [name for name in entries(store) if is_temp_name(name)]
    assert_all_committed_verify(store)


def write_committed_by_hand(store: CheckpointStore, ident: str, count: int) -> CheckpointInfo:
    """A valid committed checkpoint of ``count`` small files, written without fsync (fast)."""
    folder = store.folder / ident
    folder.mkdir(parents=True)
    files = {}
    for index in range(count):
        data = f"shard {index}\n".encode()
        (folder / f"shard-{index:05d}.bin").write_bytes(data)
        files[f"shard-{index:05d}.bin"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    generation, epoch, step = parse_checkpoint_id(ident)
    manifest = {"format": 1, "id": ident, "generation": generation, "epoch": epoch, "step": step, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return store.verify(CheckpointInfo(ident, folder, generation, epoch, step))


@pytest.mark.slow
def test_a_kill_while_pruning_never_leaves_a_partial_committed_checkpoint(job: Job, tmp_path: Path) -> None:
    # Pruning deletes a whole checkpoint folder; a kill in the middle must not leave a half-deleted folder under
    # a committed name (it would then be listed, and fail to verify). Many files make the deletion take a while.
    store = CheckpointStore(job, keep=1)
    old = write_committed_by_hand(store, checkpoint_id(1, 1, 0), count=4000)
    source = tmp_path / "snapshot"
    make_source(source, seed=5)
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from runner import CheckpointStore, Job\n"
        "from runner.paths import JobPaths\n"
        "store = CheckpointStore(Job(JobPaths(Path(sys.argv[1]))), keep=1)\n"
        "store.commit(Path(sys.argv[2]), generation=1, epoch=2, step=0)  # prunes the old one\n"
        "time.sleep(60)  # killed before this ends\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(job.paths.folder), str(source)], env=runner_env(), cwd=REPO
    )
    try:
        while child.poll() is None:  # kill as soon as the old checkpoint starts to go
            try:
                if len(os.listdir(old.path)) < 4001:
                    break
            except FileNotFoundError:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL

    store = CheckpointStore(job, keep=1)
    assert_all_committed_verify(store)
    store.collect_garbage()
    assert [info.id for info in store.committed()] in ([checkpoint_id(1, 2, 0)], [checkpoint_id(1, 2, 0), old.id])
    assert store.restore(tmp_path / "restored").id == checkpoint_id(1, 2, 0)


def test_a_late_checkpoint_of_an_older_claim_is_never_restored_and_is_logged(job: Job, tmp_path: Path) -> None:
    store = CheckpointStore(job, keep=5)
    commit(store, tmp_path, generation=1, epoch=3)
    taken_over = commit(store, tmp_path, generation=2, epoch=4)
    # Generation 1's epoch-5 checkpoint shows up late (a lagging mount, a writer that slipped past its fence).
    late = commit(store, tmp_path, generation=1, epoch=5)

    restored = store.restore(tmp_path / "restore")

    assert restored is not None and restored.id == taken_over.id
    stale = events(job, "stale-checkpoint")
    assert [event["checkpoint"] for event in stale] == [late.id]
    assert "older than 2" in stale[0]["reason"]


@pytest.mark.parametrize("held_in", ["a local folder", "memory"])
def test_every_file_of_a_checkpoint_is_made_durable_before_the_rename_that_commits_it(
    job: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held_in: str
) -> None:
    """The order of the real fsync(2) and rename(2) calls, watched on their way through: a checkpoint renamed into
    place before its bytes are durable could come back after a power cut as a committed name over empty files."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(source, target, *args, **kwargs) -> None:  # noqa: ANN001
        calls.append(("rename", f"{os.fspath(source)} -> {os.fspath(target)}"))
        real_rename(source, target, *args, **kwargs)

    def replace(source, target, *args, **kwargs) -> None:  # noqa: ANN001  (an atomic write's last step)
        calls.append(("replace", f"{os.fspath(source)} -> {os.fspath(target)}"))
        real_replace(source, target, *args, **kwargs)

    source: Path | dict = tmp_path / "snapshot"
    files = make_source(source, seed=1)
    if held_in == "memory":  # a snapshot the trainer captured: written straight into the job folder
        source = {name: (lambda data: lambda handle: handle.write(data))(data) for name, data in files.items()}
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    info = CheckpointStore(job, keep=2).commit(source, generation=1, epoch=1, step=0)
    monkeypatch.undo()

    commits = [i for i, (kind, what) in enumerate(calls) if kind == "rename" and what.endswith(f"-> {info.path}")]
    (commit_index,) = commits
    temp = calls[commit_index][1].split(" -> ")[0]
    synced_before: set[str] = set()
    for kind, what in calls[:commit_index]:
        if kind == "fsync":
            synced_before.add(what)
        elif kind == "replace" and (moved := what.split(" -> "))[0] in synced_before:
            synced_before.add(moved[1])  # written and fsynced under a temporary name, then renamed over
    for relative in [*files, MANIFEST_NAME]:
        assert f"{temp}/{relative}" in synced_before, f"{relative} was not fsynced before the commit"
    assert temp in synced_before, "the temporary folder's entries were not made durable before the commit"
    assert ("fsync", str(info.path.parent)) in calls[commit_index:], "the commit's rename was not made durable"
