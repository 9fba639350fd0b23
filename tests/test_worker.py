"""The worker: claim order, failure isolation, cancel, retry, signals, kills and damaged or leased job folders.

Logic runs an in-process :class:`Worker` with the counting trainer; signals and kills go to real ``runner work``
processes.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from runner.checkpoints import CheckpointStore
from runner.job import JobStatus
from runner.lease import read_holder
from runner.queue import Queue
from runner.worker import Worker
from tests.conftest import make_spec, run_cli, runner_env, start_cli
from tests.support.counting_trainer import CountingTrainer, expected_value, fold, weights_bytes
from tests.support.worker_helpers import (
    events,
    lease_held_elsewhere,
    quiet_console,
    reaped,
    result_value,
    state,
    status_json,
    stop_process,
    store,
    temp_entries,
    verified_checkpoints,
    wait_until,
)

FAILING = {"model": {"params": {"steps": 4, "fail_at_epoch": 1}}}
SLOW = {"model": {"params": {"steps": 10, "step_seconds": 0.05}}, "training": {"epochs": 10}}
"""About 5 s of training, an epoch checkpoint every 0.5 s."""

PARKED = {"model": {"params": {"steps": 5, "step_seconds": 0.05, "park_at_epoch": 1}}, "training": {"epochs": 4}}
"""Like :data:`SLOW`, but waiting in epoch 1 until it is asked to stop: a test that stops it never races its end."""


def work(queue: Queue, **options: object) -> Worker:
    """Run an in-process worker with the counting trainer to the end; return it."""
    worker = Worker(queue, CountingTrainer, console=quiet_console(), **options)
    worker.run()
    return worker


def one_line_error(stderr: str) -> str:
    """The single line a failing command printed; fails if it printed more or a traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("error:"), stderr
    return lines[0]


def flat(text: str) -> str:
    """Text with its line wrapping undone (rich wraps long messages at the console width)."""
    return " ".join(text.split())


def start_slow_job(queue: Queue, name: str) -> subprocess.Popen[str]:
    """Submit a slow job and start ``runner work`` on it; returns the process once a checkpoint is recorded."""
    queue.submit(make_spec(name, **PARKED))
    process = start_cli("work", "--queue", str(queue.root))
    try:
        wait_until(lambda: state(queue, name).checkpoint, f"a first checkpoint of {name}")
    except BaseException:
        stop_process(process)
        raise
    return process


# --- claim order ------------------------------------------------------------------------------------------------


def test_claims_higher_priority_first_then_earlier_submission(tmp_path: Path) -> None:
    ticks = itertools.count(1000)
    queue = Queue(tmp_path / "queue", lease_duration=3.0, clock=lambda: float(next(ticks)))
    # Submission order differs from name order, so a tie broken by name would show.
    for name, priority in (("zz-low", 0), ("mm-high", 5), ("aa-low", 0), ("bb-high", 5), ("kk-mid", 1)):
        queue.submit(make_spec(name, priority=priority))

    worker = work(queue)

    expected = ["mm-high", "bb-high", "kk-mid", "zz-low", "aa-low"]
    assert worker.result.done == expected
    claimed = sorted((event["time"], name) for name in expected for event in events(queue, name, "claimed"))
    assert [name for _, name in claimed] == expected
    finished = sorted(expected, key=lambda name: state(queue, name).finished_at)
    assert finished == expected


# --- failure isolation ------------------------------------------------------------------------------------------


def test_failing_job_is_marked_failed_and_the_worker_goes_on(queue: Queue) -> None:
    queue.submit(make_spec("first", priority=2))
    queue.submit(make_spec("broken", priority=1, **FAILING))
    queue.submit(make_spec("last", priority=0))

    worker = work(queue)

    assert worker.result.failed == ["broken"]
    assert worker.result.done == ["first", "last"]
    assert worker.result.exit_code == 1
    failed = state(queue, "broken")
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None and "\n" not in failed.error
    assert "injected failure at epoch 1" in failed.error
    log = queue.job("broken").paths.log.read_text()
    assert "Traceback (most recent call last)" in log
    assert "RuntimeError: injected failure at epoch 1" in log
    assert [event["error"] for event in events(queue, "broken", "failed")] == [failed.error]
    # The job after the failing one ran to the right end.
    assert result_value(queue, "last") == expected_value(3, 4)


def test_runner_work_exits_1_when_a_job_failed_and_runs_the_others(queue: Queue) -> None:
    queue.submit(make_spec("good-a", priority=1))
    queue.submit(make_spec("bad", **FAILING))
    queue.submit(make_spec("good-b", priority=-1))

    done = run_cli("work", "--queue", str(queue.root))

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert state(queue, "bad").status is JobStatus.FAILED
    for name in ("good-a", "good-b"):
        assert state(queue, name).status is JobStatus.DONE
        assert result_value(queue, name) == expected_value(3, 4)


# --- done is final ----------------------------------------------------------------------------------------------


def test_done_jobs_are_never_trained_again(queue: Queue) -> None:
    queue.submit(make_spec("once"))
    first = run_cli("work", "--queue", str(queue.root))
    assert first.returncode == 0, first.stderr
    before = state(queue, "once")
    assert before.status is JobStatus.DONE
    result = queue.job("once").paths.final / "result.json"
    result_stat = result.stat()
    checkpoints = [info.id for info in store(queue, "once").committed()]

    second = run_cli("work", "--queue", str(queue.root))

    assert second.returncode == 0, second.stderr
    after = state(queue, "once")
    assert after.status is JobStatus.DONE
    assert after.generation == before.generation == 1
    assert len(events(queue, "once", "claimed")) == 1
    assert result.stat().st_mtime_ns == result_stat.st_mtime_ns
    assert [info.id for info in store(queue, "once").committed()] == checkpoints


# --- cancel -----------------------------------------------------------------------------------------------------


def test_cancel_of_a_queued_job_is_immediate_and_the_worker_skips_it(queue: Queue) -> None:
    queue.submit(make_spec("drop", priority=1))
    queue.submit(make_spec("keep"))

    cancelled = run_cli("cancel", "drop", "--queue", str(queue.root))

    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancelled" in cancelled.stderr
    assert state(queue, "drop").status is JobStatus.CANCELLED
    assert not queue.job("drop").paths.cancel_request.exists()

    worker = work(queue)

    assert worker.result.done == ["keep"]
    assert state(queue, "drop").status is JobStatus.CANCELLED
    assert events(queue, "drop", "claimed") == []
    assert not queue.job("drop").paths.final.exists()


@pytest.mark.slow
def test_cancel_of_a_running_job_stops_it_at_its_next_checkpoint(queue: Queue) -> None:
    with reaped(start_slow_job(queue, "slow")) as process:
        asked = run_cli("cancel", "slow", "--queue", str(queue.root))
        assert asked.returncode == 0, asked.stderr
        assert "saves a checkpoint and stops within seconds" in flat(asked.stderr)
        process.wait(timeout=60)

    assert process.returncode == 0
    final = state(queue, "slow")
    assert final.status is JobStatus.CANCELLED
    assert final.epoch < 4  # stopped early, not trained to the end
    assert not queue.job("slow").paths.cancel_request.exists()
    assert not queue.job("slow").paths.final.exists()
    kept = verified_checkpoints(queue, "slow")
    assert kept, "a cancelled job keeps its checkpoints"
    assert kept[0].id == final.checkpoint
    assert [event["event"] for event in events(queue, "slow")][-2:] == ["checkpoint", "cancelled"]
    assert events(queue, "slow", "cancel-requested")
    assert read_holder(queue.job("slow").paths) is None


# --- retry ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_retry_of_a_cancelled_job_resumes_from_its_checkpoint(queue: Queue) -> None:
    with reaped(start_slow_job(queue, "again")) as process:
        asked = run_cli("cancel", "again", "--queue", str(queue.root))
        assert asked.returncode == 0, asked.stderr
        process.wait(timeout=60)
    cancelled = state(queue, "again")
    assert cancelled.status is JobStatus.CANCELLED and cancelled.checkpoint is not None

    retried = run_cli("retry", "again", "--queue", str(queue.root))

    assert retried.returncode == 0, retried.stderr
    assert f"will resume from checkpoint {cancelled.checkpoint}" in flat(retried.stderr)
    queued = state(queue, "again")
    assert queued.status is JobStatus.QUEUED
    assert queued.error is None
    assert queued.checkpoint == cancelled.checkpoint

    done = run_cli("work", "--queue", str(queue.root))

    assert done.returncode == 0, done.stderr
    assert [event["checkpoint"] for event in events(queue, "again", "resumed")] == [cancelled.checkpoint]
    final = state(queue, "again")
    assert final.status is JobStatus.DONE
    assert final.restarts == 1
    assert result_value(queue, "again") == expected_value(4, 5)


def test_retry_of_a_failed_job_queues_it_and_keeps_its_checkpoints(queue: Queue) -> None:
    queue.submit(make_spec("flaky", **FAILING))
    work(queue)
    failed = state(queue, "flaky")
    assert failed.status is JobStatus.FAILED
    kept = [info.id for info in verified_checkpoints(queue, "flaky")]
    assert kept and failed.checkpoint == kept[0]

    retried = run_cli("retry", "flaky", "--queue", str(queue.root))

    assert retried.returncode == 0, retried.stderr
    queued = state(queue, "flaky")
    assert queued.status is JobStatus.QUEUED
    assert queued.error is None
    assert queued.checkpoint == failed.checkpoint
    assert [info.id for info in verified_checkpoints(queue, "flaky")] == kept
    assert events(queue, "flaky", "retried")[-1]["checkpoint"] == failed.checkpoint


@pytest.mark.parametrize("status", ["done", "queued"])
def test_retry_of_a_done_or_queued_job_is_a_one_line_error(queue: Queue, status: str) -> None:
    queue.submit(make_spec("settled"))
    if status == "done":
        work(queue)
    before = queue.job("settled").paths.state.read_bytes()

    refused = run_cli("retry", "settled", "--queue", str(queue.root))

    assert refused.returncode != 0
    line = one_line_error(refused.stderr)
    assert "settled" in line and status in line
    assert queue.job("settled").paths.state.read_bytes() == before


# --- a done job's space ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_done", [0, 1, 3])
def test_a_done_job_keeps_checkpoint_keep_done_of_its_checkpoints(queue: Queue, keep_done: int) -> None:
    checkpoint = {"every_epochs": 1, "keep": 3, "keep_done": keep_done}
    queue.submit(make_spec("spacious", checkpoint=checkpoint, training={"epochs": 5}))
    work(queue)

    done = state(queue, "spacious")
    left = store(queue, "spacious").committed()
    assert done.status is JobStatus.DONE
    assert [info.epoch for info in left] == [5, 4, 3][:keep_done]  # the newest ones
    assert temp_entries_of(queue, "spacious") == []  # nothing half-deleted left behind
    pruned = events(queue, "spacious", "pruned")
    assert [event["keep_done"] for event in pruned] == ([keep_done] if keep_done < 3 else [])
    assert [e["event"] for e in events(queue, "spacious")][-2:] == (["pruned", "done"] if keep_done < 3 else ["checkpoint", "done"])


def temp_entries_of(queue: Queue, name: str) -> list[str]:
    return [entry for entry in os.listdir(queue.job(name).paths.checkpoints) if entry.startswith(".")]


# --- signals ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_releases_the_lease_and_the_next_run_resumes(
    queue: Queue, signum: signal.Signals, code: int
) -> None:
    # Epoch checkpoints only at the very end: any checkpoint there is before that was published by the stop.
    queue.submit(make_spec("sig", checkpoint={"every_epochs": 1000}, **PARKED))
    log = queue.job("sig").paths.log
    with reaped(start_cli("work", "--queue", str(queue.root))) as process:
        wait_until(lambda: log.exists() and "epoch 1 done" in log.read_text(), "the trainer's first epoch")
        assert store(queue, "sig").committed() == []
        os.kill(process.pid, signum)
        process.wait(timeout=60)

    assert process.returncode == code
    stopped = state(queue, "sig")
    assert stopped.status is JobStatus.RUNNING  # stored as running: shown as interrupted
    assert 1 <= stopped.epoch < 4
    (published,) = verified_checkpoints(queue, "sig")
    assert published.id == stopped.checkpoint
    assert (published.epoch, published.step) == (stopped.epoch, stopped.step)
    assert [event["event"] for event in events(queue, "sig")][-2:] == ["checkpoint", "interrupted"]
    assert events(queue, "sig", "interrupted")[-1]["reason"] == "signal"
    assert read_holder(queue.job("sig").paths) is None
    assert not queue.job("sig").paths.lease.exists()
    assert status_json(queue, run_cli)["sig"]["state"] == "interrupted"

    resumed = run_cli("work", "--queue", str(queue.root))

    assert resumed.returncode == 0, resumed.stderr
    assert [event["checkpoint"] for event in events(queue, "sig", "resumed")] == [published.id]
    final = state(queue, "sig")
    assert final.status is JobStatus.DONE
    assert final.restarts == stopped.restarts + 1
    assert result_value(queue, "sig") == expected_value(4, 5)


@pytest.mark.slow
def test_a_second_sigint_stops_at_once_and_says_where_the_next_run_continues(queue: Queue) -> None:
    queue.submit(make_spec("twice", checkpoint={"every_epochs": 1}, **SLOW))
    kill_log = queue.root.parent / "holds.jsonl"
    # Held inside the second commit: the first SIGINT asks for a checkpoint and a stop, which cannot finish
    # while held, so the second one lands while the first is still being served, as a user's double Ctrl-C does.
    env = runner_env(RUNNER_HOLD_AT="commit-copied:2", RUNNER_KILL_LOG=str(kill_log))
    with reaped(start_cli("work", "--queue", str(queue.root), env=env)) as process:
        wait_until(lambda: kill_log.exists() and '"hold"' in kill_log.read_text(), "the hold in the second commit")
        os.kill(process.pid, signal.SIGINT)
        time.sleep(0.5)  # two signals sent back to back may arrive as one
        os.kill(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert events(queue, "twice", "interrupted")[-1]["reason"] == "second signal", stderr
    stopped = state(queue, "twice")
    said = " ".join(stderr.split())
    assert (
        f"stopping now; the last checkpoint of job 'twice' is {stopped.checkpoint} (epoch {stopped.epoch}, step "
        f"{stopped.step}): `runner work` continues from there"
    ) in said, stderr
    assert "Traceback" not in stderr


# --- kill and resume --------------------------------------------------------------------------------------------

KILL_EPOCHS, KILL_STEPS = 5, 12


def claims_and_resumes(queue: Queue, name: str) -> dict[int, str | None]:
    """For each claim generation, the checkpoint its run resumed from (``None``: it started from scratch)."""
    resumed_from: dict[int, str | None] = {}
    generation = 0
    for event in events(queue, name):
        if event["event"] == "claimed":
            generation = event["generation"]
            resumed_from[generation] = None
        elif event["event"] == "resumed":
            resumed_from[generation] = event["checkpoint"]
    return resumed_from


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("every_steps", [None, 4], ids=["epoch-checkpoints", "mid-epoch-checkpoints"])
def test_sigkill_at_random_moments_then_resume_ends_with_the_uninterrupted_value(
    queue: Queue, seed: int, every_steps: int | None
) -> None:
    rng = random.Random(seed)
    params = {"steps": KILL_STEPS, "step_seconds": 0.03, "every_steps": every_steps}
    queue.submit(make_spec("crashy", model={"params": params}, training={"epochs": KILL_EPOCHS}))
    # A lease far longer than the test: only the dead-pid rule can let the next run take over.
    env = runner_env(RUNNER_LEASE_DURATION="600")
    newest_before_run: dict[int, str | None] = {}
    for _ in range(3):
        generation = state(queue, "crashy").generation + 1
        newest = store(queue, "crashy").newest()
        newest_before_run[generation] = newest.id if newest else None
        process = start_cli("work", "--queue", str(queue.root), env=env)
        with reaped(process):
            wait_until(lambda: generation in claims_and_resumes(queue, "crashy"), "the claim", timeout=30)
            if newest is not None:
                wait_until(lambda: claims_and_resumes(queue, "crashy")[generation], "the restore", timeout=30)
            # At most 0.45 s of the ~1.8 s of training per run, so all three kills land mid-training.
            time.sleep(rng.uniform(0.0, 0.45))
            assert process.poll() is None, "the job finished before it could be killed"
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL
        assert state(queue, "crashy").status is JobStatus.RUNNING
        # Every committed checkpoint is intact (a kill leaves only temporary folders half-written or half-deleted).
        verified_checkpoints(queue, "crashy")
    kills = len(newest_before_run)
    newest = store(queue, "crashy").newest()
    newest_before_run[kills + 1] = newest.id if newest else None

    done = run_cli("work", "--queue", str(queue.root), env=env, timeout=60)

    assert done.returncode == 0, done.stderr
    final = state(queue, "crashy")
    assert final.status is JobStatus.DONE
    assert final.generation == kills + 1
    assert final.restarts == kills
    assert result_value(queue, "crashy") == expected_value(KILL_EPOCHS, KILL_STEPS)
    assert verified_checkpoints(queue, "crashy")
    assert temp_entries(queue, "crashy") == []
    # Each run resumed from the newest checkpoint the killed run before it had committed.
    assert claims_and_resumes(queue, "crashy") == newest_before_run
    assert [claim["resumed"] for claim in events(queue, "crashy", "claimed")] == [False] + [True] * kills
    if every_steps:
        assert any(event["step"] > 0 for event in events(queue, "crashy", "checkpoint")), "mid-epoch checkpoints"


# --- damaged job folders ----------------------------------------------------------------------------------------


def test_a_damaged_spec_is_left_alone_and_a_damaged_state_is_rebuilt(queue: Queue) -> None:
    for name, priority in (("bad-state", 3), ("good-1", 2), ("bad-spec", 1), ("good-2", 0)):
        queue.submit(make_spec(name, priority=priority))
    bad_state = queue.job("bad-state").paths.state
    bad_state.write_bytes(b"\x00{not json at all")
    bad_spec = queue.job("bad-spec").paths.spec
    bad_spec.write_text("name: [unclosed\n  training: {epochs: 3\n")
    untouched = {path: path.read_bytes() for path in (bad_spec, queue.job("bad-spec").paths.state)}

    worker = work(queue)

    # A spec cannot be guessed: that job is left exactly as it was, and the others run.
    for path, content in untouched.items():
        assert path.read_bytes() == content
    assert events(queue, "bad-spec", "claimed") == []
    assert not queue.job("bad-spec").paths.checkpoints.exists()
    assert not queue.job("bad-spec").paths.lease.exists()
    # A state can: it is rebuilt from the events (and checkpoints), logged, and the job completes.
    assert worker.result.done == ["bad-state", "good-1", "good-2"]  # by priority, as before the damage
    assert worker.result.failed == [] and worker.result.exit_code == 0
    for name in ("good-1", "good-2", "bad-state"):
        assert result_value(queue, name) == expected_value(3, 4)
    recovered = events(queue, "bad-state", "state-recovered")
    assert len(recovered) == 1 and recovered[0]["status"] == "queued"
    assert state(queue, "bad-state").status is JobStatus.DONE


def test_a_damaged_state_of_an_interrupted_job_is_rebuilt_and_it_resumes(queue: Queue) -> None:
    queue.submit(make_spec("job-a", training={"epochs": 4}))
    lease = queue.lease("job-a")
    assert lease.try_acquire()
    claim = queue.claim("job-a", lease)
    assert claim is not None
    store = CheckpointStore(claim.job, keep=2, fence=claim.fence)
    scratch = queue.root.parent / "scratch"
    scratch.mkdir()
    # Two epochs' worth of real counting-trainer state, committed as the trainer would.
    value = 1
    for epoch in range(2):
        for step in range(4):
            value = fold(value, epoch, step)
    (scratch / "state.json").write_text(json.dumps({"epoch": 2, "step": 0, "value": value}))
    (scratch / "weights.bin").write_bytes(weights_bytes(value))
    store.commit(scratch, generation=claim.generation, epoch=2, step=0)
    lease.release()
    claim.job.paths.state.write_text("{ garbage")

    worker = work(queue)

    assert worker.result.done == ["job-a"]
    assert result_value(queue, "job-a") == expected_value(4, 4)
    recovered = events(queue, "job-a", "state-recovered")[0]
    assert recovered["status"] == "running" and recovered["checkpoint"] == "g000001-e000002-s000000000"
    assert events(queue, "job-a", "resumed")[0]["checkpoint"] == "g000001-e000002-s000000000"
    assert state(queue, "job-a").generation == 2


def test_a_lease_file_deleted_mid_run_is_detected_logged_and_the_job_completes(queue: Queue) -> None:
    short = Queue(queue.root, lease_duration=0.6)
    short.submit(make_spec("slow", model={"params": {"steps": 40, "step_seconds": 0.02}}))
    lease_file = short.job("slow").paths.lease

    def delete_the_marker() -> None:
        deadline = time.monotonic() + 30
        while not lease_file.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        lease_file.unlink(missing_ok=True)

    remover = threading.Thread(target=delete_the_marker)
    remover.start()
    worker = work(short)
    remover.join()

    assert worker.result.done == ["slow"]
    assert result_value(short, "slow") == expected_value(3, 40)
    lost = events(short, "slow", "lease-lost")
    assert lost and lost[0]["reason"] == "marker-missing"
    assert state(short, "slow").generation == 1 + len(lost)


# --- one job only -----------------------------------------------------------------------------------------------


def test_work_with_job_runs_only_that_job(queue: Queue) -> None:
    queue.submit(make_spec("wanted"))
    queue.submit(make_spec("other", priority=9))

    done = run_cli("work", "--queue", str(queue.root), "--job", "wanted")

    assert done.returncode == 0, done.stderr
    assert state(queue, "wanted").status is JobStatus.DONE
    other = state(queue, "other")
    assert other.status is JobStatus.QUEUED and other.generation == 0
    assert events(queue, "other", "claimed") == []


def test_work_with_an_unknown_job_is_a_one_line_usage_error(queue: Queue) -> None:
    queue.submit(make_spec("present"))

    refused = run_cli("work", "--queue", str(queue.root), "--job", "nosuch")

    assert refused.returncode == 2
    assert "nosuch" in one_line_error(refused.stderr)
    assert state(queue, "present").generation == 0


# --- leases held by others --------------------------------------------------------------------------------------


@pytest.mark.parametrize("wait_for_silent_leases", [False, True])
def test_job_leased_by_a_live_process_is_skipped_not_run_twice(queue: Queue, wait_for_silent_leases: bool) -> None:
    queue.submit(make_spec("taken", priority=1))
    queue.submit(make_spec("free"))

    def no_waiting(seconds: float) -> None:
        raise AssertionError(f"the worker waited ({seconds}s) on a lease that is kept alive")

    with lease_held_elsewhere(queue, "taken") as holder:
        worker = Worker(
            queue,
            CountingTrainer,
            console=quiet_console(),
            wait_for_silent_leases=wait_for_silent_leases,
            sleep=no_waiting,
        )
        result = worker.run()

        assert result.skipped == ["taken"]
        assert result.done == ["free"]
        assert result.exit_code == 0
        taken = state(queue, "taken")
        assert taken.status is JobStatus.QUEUED and taken.generation == 0
        assert events(queue, "taken", "claimed") == []
        assert read_holder(queue.job("taken").paths).pid == holder.pid
        holder.communicate(timeout=30)  # closing its stdin makes the other process let go
        assert holder.returncode == 0

    later = work(queue)
    assert later.result.done == ["taken"]
    assert state(queue, "taken").generation == 1
