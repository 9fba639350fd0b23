"""`runner logs NAME [-f]`: the job's log, and following it while a real worker writes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.joblog import read_from, show_log
from runner.queue import Queue
from tests.conftest import REPO, make_spec, run_cli, runner_env, start_cli, write_spec


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_logs_prints_every_session_tagged_with_its_claim(tmp_path: Path) -> None:
    queue_dir = tmp_path / "queue"
    spec = write_spec(tmp_path, "job-a", model={"params": {"steps": 3}})
    assert run_cli("submit", "--queue", str(queue_dir), str(spec)).returncode == 0
    assert run_cli("work", "--queue", str(queue_dir)).returncode == 0

    shown = run_cli("logs", "job-a", "--queue", str(queue_dir))

    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("[g1] ") and "starting on" in lines[0]
    assert lines[-1].endswith("INFO done")
    assert shown.stdout == (queue_dir / "jobs" / "job-a" / "runner.log").read_text()


def test_a_job_without_a_log_says_so_and_an_unknown_job_is_one_line(tmp_path: Path) -> None:
    queue_dir = tmp_path / "queue"
    spec = write_spec(tmp_path, "job-a")
    run_cli("submit", "--queue", str(queue_dir), str(spec))

    empty = run_cli("logs", "job-a", "--queue", str(queue_dir))
    unknown = run_cli("logs", "nope", "--queue", str(queue_dir))

    assert empty.returncode == 0 and empty.stdout == ""
    assert empty.stderr.strip() == "(job 'job-a' has no log yet)"
    assert unknown.returncode == 2
    assert len(unknown.stderr.strip().splitlines()) == 1 and "no job named 'nope'" in unknown.stderr


@pytest.mark.slow
def test_follow_prints_lines_as_a_real_worker_writes_them_and_ends_with_the_job(tmp_path: Path) -> None:
    queue_dir = tmp_path / "queue"
    spec = write_spec(tmp_path, "job-a", model={"params": {"steps": 4, "step_seconds": 0.25}}, training={"epochs": 3})
    run_cli("submit", "--queue", str(queue_dir), str(spec))
    follower = start_cli("logs", "-f", "job-a", "--queue", str(queue_dir))
    worker = start_cli("work", "--queue", str(queue_dir))
    try:
        assert worker.wait(timeout=120) == 0
        out, err = follower.communicate(timeout=30)  # ends by itself once the job is done
    finally:
        for process in (worker, follower):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert follower.returncode == 0, err
    log = (queue_dir / "jobs" / "job-a" / "runner.log").read_text()
    assert out == log  # every line once, in order, nothing repeated between polls
    assert [line.split(" INFO ")[-1] for line in out.splitlines() if "epoch" in line][:3] == [
        line.split(" INFO ")[-1] for line in log.splitlines() if "epoch" in line
    ][:3]
    assert out.rstrip().endswith("INFO done")


@pytest.mark.slow
def test_ctrl_c_stops_following_without_a_traceback(tmp_path: Path) -> None:
    queue_dir = tmp_path / "queue"
    spec = write_spec(tmp_path, "job-a")
    run_cli("submit", "--queue", str(queue_dir), str(spec))
    # As a person's terminal has it: Ctrl-C raises KeyboardInterrupt, even where this suite runs in a background
    # job of a shell, whose children inherit SIGINT ignored (and Python then never installs its handler).
    interactive = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv = ['runner', *sys.argv[1:]]; runpy.run_module('runner', run_name='__main__')"
    )
    follower = subprocess.Popen(
        [sys.executable, "-c", interactive, "logs", "-f", "job-a", "--queue", str(queue_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=runner_env(),
        cwd=REPO,
        start_new_session=True,
    )
    waiting = follower.stderr.readline()  # type: ignore[union-attr]  # a queued job: the follower waits for lines
    assert "has no log yet: waiting for its first lines; Ctrl-C stops" in waiting, waiting
    assert follower.poll() is None
    follower.send_signal(signal.SIGINT)
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 130
    assert "Traceback" not in err


def test_following_reads_only_what_was_appended_and_restarts_on_a_replaced_log(tmp_path: Path) -> None:
    log = tmp_path / "runner.log"
    assert read_from(log, 0) == (b"", 0)
    log.write_bytes(b"one\ntwo\n")
    data, offset = read_from(log, 0)
    assert (data, offset) == (b"one\ntwo\n", 8)
    with log.open("ab") as handle:
        handle.write(b"three\n")
    assert read_from(log, offset) == (b"three\n", 14)
    log.write_bytes(b"new\n")  # replaced by a shorter file: read from its start
    assert read_from(log, 14) == (b"new\n", 4)


def test_show_log_follows_until_the_job_is_finished(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    job, _ = queue.submit(make_spec("job-a"))
    written: list[str] = []
    polls = {"count": 0}

    def sleep(_: float) -> None:
        # Each poll, a "worker" appends a line; after the third, the job is cancelled (finished).
        polls["count"] += 1
        assert polls["count"] < 10, "never stopped following"
        if polls["count"] <= 3:
            with job.paths.log.open("a") as handle:
                handle.write(f"line {polls['count']}\n")
        if polls["count"] == 3:
            queue.cancel("job-a")

    assert show_log(job, written.append, follow=True, sleep=sleep)
    assert "".join(written) == "".join(f"line {n}\n" for n in range(1, 4))
    assert polls["count"] == 4  # one more look after the job finished, to print its last lines
