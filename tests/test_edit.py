"""Fixing a job: `runner edit` / `submit --replace` and `runner delete`, with real processes and real folders."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner.edit import delete_job, replace_spec, shapes_checkpoints, spec_changes
from runner.errors import Fenced, RunnerError
from runner.job import JobStatus
from runner.kept import find_kept, keep_snapshot, publish_kept
from runner.queue import Queue
from runner.recovery import rebuild_state
from runner.worker import Worker
from tests.conftest import REPO, make_spec, make_spec_dict, run_cli, runner_env, start_cli
from tests.support.counting_trainer import CountingTrainer, expected_value, weights_bytes
from tests.support.worker_helpers import (
    events,
    quiet_console,
    reaped,
    result_value,
    state,
    status_json,
    store,
    verified_checkpoints,
    wait_until,
)

FAILING = {"model": {"params": {"steps": 4, "fail_at_epoch": 1}}}
PARKED = {"model": {"params": {"steps": 5, "step_seconds": 0.05, "park_at_epoch": 1}}, "training": {"epochs": 3}}


def spec_file(folder: Path, name: str, **sections: object) -> Path:
    path = folder / f"{name}-{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(make_spec_dict(name, **sections)))
    return path


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr
    return " ".join(" ".join(lines).split())


def failed_job(queue: Queue, tmp_path: Path) -> str:
    """A job that failed in its epoch 1, after the checkpoint of epoch 1."""
    assert run_cli("submit", "--queue", str(queue.root), str(spec_file(tmp_path, "broken", **FAILING))).returncode == 0
    assert run_cli("work", "--queue", str(queue.root)).returncode == 1
    assert state(queue, "broken").status is JobStatus.FAILED
    assert [info.epoch for info in verified_checkpoints(queue, "broken")] == [1]
    return "broken"


def cancelled_job(queue: Queue, tmp_path: Path, name: str = "parked") -> str:
    """A job cancelled while it trained: its checkpoint is at epoch 1, step 1."""
    assert run_cli("submit", "--queue", str(queue.root), str(spec_file(tmp_path, name, **PARKED))).returncode == 0
    with reaped(start_cli("work", "--queue", str(queue.root))) as process:
        wait_until(lambda: state(queue, name).checkpoint, "a first checkpoint")
        assert run_cli("cancel", name, "--queue", str(queue.root)).returncode == 0
        process.wait(timeout=60)
    assert state(queue, name).status is JobStatus.CANCELLED
    return name


# --- which changes keep the checkpoints -------------------------------------------------------------------------


def test_spec_changes_name_each_changed_field_and_only_the_shaping_ones_discard() -> None:
    old = make_spec("a", training={"epochs": 3, "learning_rate": 0.001})
    new = make_spec("a", training={"epochs": 5, "learning_rate": 0.0005}, dataset={"source": "/data/other"})

    changed = spec_changes(old, new)

    assert changed == ["dataset.source", "training.epochs", "training.learning_rate"]
    assert [field for field in changed if shapes_checkpoints(field)] == ["dataset.source"]
    assert spec_changes(old, old) == []
    for field in ("model.params.steps", "dataset.image_size", "dataset.batch_size", "training.optimizer",
                  "training.seed", "training.mixed_precision", "training.metrics", "training.loss"):
        assert shapes_checkpoints(field), field
    for field in ("training.epochs", "training.learning_rate", "checkpoint.keep", "export.formats", "priority",
                  "training.steps_per_execution", "training.jit_compile", "training.deterministic"):
        assert not shapes_checkpoints(field), field


# --- edit -------------------------------------------------------------------------------------------------------


def test_edit_of_a_cancelled_job_that_keeps_model_and_data_trains_on_from_its_checkpoint(
    queue: Queue, tmp_path: Path
) -> None:
    name = cancelled_job(queue, tmp_path)
    before = state(queue, name)
    checkpoints = [info.id for info in verified_checkpoints(queue, name)]
    longer = spec_file(tmp_path, name, model=PARKED["model"], training={"epochs": 5, "learning_rate": 0.0005})

    edited = run_cli("edit", name, str(longer), "--queue", str(queue.root))

    assert edited.returncode == 0, edited.stderr
    said = one_line(edited.stderr)
    assert f"replaced the spec of job {name!r} (training.epochs, training.learning_rate)" in said
    assert f"trains on from checkpoint {before.checkpoint}" in said
    after = state(queue, name)
    assert after.status is JobStatus.QUEUED and after.checkpoint == before.checkpoint
    assert after.generation == before.generation + 1  # the replacement's own generation fences older claims
    assert queue.job(name).paths.claim_marker(after.generation).read_text().startswith("replaced ")
    assert [info.id for info in verified_checkpoints(queue, name)] == checkpoints
    (replaced,) = events(queue, name, "replaced")
    assert replaced["discarded_because"] == [] and replaced["previous"] == "cancelled"
    assert queue.job(name).read_spec().training.epochs == 5

    done = run_cli("work", "--queue", str(queue.root))

    assert done.returncode == 0, done.stderr
    assert [event["checkpoint"] for event in events(queue, name, "resumed")] == [before.checkpoint]
    assert state(queue, name).status is JobStatus.DONE
    assert result_value(queue, name) == expected_value(5, 5)  # as if it had been asked for 5 epochs from the start


def test_edit_that_changes_the_model_discards_the_checkpoints_and_trains_from_the_beginning(
    queue: Queue, tmp_path: Path
) -> None:
    name = failed_job(queue, tmp_path)
    before = state(queue, name)
    fixed = spec_file(tmp_path, name, model={"params": {"steps": 4}})

    edited = run_cli("edit", name, str(fixed), "--queue", str(queue.root))

    assert edited.returncode == 0, edited.stderr
    said = one_line(edited.stderr)
    assert "its checkpoints were discarded because model.params.fail_at_epoch changed" in said
    assert "trains from the beginning" in said
    after = state(queue, name)
    assert after.status is JobStatus.QUEUED
    assert (after.checkpoint, after.epoch, after.error, after.metrics) == (None, 0, None, {})
    assert after.generation == after.fresh_from == before.generation + 1
    assert after.submitted_at == before.submitted_at  # it keeps its place in the queue
    paths = queue.job(name).paths
    assert not paths.checkpoints.exists() and not paths.history.exists() and not paths.tensorboard.exists()
    assert [entry for entry in os.listdir(paths.folder) if entry.startswith(".tmp-")] == []
    row = status_json(queue, run_cli)[name]
    assert (row["state"], row["checkpoint"], row["error"]) == ("queued", None, None)

    done = run_cli("work", "--queue", str(queue.root))

    assert done.returncode == 0, done.stderr
    assert state(queue, name).status is JobStatus.DONE
    assert events(queue, name, "resumed") == []
    assert result_value(queue, name) == expected_value(3, 4)
    assert all(info.generation > before.generation for info in verified_checkpoints(queue, name))


def test_submit_replace_replaces_an_existing_job_and_submits_a_new_one(queue: Queue, tmp_path: Path) -> None:
    name = failed_job(queue, tmp_path)
    fixed, new = spec_file(tmp_path, name), spec_file(tmp_path, "another")

    plain = run_cli("submit", "--queue", str(queue.root), str(fixed))
    assert plain.returncode == 2
    assert "`runner submit --replace`" in one_line(plain.stderr)

    replaced = run_cli("submit", "--replace", "--queue", str(queue.root), str(fixed), str(new))

    assert replaced.returncode == 0, replaced.stderr
    said = one_line(replaced.stderr)
    assert f"replaced the spec of job {name!r}" in said and "submitted another" in said
    assert state(queue, name).status is JobStatus.QUEUED
    assert state(queue, "another").status is JobStatus.QUEUED


def test_a_checkpoint_of_the_old_spec_committed_late_by_a_stale_worker_is_never_restored(
    queue: Queue, tmp_path: Path
) -> None:
    name = failed_job(queue, tmp_path)
    old = state(queue, name).generation
    replace_spec(queue, make_spec(name, model={"params": {"steps": 4}}))
    # A worker of the old claim that passed its fence before the replacement, its commit landing after it.
    folder = tmp_path / "late"
    folder.mkdir()
    (folder / "state.json").write_text('{"epoch": 2, "step": 0, "value": 1}')
    (folder / "weights.bin").write_bytes(weights_bytes(1))
    late = store(queue, name).commit(folder, generation=old, epoch=2, step=0, meta={})

    done = run_cli("work", "--queue", str(queue.root))

    assert done.returncode == 0, done.stderr
    assert events(queue, name, "resumed") == []  # it started from the beginning, not from the late checkpoint
    assert result_value(queue, name) == expected_value(3, 4)
    assert late.id not in [event.get("checkpoint") for event in events(queue, name)][-3:]


def test_a_replacement_removes_what_a_killed_replacement_left_aside(queue: Queue, tmp_path: Path) -> None:
    name = failed_job(queue, tmp_path)
    left = queue.job(name).paths.folder / ".tmp-checkpoints-1234-abcd"
    (left / "g000001-e000001-s000000000").mkdir(parents=True)

    replace_spec(queue, make_spec(name, model={"params": {"steps": 4}}))

    assert not left.exists()
    assert [entry for entry in os.listdir(queue.job(name).paths.folder) if entry.startswith(".tmp-")] == []


def test_a_damaged_state_after_a_replacement_is_rebuilt_queued_from_the_replacement(
    queue: Queue, tmp_path: Path
) -> None:
    name = failed_job(queue, tmp_path)
    replace_spec(queue, make_spec(name, model={"params": {"steps": 4}}))
    replaced = state(queue, name)
    queue.job(name).paths.state.write_bytes(b"\x00 not json")

    rebuilt = rebuild_state(queue.job(name))

    assert rebuilt.status is JobStatus.QUEUED and rebuilt.error is None
    assert rebuilt.fresh_from == replaced.fresh_from and rebuilt.checkpoint is None


def test_edit_with_the_same_spec_changes_nothing_and_points_at_retry(queue: Queue, tmp_path: Path) -> None:
    name = failed_job(queue, tmp_path)
    same = spec_file(tmp_path, name, **FAILING)
    before = state(queue, name)

    edited = run_cli("edit", name, str(same), "--queue", str(queue.root))

    assert edited.returncode == 0, edited.stderr
    assert f"`runner retry {name}` queues it again" in one_line(edited.stderr)
    assert state(queue, name) == before
    assert events(queue, name, "replaced") == []


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("done", 1, "a finished job is never trained again: submit the spec under a new name"),
        ("other-name", 2, "names job 'other', not 'job-a'"),
        ("missing", 2, "no job named 'nope'"),
        ("bad-spec", 2, "training.epochs"),
    ],
)
def test_edit_refusals_are_one_line_and_change_nothing(
    queue: Queue, tmp_path: Path, case: str, code: int, message: str
) -> None:
    assert run_cli("submit", "--queue", str(queue.root), str(spec_file(tmp_path, "job-a"))).returncode == 0
    assert run_cli("work", "--queue", str(queue.root)).returncode == 0
    before = (queue.job("job-a").paths.spec.read_bytes(), state(queue, "job-a"))
    target, spec = {
        "done": ("job-a", spec_file(tmp_path, "job-a", training={"epochs": 9})),
        "other-name": ("job-a", spec_file(tmp_path, "other")),
        "missing": ("nope", spec_file(tmp_path, "nope")),
        "bad-spec": ("job-a", spec_file(tmp_path, "job-a", training={"epochs": -1})),
    }[case]

    edited = run_cli("edit", target, str(spec), "--queue", str(queue.root))

    assert edited.returncode == code, edited.stderr
    assert message in one_line(edited.stderr)
    assert edited.stderr.strip().startswith("error:")
    assert (queue.job("job-a").paths.spec.read_bytes(), state(queue, "job-a")) == before


def test_edit_and_delete_of_a_job_a_live_worker_runs_are_refused(queue: Queue, tmp_path: Path) -> None:
    name = "running"
    assert run_cli("submit", "--queue", str(queue.root), str(spec_file(tmp_path, name, **PARKED))).returncode == 0
    with reaped(start_cli("work", "--queue", str(queue.root))) as process:
        wait_until(lambda: state(queue, name).checkpoint, "a first checkpoint")
        spec_before = queue.job(name).paths.spec.read_bytes()

        edited = run_cli("edit", name, str(spec_file(tmp_path, name)), "--queue", str(queue.root))
        deleted = run_cli("delete", name, "--queue", str(queue.root))

        for refused in (edited, deleted):
            assert refused.returncode == 1, refused.stderr
            said = one_line(refused.stderr)
            assert f"job {name!r} is being run by" in said and f"`runner cancel {name}`" in said
        assert queue.job(name).paths.spec.read_bytes() == spec_before
        assert state(queue, name).status is JobStatus.RUNNING and process.poll() is None
        assert run_cli("cancel", name, "--queue", str(queue.root)).returncode == 0
        process.wait(timeout=60)


def test_a_claim_from_before_a_replacement_is_fenced(queue: Queue) -> None:
    queue.submit(make_spec("job-a", **FAILING))
    lease = queue.lease("job-a")
    assert lease.try_acquire()
    claim = queue.claim("job-a", lease)
    assert claim is not None
    claim.finish(JobStatus.FAILED, error="injected")
    lease.release()  # as a worker whose lease ran out while it was frozen: it does not know yet

    replace_spec(queue, make_spec("job-a"))

    with pytest.raises(Fenced, match="has claimed the job since"):
        claim.fence()
    with pytest.raises(Fenced):
        claim.update(epoch=5)
    assert state(queue, "job-a").status is JobStatus.QUEUED


def test_a_claim_of_a_deleted_job_is_fenced_after_its_name_is_submitted_again(queue: Queue) -> None:
    """A worker frozen past its lease wakes up after its job was deleted and a new one of the same name submitted:
    the new job has no marker of that generation, and no newer one either, which fenced nobody before."""
    queue.submit(make_spec("job-a"))
    lease = queue.lease("job-a")
    assert lease.try_acquire()
    claim = queue.claim("job-a", lease)
    assert claim is not None
    claim.update(epoch=1)
    lease.release()  # as a worker whose lease ran out while it was frozen: it does not know yet

    assert run_cli("delete", "job-a", "--queue", str(queue.root)).returncode == 0
    queue.submit(make_spec("job-a", training={"epochs": 7}))
    assert not queue.job("job-a").paths.claim_marker(claim.generation).exists(), "precondition: no marker to find"

    with pytest.raises(Fenced, match="its claim marker is gone"):
        claim.fence()
    with pytest.raises(Fenced):
        claim.update(epoch=2)
    assert state(queue, "job-a").status is JobStatus.QUEUED and state(queue, "job-a").epoch == 0


def test_of_two_machines_replacing_a_spec_at_once_the_one_whose_marker_lost_writes_nothing(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drive has no exclusive create across VMs: both replacements create the generation's marker, and the version
    uploaded last wins. Stood in for here by the other machine's token arriving right after this one's create."""
    from runner import storage  # noqa: PLC0415

    queue.submit(make_spec("job-a", **FAILING))
    original_create = storage.create_exclusive
    overwritten: list[Path] = []

    def create_then_lose(path: Path, data: bytes = b"") -> bool:
        created = original_create(path, data)
        path.write_bytes(b"replaced other-vm:1 0123456789abcdef")
        overwritten.append(path)
        return created

    monkeypatch.setattr(storage, "create_exclusive", create_then_lose)
    with pytest.raises(RunnerError, match="claimed or replaced on another machine"):
        replace_spec(queue, make_spec("job-a", training={"epochs": 9}))

    assert overwritten, "precondition: the other machine's marker arrived"
    assert queue.job("job-a").read_spec().training.epochs != 9, "the spec is not written by the losing replacement"
    assert events(queue, "job-a", "replaced") == []


def test_a_snapshot_kept_on_this_machine_from_before_a_discarding_replacement_is_dropped(
    queue: Queue, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    name = failed_job(queue, tmp_path)
    generation = state(queue, name).generation
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "state.json").write_text("{}")
    job = queue.job(name)
    token = job.claim_token(generation)
    keep_snapshot(snapshot, cache_dir=cache, job=job, generation=generation, claim_token=token, epoch=2, step=0, meta={})
    assert find_kept(cache, job) is not None

    replace_spec(queue, make_spec(name, model={"params": {"steps": 4}}))

    assert publish_kept(cache, store(queue, name)) is None
    assert store(queue, name).committed() == []
    assert find_kept(cache, job) is None
    (dropped,) = events(queue, name, "kept-snapshot-dropped")
    assert "replaced" in dropped["reason"]


# --- delete -----------------------------------------------------------------------------------------------------


def test_delete_removes_the_job_and_frees_its_name(queue: Queue, tmp_path: Path) -> None:
    name = failed_job(queue, tmp_path)

    deleted = run_cli("delete", name, "--queue", str(queue.root))

    assert deleted.returncode == 0, deleted.stderr
    assert one_line(deleted.stderr) == f"deleted job {name!r}"
    assert os.listdir(queue.paths.jobs) == []  # nothing left, not even a temporary folder
    assert name not in status_json(queue, run_cli)
    assert not (queue.root / "deleted").exists()

    again = run_cli("submit", "--queue", str(queue.root), str(spec_file(tmp_path, name)))
    assert again.returncode == 0, again.stderr
    assert run_cli("work", "--queue", str(queue.root)).returncode == 0
    assert events(queue, name, "resumed") == []
    assert result_value(queue, name) == expected_value(3, 4)


def test_a_snapshot_kept_for_a_deleted_job_never_reaches_a_new_job_of_its_name(
    queue: Queue, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    name = failed_job(queue, tmp_path)
    job = queue.job(name)
    generation = state(queue, name).generation
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "state.json").write_text("{}")
    keep_snapshot(
        snapshot, cache_dir=cache, job=job, generation=generation + 1, claim_token="old job", epoch=2, step=0, meta={}
    )
    assert run_cli("delete", name, "--queue", str(queue.root)).returncode == 0
    queue.submit(make_spec(name))

    assert publish_kept(cache, store(queue, name)) is None
    assert store(queue, name).committed() == []
    assert "not from this job" in events(queue, name, "kept-snapshot-dropped")[0]["reason"]


def test_delete_keep_checkpoints_keeps_checkpoints_and_exports_outside_the_queue(queue: Queue, tmp_path: Path) -> None:
    name = cancelled_job(queue, tmp_path)
    checkpoints = sorted(info.id for info in verified_checkpoints(queue, name))

    deleted = run_cli("delete", name, "--keep-checkpoints", "--queue", str(queue.root))

    assert deleted.returncode == 0, deleted.stderr
    (kept,) = (queue.root / "deleted").iterdir()
    assert kept.name.startswith(f"{name}-")
    assert f"its checkpoints, exports, spec and history are kept in {kept}" in one_line(deleted.stderr)
    assert {"checkpoints", "spec.yaml"} <= set(os.listdir(kept)) <= {"checkpoints", "spec.yaml", "history.csv"}
    assert sorted(entry for entry in os.listdir(kept / "checkpoints")) == checkpoints
    assert all((kept / "checkpoints" / checkpoint / "MANIFEST.json").is_file() for checkpoint in checkpoints)
    assert os.listdir(queue.paths.jobs) == []


def test_delete_of_a_damaged_job_folder_works(queue: Queue) -> None:
    queue.submit(make_spec("damaged"))
    queue.job("damaged").paths.state.write_bytes(b"\x00{not json")

    deleted = run_cli("delete", "damaged", "--queue", str(queue.root))

    assert deleted.returncode == 0, deleted.stderr
    assert os.listdir(queue.paths.jobs) == []


def run_on_a_terminal(args: list[str], answer: bytes) -> tuple[int, str]:
    """Run ``runner ARGS`` with a pseudo-terminal as its stdin, stdout and stderr; type ``answer``."""
    main, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=runner_env(),
        cwd=REPO,
        close_fds=True,
    )
    os.close(secondary)
    os.write(main, answer)
    output = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    return process.wait(timeout=60), output.decode(errors="replace")


@pytest.mark.parametrize(("answer", "deleted"), [(b"n\n", False), (b"\n", False), (b"y\n", True), (b"yes\n", True)])
def test_delete_asks_on_a_terminal(queue: Queue, tmp_path: Path, answer: bytes, deleted: bool) -> None:
    name = failed_job(queue, tmp_path)

    code, output = run_on_a_terminal(["delete", name, "--queue", str(queue.root)], answer)

    assert f"delete job {name!r} (failed" in " ".join(output.split())
    assert "[y/N]" in output
    assert code == (0 if deleted else 1), output
    assert queue.paths.job(name).folder.exists() is not deleted
    if not deleted:
        assert "nothing was deleted" in output


def test_delete_yes_does_not_ask(queue: Queue, tmp_path: Path) -> None:
    name = failed_job(queue, tmp_path)

    code, output = run_on_a_terminal(["delete", name, "--yes", "--queue", str(queue.root)], b"")

    assert code == 0, output
    assert "[y/N]" not in output
    assert not queue.paths.job(name).folder.exists()


@pytest.mark.parametrize(("answer", "replaced"), [(b"n\n", False), (b"y\n", True)])
def test_edit_that_discards_checkpoints_asks_on_a_terminal(
    queue: Queue, tmp_path: Path, answer: bytes, replaced: bool
) -> None:
    name = failed_job(queue, tmp_path)
    before = state(queue, name)
    fixed = spec_file(tmp_path, name, model={"params": {"steps": 4}})

    code, output = run_on_a_terminal(["edit", name, str(fixed), "--queue", str(queue.root)], answer)

    said = " ".join(output.split())
    assert f"job {name!r}: the new model.params.fail_at_epoch discards its 1 checkpoint" in said, output
    assert code == (0 if replaced else 1), output
    assert (state(queue, name).status is JobStatus.QUEUED) is replaced
    if not replaced:
        assert "nothing was changed" in said and state(queue, name) == before


def test_submit_replace_of_the_same_spec_is_a_plain_submit_even_for_a_done_job(queue: Queue, tmp_path: Path) -> None:
    spec = spec_file(tmp_path, "job-a")
    assert run_cli("submit", "--queue", str(queue.root), str(spec)).returncode == 0
    assert run_cli("work", "--queue", str(queue.root)).returncode == 0

    again = run_cli("submit", "--replace", "--queue", str(queue.root), str(spec))

    assert again.returncode == 0, again.stderr
    assert "already in the queue, unchanged: job-a" in one_line(again.stderr)
    assert state(queue, "job-a").status is JobStatus.DONE


def test_a_worker_that_reaches_a_job_deleted_since_it_listed_the_queue_leaves_no_trace(queue: Queue) -> None:
    queue.submit(make_spec("gone"))
    worker = Worker(queue, CountingTrainer, console=quiet_console())
    delete_job(queue, "gone")  # after the worker would have listed it, before it takes the lease

    assert worker._try_claim("gone", wait=False) is None  # noqa: SLF001 (the moment between listing and lease)

    assert os.listdir(queue.paths.jobs) == []  # no folder made again for the lease's marker, no state rebuilt
