"""Helpers for the worker and status tests: bounded waits, job-folder reads, and child processes that are
always reaped (a zombie still answers ``kill(pid, 0)``, so a killed worker must be waited for before the next
one looks at its lease)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from runner.checkpoints import CheckpointInfo, CheckpointStore
from runner.job import JobState
from runner.paths import is_temp_name
from runner.queue import Queue

HOLD_LEASE = Path(__file__).with_name("worker_hold_lease.py")


def quiet_console() -> Console:
    """A console that renders into memory, as the style guide asks."""
    return Console(file=io.StringIO(), width=100)


def wait_until(predicate: Callable[[], Any], what: str, *, timeout: float = 60.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def state(queue: Queue, name: str) -> JobState:
    """The job's state.json."""
    return queue.job(name).read_state()


def events(queue: Queue, name: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The job's events, optionally only those called ``kind``."""
    found = queue.job(name).events.read()
    return [event for event in found if kind is None or event["event"] == kind]


def store(queue: Queue, name: str) -> CheckpointStore:
    """The job's checkpoint store (read-only use)."""
    job = queue.job(name)
    return CheckpointStore(job, keep=job.read_spec().checkpoint.keep)


def verified_checkpoints(queue: Queue, name: str) -> list[CheckpointInfo]:
    """Every committed checkpoint, newest first, each verified against its manifest (raises if one is not)."""
    checkpoints = store(queue, name)
    return [checkpoints.verify(info) for info in checkpoints.committed()]


def temp_entries(queue: Queue, name: str) -> list[str]:
    """Unfinished checkpoint folders left in the job's checkpoints folder."""
    folder = queue.job(name).paths.checkpoints
    return [entry for entry in os.listdir(folder) if is_temp_name(entry)] if folder.is_dir() else []


def result_value(queue: Queue, name: str) -> int:
    """The value the counting trainer wrote into final/result.json."""
    return json.loads((queue.job(name).paths.final / "result.json").read_text())["value"]


def status_json(queue: Queue, run_cli: Callable[..., subprocess.CompletedProcess[str]]) -> dict[str, dict[str, Any]]:
    """``runner status --json`` parsed, keyed by job name (the array order is checked where it matters)."""
    done = run_cli("status", "--queue", str(queue.root), "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert isinstance(rows, list)
    return {row["name"]: row for row in rows}


def stop_process(process: subprocess.Popen[str], *, timeout: float = 30.0) -> tuple[str, str]:
    """SIGKILL ``process``'s group if it still runs, reap it and return its output."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out, err = process.communicate(timeout=timeout)
    return out or "", err or ""


@contextmanager
def reaped(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """Yield ``process``; kill and reap it on the way out, whatever happened."""
    try:
        yield process
    finally:
        stop_process(process)


@contextmanager
def lease_held_elsewhere(queue: Queue, name: str) -> Iterator[subprocess.Popen[str]]:
    """Hold ``name``'s lease in another live process (heartbeating) for the duration of the block."""
    process = subprocess.Popen(
        [sys.executable, str(HOLD_LEASE), str(queue.root), name, str(queue.lease_duration)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    with reaped(process):
        line = process.stdout.readline()
        if line.strip() != "held":
            _, err = stop_process(process)
            raise AssertionError(f"the lease helper could not take the lease: {line!r} {err}")
        yield process
