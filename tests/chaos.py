"""The chaos harness: real `runner work` processes on a simulated Drive, killed at random, with faults injected.

One scenario (:class:`Scenario`) is a sequence of "Colab sessions" on one job folder kept on a :class:`DriveSim`
remote ("Drive"). Each session is a new VM:

* a fresh DriveSim mount of the same remote, at the same mount point (a new VM's view of Drive);
* a fresh, empty ``$RUNNER_CACHE`` (the local disk is wiped: no dataset cache, no local snapshots), so the
  dataset archive, kept as one zip on the simulated Drive, is copied to local disk again every session;
* a real ``python -m runner work`` process with the default Keras trainer, on tiny real data, deterministic.

A disturbed session ends at a random moment after its first or second commit, either by SIGKILL of the worker (the mount then stops cleanly:
pending writes reach Drive) or by :meth:`DriveSim.vm_dies` (worker and mount SIGKILLed: writes younger than the
durability lag are lost). Transient faults (EIO, errno 107) are injected on the chosen operations all along; an
outage longer than the retry budget can be put in the middle of training. After the disturbed sessions, plain
sessions (still faulty, never killed) run until the job finishes or a session cap is hit.

:func:`run_scenario` returns a :class:`ChaosResult` with what really happened, counted from the simulator's own
counters, the workers' stderr and the job folder on the remote (events.jsonl, runner.log, state.json): sessions,
kills, VM deaths, injected faults by errno, retries logged, publish retries, restore fallbacks, the outcome, and
whether the final weights and history are bit-identical to an undisturbed run (:func:`reference_run`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runner.checkpoints import CheckpointStore
from runner.history import read_history
from runner.job import JobStatus
from tests.conftest import REPO, run_cli
from tests.drivesim import DriveSim, FaultPlan
from tests.drivesim.fixtures import SimFactory
from tests.support.keras_jobs import (
    job_of,
    keras_env,
    make_digit_folders,
    write_keras_spec,
)

JOB = "chaos"
DRIVE_ROOT = Path("/content/drive")
"""Where Colab mounts Drive; a mount point under it makes runner copy the dataset archive to local disk first."""

RETRY_LINE = re.compile(r"storage error \(.*?\), try \d+, retrying in")
"""What :mod:`runner.storage` logs before each retry of a transient error."""
PUBLISH_RETRY = "publishing checkpoint failed, will retry"
"""What the publisher logs when a checkpoint could not be published within the retry budget (kept locally)."""
STORAGE_INTERRUPT = "interrupted by storage"
"""What the worker logs when storage trouble interrupts a job (resumable)."""


@dataclass(frozen=True)
class Scenario:
    """One chaos run: how many disturbed sessions, what faults, what outage."""

    name: str
    seed: int = 0
    disturbed_sessions: int = 3
    """Sessions that end at a random moment (SIGKILL or VM death) unless the job finished first."""
    max_sessions: int = 10
    """Cap on all sessions; the job must be done by then."""
    fault_rate: float = 0.0
    fault_ops: tuple[str, ...] = ("write", "fsync", "rename", "open")
    fault_errnos: tuple[int, ...] = (errno.EIO, errno.ENOTCONN)
    durability_lag_s: float | None = 1.5
    latency_s: float = 0.002
    vm_death_share: float = 0.5
    """Chance that a disturbed session ends by VM death rather than a SIGKILL of the worker."""
    kill_window_s: tuple[float, float] = (0.0, 1.0)
    """Random delay of a kill after the session's first or second commit (a ``checkpoint`` event): in training or
    publishing, never before the model is built."""
    outage_s: float | None = None
    """An outage (errno 107 on everything) this long, once the first checkpoint is published, in session 0."""
    retry_budget_s: float | None = None
    """``$RUNNER_RETRY_BUDGET`` for the workers (None: the default 300 s)."""
    lease_duration_s: float = 20.0
    epochs: int = 8
    mid_epoch: bool = False
    """Snapshot after every compiled call of 2 steps (``every_minutes`` tiny) instead of once per epoch."""

    def spec_overrides(self) -> dict[str, Any]:
        checkpoint: dict[str, Any] = {"every_minutes": 0.0005} if self.mid_epoch else {}
        training: dict[str, Any] = {"epochs": self.epochs, "steps_per_execution": 2 if self.mid_epoch else "auto"}
        return {"training": training, "checkpoint": checkpoint}


@dataclass
class ChaosResult:
    """What one scenario did, counted from the simulator, the workers' output and the job folder."""

    scenario: str
    seed: int
    sessions: int = 0
    kills: int = 0
    """SIGKILLs of the worker that cut a run short (the job was not done)."""
    vm_deaths: int = 0
    """VM deaths that cut a run short (writes younger than the durability lag lost)."""
    faults: dict[str, int] = field(default_factory=dict)
    """Injected transient faults, by errno name."""
    outage_faults: int = 0
    """Calls failed by the outage."""
    retries: int = 0
    """Retries of transient errors logged by the storage layer (worker stderr)."""
    publish_retries: int = 0
    """Checkpoints kept locally because publishing failed past the retry budget (runner.log or stderr)."""
    fallbacks: int = 0
    """Restore fallbacks (a newest checkpoint that did not verify) in events.jsonl."""
    storage_interruptions: int = 0
    """Jobs interrupted by storage trouble (runner.log)."""
    worker_exits: list[int] = field(default_factory=list)
    """Exit codes of the sessions that ended on their own."""
    generation: int = 0
    outcome: str = "unknown"
    bit_identical: bool = False
    history_ok: bool = False
    exported: bool = False
    trained_through_outage: bool | None = None
    """Outage scenarios: a checkpoint trained during the outage was published after it, by the same worker."""
    status_answers: list[str] = field(default_factory=list)
    """What `runner status --json` said (state, checkpoint, kept checkpoint, or its error) during the outage, asked
    again and again, and once it ended."""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    """Anything unexpected, one line each (a worker that crashed, a stuck session...)."""

    @property
    def faults_total(self) -> int:
        return sum(self.faults.values())

    @property
    def ok(self) -> bool:
        done = self.outcome == "done" and self.bit_identical and self.history_ok and self.exported
        return done and self.trained_through_outage is not False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"faults_total": self.faults_total, "ok": self.ok}


@dataclass(frozen=True)
class Reference:
    """An undisturbed run's final variables and history."""

    variables: dict[str, np.ndarray]
    history: list[dict[str, str]]


# -- inputs -----------------------------------------------------------------------------------------------------


def make_archive(folder: Path, *, train_per_class: int = 32) -> Path:
    """A zip of tiny real digit images (train/ and validation/), as a user keeps a dataset on Drive."""
    images = make_digit_folders(folder / "digits", train_per_class=train_per_class)
    archive = folder / "digits.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(images.rglob("*")):
            zipped.write(path, path.relative_to(images))
    shutil.rmtree(images)
    return archive


def newest_variables(queue: Path) -> dict[str, np.ndarray]:
    newest = CheckpointStore(job_of(queue, JOB), keep=2).newest()
    if newest is None:
        return {}
    with np.load(newest.path / "variables.npz") as arrays:
        return {key: arrays[key].copy() for key in arrays.files}


def reference_run(folder: Path, archive: Path, scenario: Scenario) -> Reference:
    """Train the scenario's job once, undisturbed, on local disk (no simulator)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = keras_env(folder / "cache")
    spec = write_keras_spec(folder, JOB, archive, **scenario.spec_overrides())
    queue = folder / "queue"
    submitted = run_cli("submit", str(spec), "--queue", str(queue), env=env)
    if submitted.returncode != 0:
        raise RuntimeError(f"reference submit failed: {submitted.stderr}")
    result = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    if result.returncode != 0 or job_of(queue, JOB).read_state().status is not JobStatus.DONE:
        raise RuntimeError(f"reference run failed ({result.returncode}): {result.stderr[-3000:]}")
    return Reference(newest_variables(queue), read_history(job_of(queue, JOB).paths.history))


# -- the run ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def drive_mountpoint(folder: Path) -> Iterator[Path]:
    """A fresh mount point under /content/drive where it can be made (so runner treats it as Drive), else in ``folder``."""
    created_root = not DRIVE_ROOT.exists()
    try:
        DRIVE_ROOT.mkdir(parents=True, exist_ok=True)
        mountpoint = DRIVE_ROOT / f"chaos-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        mountpoint.mkdir()
    except OSError:
        mountpoint, created_root = folder / "mnt", False
        mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        yield mountpoint
    finally:
        with contextlib.suppress(OSError):
            mountpoint.rmdir()
        if created_root:
            with contextlib.suppress(OSError):
                DRIVE_ROOT.rmdir()
                DRIVE_ROOT.parent.rmdir()


def _worker_env(scenario: Scenario, cache: Path) -> dict[str, str]:
    env = keras_env(cache)
    env["RUNNER_LEASE_DURATION"] = str(scenario.lease_duration_s)
    if scenario.retry_budget_s is not None:
        env["RUNNER_RETRY_BUDGET"] = str(scenario.retry_budget_s)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start_worker(queue: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "runner", "work", "--queue", str(queue)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )


def _kill_group(process: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _remote_state(remote_queue: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((remote_queue / "jobs" / JOB / "state.json").read_text())
    return {}


def _status_line(queue: Path, env: dict[str, str]) -> str:
    """`runner status --json` on the mount, condensed to one line (or why it failed)."""
    try:
        result = run_cli("status", "--json", "--queue", str(queue), env=env, timeout=120)
    except subprocess.TimeoutExpired:
        return "status timed out"
    if result.returncode != 0:  # the error, and what this machine keeps meanwhile (retry warnings left out)
        said = [line for line in result.stderr.splitlines() if not line.startswith("storage error (")]
        return f"exit {result.returncode}: {' '.join(' '.join(said).split())[-600:]}"
    try:
        records = json.loads(result.stdout)
    except ValueError:
        return f"unparsable output: {result.stdout[-200:]}"
    return "; ".join(
        f"state={r.get('state')} epoch={r.get('epoch')} checkpoint={r.get('checkpoint')} "
        f"saved_age={r.get('checkpoint_age_s')}s error={r.get('error')} publishing={r.get('publishing')}"
        for r in records
    ) or "no jobs"


def _add_faults(result: ChaosResult, stats: dict[str, Any]) -> None:
    counts = Counter(result.faults)
    for per_errno in stats.get("faults", {}).values():
        counts.update(per_errno)
    result.faults = dict(counts)
    result.outage_faults += sum(stats.get("outage", {}).values())


def run_scenario(scenario: Scenario, folder: Path, archive: Path, reference: Reference) -> ChaosResult:
    """Run one scenario in ``folder`` (remote, mount point, caches, logs) and count what happened."""
    started = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    result = ChaosResult(scenario=scenario.name, seed=scenario.seed)
    rng = random.Random(scenario.seed)
    remote = folder / "drive"
    (remote / "data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(archive, remote / "data" / "digits.zip")  # the dataset, one archive on "Drive"
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    with drive_mountpoint(folder) as mountpoint, SimFactory(folder) as factory:
        queue = mountpoint / "runner"
        remote_queue = remote / "runner"
        stuck = 0
        for session in range(scenario.max_sessions):
            if _remote_state(remote_queue).get("status") in ("done", "failed", "cancelled"):
                break
            if stuck >= 2:
                result.problems.append("gave up: two sessions in a row could not claim the job")
                break
            disturbed = session < scenario.disturbed_sessions
            sim = factory(remote, mountpoint, latency_s=scenario.latency_s, durability_lag_s=scenario.durability_lag_s)
            env = _worker_env(scenario, folder / f"cache-{session}")  # a new VM: empty local disk
            if session == 0:
                spec = write_keras_spec(folder, JOB, mountpoint / "data" / "digits.zip", **scenario.spec_overrides())
                submitted = run_cli("submit", str(spec), "--queue", str(queue), env=env)
                if submitted.returncode != 0:
                    raise RuntimeError(f"submit failed: {submitted.stderr}")
                sim.sync_now()
            plan = FaultPlan(
                rate=scenario.fault_rate, errnos=scenario.fault_errnos, ops=scenario.fault_ops,
                seed=scenario.seed * 1000 + session,
            )  # fmt: skip
            if scenario.fault_rate:
                sim.set_faults(plan)
            result.sessions += 1
            log = logs / f"session-{session}.log"
            worker = _start_worker(queue, env, log)
            try:
                if session == 0 and scenario.outage_s:
                    _outage_session(scenario, sim, worker, queue, remote_queue, env, result)
                elif disturbed:
                    _disturbed_session(scenario, sim, worker, queue, remote_queue, rng, result)
                if worker.poll() is None:
                    try:
                        worker.wait(timeout=600)
                    except subprocess.TimeoutExpired:
                        result.problems.append(f"session {session}: the worker ran for 10 minutes; killed")
                        _kill_group(worker)
                if worker.returncode == 0 and "left to other live workers" in log.read_text(errors="replace"):
                    stuck += 1  # the job was not claimed: its lease was never taken over
                    result.problems.append(f"session {session}: the job's lease was not taken over; nothing ran")
                else:
                    stuck = 0
                if sim.mounted:
                    if worker.returncode is not None and worker.returncode >= 0:
                        result.worker_exits.append(worker.returncode)
                        if worker.returncode not in (0,):
                            tail = " ".join(log.read_text(errors="replace").split())[-400:]
                            result.problems.append(f"session {session}: worker exit {worker.returncode}: {tail}")
                    _add_faults(result, sim.stats())
                    sim.unmount()  # a clean end: what was written reaches Drive
            finally:
                if worker.poll() is None:
                    _kill_group(worker)
                if sim.mounted:
                    sim.close()
    _collect(result, remote_queue, logs, reference)
    result.seconds = round(time.monotonic() - started, 1)
    return result


def _disturbed_session(
    scenario: Scenario,
    sim: DriveSim,
    worker: subprocess.Popen[bytes],
    queue: Path,
    remote_queue: Path,
    rng: random.Random,
    result: ChaosResult,
) -> None:
    """Let the worker commit once or twice, then end the session at a random moment: SIGKILL, or the VM dies."""
    commits = _commits(queue) + rng.choice((1, 2))  # read through this VM's mount: Drive itself lags behind
    deadline = time.monotonic() + 240
    while _commits(queue) < commits and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    delay = rng.uniform(*scenario.kill_window_s)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.02)
    vm_dies = scenario.durability_lag_s is not None and rng.random() < scenario.vm_death_share
    if worker.poll() is not None:
        return  # finished (or crashed) before the kill: counted by the caller
    _add_faults(result, sim.stats())
    if vm_dies:
        sim.vm_dies(workers=[worker])
    else:
        _kill_group(worker)
        sim.unmount()
    # A kill counts only if it cut the run short (the job may have finished within the delay).
    if _remote_state(remote_queue).get("status") != "done":
        if vm_dies:
            result.vm_deaths += 1
        else:
            result.kills += 1


def _outage_session(
    scenario: Scenario,
    sim: DriveSim,
    worker: subprocess.Popen[bytes],
    queue: Path,
    remote_queue: Path,
    env: dict[str, str],
    result: ChaosResult,
) -> None:
    """Once the first checkpoint is on Drive, Drive goes away for longer than the retry budget, then comes back."""
    assert scenario.outage_s is not None
    deadline = time.monotonic() + 240
    while (_remote_state(remote_queue).get("epoch") or 0) < 1 and worker.poll() is None:
        if time.monotonic() > deadline:
            result.problems.append("outage: no checkpoint published within 240 s")
            return
        time.sleep(0.02)
    if worker.poll() is not None:
        result.problems.append("outage: the worker ended before the outage")
        return
    before = _remote_state(remote_queue)
    sim.outage(scenario.outage_s)
    outage_ends = time.monotonic() + scenario.outage_s
    # Asked again and again, not once at a guessed moment: the worker's first failed publish, the only thing that
    # makes a kept checkpoint, comes after its own retry budget, and it publishes again at once when Drive is back.
    while time.monotonic() < outage_ends + 1.0 and worker.poll() is None:
        result.status_answers.append(_status_line(queue, env))
    worker.wait(timeout=600)
    state = _remote_state(remote_queue)
    events = _events(remote_queue)
    after_outage = [
        e for e in events if e.get("event") == "checkpoint" and e.get("time", 0) > before.get("checkpoint_at", 0)
    ]
    claims = [e for e in events if e.get("event") == "claimed"]
    result.trained_through_outage = (
        worker.returncode == 0
        and len(claims) == 1
        and state.get("status") == "done"
        and any(e.get("epoch", 0) > before.get("epoch", 0) + 1 for e in after_outage)
    )


def _commits(queue: Path) -> int:
    """Checkpoint events in the job's log as this VM sees it (0 while the mount fails a read)."""
    return sum(1 for event in _events(queue) if event.get("event") == "checkpoint")


def _events(remote_queue: Path) -> list[dict[str, Any]]:
    try:
        text = (remote_queue / "jobs" / JOB / "events.jsonl").read_text(errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def _collect(result: ChaosResult, remote_queue: Path, logs: Path, reference: Reference) -> None:
    """Read the outcome from "Drive" itself (every mount is down now: this is what a next session would see)."""
    job = job_of(remote_queue, JOB)
    state = job.read_state()
    result.outcome, result.generation = state.status.value, state.generation
    events = _events(remote_queue)
    result.fallbacks = sum(1 for e in events if e.get("event") == "fallback")
    runner_log = job.paths.log.read_text(errors="replace") if job.paths.log.exists() else ""
    stderr = "".join(path.read_text(errors="replace") for path in sorted(logs.glob("session-*.log")))
    result.retries = len(RETRY_LINE.findall(stderr)) + len(RETRY_LINE.findall(runner_log))
    # A publish warning lands in runner.log, or (when that append failed too, as in an outage) on stderr.
    result.publish_retries = runner_log.count(PUBLISH_RETRY) + stderr.count(PUBLISH_RETRY)
    result.storage_interruptions = runner_log.count(STORAGE_INTERRUPT)
    variables = newest_variables(remote_queue)
    result.bit_identical = bool(variables) and variables.keys() == reference.variables.keys() and all(
        np.array_equal(variables[key], reference.variables[key]) for key in reference.variables
    )
    rows = read_history(job.paths.history)
    epochs = [row["epoch"] for row in rows]
    result.history_ok = rows == reference.history and len(epochs) == len(set(epochs))
    result.exported = (job.paths.final / "model.keras").is_file()
