"""A kill harness driven by what happened, not by the clock, and the checks that prove a resume was exact.

Each session is a real `runner work` process. It dies in one of two ways, both chosen by what the job did:

* at an exact point (:mod:`runner.killpoints`): inside a publish (between copy and manifest, between manifest
  and rename, after the rename), after a snapshot, a state write, the history rewrite or the export. The process
  SIGKILLs itself there and leaves a line in a kill log, so the harness knows the kill landed and where;
* after the session's n-th ``checkpoint`` event (a commit), at a random delay: in training.

When a session has died, the harness records what the next claim must restore: the newest committed checkpoint
that verifies, read from the job folder itself. :func:`check_resumes` then goes over the job's events: every
kill after a commit was followed by a claim that resumed from exactly that checkpoint, and whose first new
checkpoint lies beyond it (nothing before the resume point trained again). :func:`assert_same_result` compares
the end with an uninterrupted run: variables bit for bit, the whole training state, history.csv, TensorBoard
and the metrics of `runner status --json`. Every test also asserts that its kills landed where it meant them
to (counts by phase, mid-epoch resumes); a run whose kills all missed fails.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runner.checkpoints import CheckpointStore
from runner.errors import CheckpointCorrupt
from runner.history import read_history
from runner.job import Job, JobStatus
from runner.killpoints import HOLD_AT_ENV, KILL_AT_ENV, KILL_LOG_ENV, release_file
from tests.conftest import run_cli, start_cli, start_python
from tests.support.keras_jobs import job_of, submit_keras_spec
from tests.support.tensorboard_files import tensorboard_scalars
from tests.support.warm_start import COLD_START_ENV

PUBLISH_POINTS = ("commit-copied", "commit-manifest", "commit-renamed", "state-written", "history-written")
"""Kill points inside publishing a checkpoint."""

SESSION_TIMEOUT_S = 240.0

REPORT_ENV = "RUNNER_KILL_REPORT"
"""A file that gets one JSON line per kill test (what landed where, the resumes): scripts/reliability_report.py."""


@dataclass(frozen=True)
class Kill:
    """How one session is to die: at ``point`` (its ``nth`` time), or ``delay_s`` after its ``nth`` commit."""

    point: str | None = None
    nth: int = 1
    delay_s: tuple[float, float] = (0.0, 0.3)

    @staticmethod
    def at(point: str, nth: int = 1) -> Kill:
        """Die exactly at a kill point, the ``nth`` time this session reaches it."""
        return Kill(point=point, nth=nth)

    @staticmethod
    def after_commit(nth: int = 1, delay_s: tuple[float, float] = (0.0, 0.3)) -> Kill:
        """Die at a random moment ``delay_s`` after this session's ``nth`` committed checkpoint: in training."""
        return Kill(nth=nth, delay_s=delay_s)

    @property
    def meant_phase(self) -> str:
        return self.point or "training"


@dataclass
class Session:
    """What one killed session did and what the next claim must do."""

    kill: Kill
    landed: bool = False
    """SIGKILLed where it was meant to be (kill log or commit count), with the job not done."""
    phase: str = "missed"
    generation: int | None = None
    """The claim generation the session ran under."""
    must_restore: str | None = None
    """The newest committed checkpoint that verified right after the kill."""
    status: dict[str, Any] = field(default_factory=dict)
    """`runner status --json`'s record of the job right after the kill."""
    finished_job: bool = False
    """The kill came too late: this session finished the job, so no later claim restores anything."""


class KillRun:
    """Sessions of `runner work` on one queue, each killed by plan, then one that runs to the end."""

    def __init__(
        self,
        queue: Path,
        name: str,
        env: dict[str, str],
        *,
        rng: random.Random,
        folder: Path,
        command: tuple[str, ...] | None = None,
    ) -> None:
        self.queue, self.name, self.env, self.rng = queue, name, env, rng
        self.kill_log = folder / "kills.jsonl"
        self.sessions: list[Session] = []
        self.command = command
        """What a session runs (``python`` and these arguments); ``None``: `runner work` on the queue."""

    def _start(self, env: dict[str, str]) -> subprocess.Popen[str]:
        if self.command is None:
            return start_cli("work", "--queue", str(self.queue), env=env)
        return start_python(*self.command, env=env)

    @property
    def job(self) -> Job:
        return job_of(self.queue, self.name)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [event for event in self.job.events.read() if kind is None or event["event"] == kind]

    def kills_logged(self) -> list[dict[str, Any]]:
        if not self.kill_log.exists():
            return []
        return [json.loads(line) for line in self.kill_log.read_text().splitlines() if line.strip()]

    def session(self, kill: Kill) -> Session:
        """Run one session and kill it as planned; record where it died and what must be restored next."""
        record = Session(kill)
        env = dict(self.env)
        env[KILL_LOG_ENV] = str(self.kill_log)
        if kill.point:
            env[KILL_AT_ENV] = f"{kill.point}:{kill.nth}"
        claims_before = len(self.events("claimed"))
        commits_before = len(self.events("checkpoint"))
        logged_before = len(self.kills_logged())
        worker = self._start(env)
        try:
            if kill.point:
                worker.wait(timeout=SESSION_TIMEOUT_S)
            else:
                self._kill_after_commits(worker, commits_before + kill.nth, kill.delay_s)
        finally:
            _reap(worker)
        claims = self.events("claimed")[claims_before:]
        record.generation = claims[-1]["generation"] if claims else None
        done = self.job.read_state().status is JobStatus.DONE
        record.finished_job = done
        if worker.returncode == -signal.SIGKILL and not done:
            logged = [entry for entry in self.kills_logged()[logged_before:] if entry["action"] == "kill"]
            if kill.point:
                record.landed = [entry["point"] for entry in logged] == [kill.point]
            else:
                record.landed = len(self.events("checkpoint")) >= commits_before + kill.nth
            record.phase = kill.meant_phase if record.landed else "missed"
        record.must_restore = newest_verified(self.job)
        record.status = status_record(self.queue, self.name, self.env)
        self.sessions.append(record)
        return record

    def held_session(self, point: str, nth: int, while_held: Callable[[], None]) -> subprocess.CompletedProcess[str]:
        """Run one session that waits at ``point`` (its ``nth`` time) while ``while_held`` breaks something, then
        goes on to whatever end it comes to; its exit code and output."""
        env = dict(self.env)
        env[KILL_LOG_ENV] = str(self.kill_log)
        env[HOLD_AT_ENV] = f"{point}:{nth}"
        release = Path(release_file(str(self.kill_log)))
        release.unlink(missing_ok=True)
        logged_before = len(self.kills_logged())
        worker = self._start(env)
        try:
            deadline = time.monotonic() + SESSION_TIMEOUT_S
            while not [e for e in self.kills_logged()[logged_before:] if e["action"] == "hold"]:
                assert worker.poll() is None, f"the worker ended before reaching {point}: {worker.communicate()}"
                assert time.monotonic() < deadline, f"the worker never reached {point}"
                time.sleep(0.01)
            while_held()
            release.touch()
            out, err = worker.communicate(timeout=SESSION_TIMEOUT_S)
        finally:
            _reap(worker)
        return subprocess.CompletedProcess(worker.args, worker.returncode, out, err)

    def _kill_after_commits(self, worker: subprocess.Popen[str], commits: int, delay_s: tuple[float, float]) -> None:
        deadline = time.monotonic() + SESSION_TIMEOUT_S
        while len(self.events("checkpoint")) < commits and worker.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no checkpoint number {commits} within {SESSION_TIMEOUT_S:.0f}s")
            time.sleep(0.01)
        time.sleep(self.rng.uniform(*delay_s))
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)

    def finish(self) -> subprocess.CompletedProcess[str]:
        """One undisturbed session to the end; it must finish the job."""
        if self.command is None:
            result = run_cli("work", "--queue", str(self.queue), env=self.env, timeout=600)
        else:
            worker = self._start(self.env)
            out, err = worker.communicate(timeout=600)
            result = subprocess.CompletedProcess(worker.args, worker.returncode, out, err)
        assert result.returncode == 0, result.stderr[-3000:]
        assert self.job.read_state().status is JobStatus.DONE
        return result

    # --- evidence -------------------------------------------------------------------------------------------

    def landed(self, phase: str | None = None) -> list[Session]:
        """Sessions whose kill landed (in ``phase``)."""
        return [s for s in self.sessions if s.landed and (phase is None or s.phase == phase)]

    def resumes(self) -> list[dict[str, Any]]:
        return self.events("resumed")

    def mid_epoch_resumes(self) -> int:
        return sum(1 for event in self.resumes() if event["step"] > 0)

    def boundary_resumes(self) -> int:
        return sum(1 for event in self.resumes() if event["step"] == 0 and event["epoch"] > 0)

    def report(self) -> None:
        """Append what this run did to ``$RUNNER_KILL_REPORT``, when set, for the reliability report."""
        if not (path := os.environ.get(REPORT_ENV)):
            return
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].removesuffix(" (call)")
        record = {
            "test": test,
            "sessions": len(self.sessions) + 1,
            "landed": [s.phase for s in self.sessions if s.landed],
            "missed": [s.kill.meant_phase for s in self.sessions if not s.landed],
            "mid_epoch_resumes": self.mid_epoch_resumes(),
            "boundary_resumes": self.boundary_resumes(),
            "fallbacks": len(self.events("fallback")),
            "kept_published": len(self.events("kept-snapshot-published")),
            "generation": self.job.read_state().generation,
        }
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def summary(self) -> str:
        phases = [f"{s.phase}{'' if s.landed else ' (missed)'}" for s in self.sessions]
        return (
            f"sessions: {phases}; resumed: {[(e['checkpoint'], e['step']) for e in self.resumes()]}; "
            f"fallbacks: {len(self.events('fallback'))}"
        )


def _reap(worker: subprocess.Popen[str]) -> None:
    if worker.returncode is not None:
        return
    if worker.poll() is None:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.communicate(timeout=60)


def newest_verified(job: Job) -> str | None:
    """The id of the newest committed checkpoint that matches its manifest: what a restore must take."""
    keep = job.read_spec().checkpoint.keep if job.paths.spec.exists() else 2  # a job of own code keeps 2 here
    store = CheckpointStore(job, keep=keep)
    for info in store.committed():
        try:
            store.verify(info)
        except CheckpointCorrupt:
            continue
        return info.id
    return None


def status_record(queue: Path, name: str, env: dict[str, str]) -> dict[str, Any]:
    """The job's record in a real `runner status --json`."""
    result = run_cli("status", "--json", "--queue", str(queue), env=env)
    assert result.returncode == 0, result.stderr
    (record,) = [row for row in json.loads(result.stdout) if row["name"] == name]
    return record


def check_resumes(run: KillRun) -> None:
    """Every kill after a commit led to a resume from the newest verified checkpoint, with nothing redone."""
    events = run.job.events.read()
    assert not [e for e in events if e["event"] == "fallback"], "a kill left a checkpoint that does not verify"
    for session in run.sessions:
        if session.must_restore is None or session.generation is None or session.finished_job:
            continue
        restores = [e for e in events if e["event"] in ("resumed", "started") and e["generation"] > session.generation]
        assert restores, f"nothing restored after the kill in {session.phase}"
        restore = restores[0]
        assert restore["event"] == "resumed", f"after a kill in {session.phase} the next claim started afresh"
        assert restore["checkpoint"] == session.must_restore, (
            f"after a kill in {session.phase} the next claim resumed from {restore['checkpoint']}, "
            f"not from the newest verified {session.must_restore}"
        )
        resumed_at = (restore["epoch"], restore["step"])
        later = [e for e in events if e["event"] == "checkpoint" and e["generation"] == restore["generation"]]
        if later:
            assert (later[0]["epoch"], later[0]["step"]) > resumed_at, (
                f"generation {restore['generation']} resumed at {resumed_at} and then checkpointed "
                f"{(later[0]['epoch'], later[0]['step'])}: work before the resume point was done again"
            )


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run of the same job: what every killed run must end with."""

    variables: dict[str, np.ndarray]
    training_state: dict[str, Any]
    history: list[dict[str, str]]
    tensorboard: dict[str, dict[str, list[tuple[int, float]]]]
    status_metrics: dict[str, float]

    @staticmethod
    def of(queue: Path, name: str, env: dict[str, str]) -> Reference:
        job = job_of(queue, name)
        return Reference(
            newest_variables(job),
            newest_training_state(job),
            read_history(job.paths.history),
            tensorboard_runs(job),
            status_record(queue, name, env)["metrics"],
        )


def uninterrupted_run(
    folder: Path, data: Path, name: str, env: dict[str, str], **overrides: Any
) -> tuple[Reference, Path]:
    """Submit the job of :func:`~tests.support.keras_jobs.keras_spec` (with ``overrides``) into a queue in
    ``folder`` and run it to the end with one `runner work`: what its killed runs must end as, and its queue."""
    queue = folder / "queue"
    submit_keras_spec(folder, queue, data, name, env, **overrides)
    # In a new interpreter: the killed runs, forked from a warm starter, must end as a cold one does.
    result = run_cli("work", "--queue", str(queue), env={**env, COLD_START_ENV: "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return Reference.of(queue, name, env), queue


def newest_variables(job: Job) -> dict[str, np.ndarray]:
    newest = CheckpointStore(job, keep=2).newest()
    assert newest is not None, "no checkpoint"
    with np.load(newest.path / "variables.npz") as arrays:
        return {key: arrays[key].copy() for key in arrays.files}


# Fields of a snapshot's state.json that differ between runs by nature: wall time and the claim that wrote it.
_PER_RUN_FIELDS = ("elapsed_s", "generation")


def newest_training_state(job: Job) -> dict[str, Any]:
    """The newest checkpoint's training state (position, history, best, batch size...)."""
    newest = CheckpointStore(job, keep=2).newest()
    assert newest is not None, "no checkpoint"
    state = json.loads((newest.path / "state.json").read_text())
    return {key: value for key, value in state.items() if key not in _PER_RUN_FIELDS}


def tensorboard_runs(job: Job) -> dict[str, dict[str, list[tuple[int, float]]]]:
    paths = job.paths
    return {
        "train": tensorboard_scalars(paths.tensorboard_train),
        "validation": tensorboard_scalars(paths.tensorboard_validation),
    }


def assert_same_result(run: KillRun, reference: Reference) -> None:
    """The killed run ends exactly as the uninterrupted one: bits, state, history, TensorBoard, status."""
    job = run.job
    variables = newest_variables(job)
    assert variables.keys() == reference.variables.keys()
    for key, expected in reference.variables.items():
        assert np.array_equal(variables[key], expected), f"{key} differs from the uninterrupted run"
    assert newest_training_state(job) == reference.training_state
    history = read_history(job.paths.history)
    assert [row["epoch"] for row in history] == [row["epoch"] for row in reference.history], "epochs in history.csv"
    assert history == reference.history
    assert tensorboard_runs(job) == reference.tensorboard
    final = status_record(run.queue, run.name, run.env)
    assert final["state"] == "done", final
    assert final["metrics"] == reference.status_metrics, f"status {final} vs uninterrupted {reference.status_metrics}"
    for session in run.sessions:  # status after each kill showed the uninterrupted run's numbers for its epoch
        epoch = session.status.get("epoch") or 0
        if epoch:
            row = reference.history[epoch - 1]
            expected = {key: float(value) for key, value in row.items() if key != "epoch" and value != ""}
            assert session.status["metrics"] == expected, f"status after the kill in {session.phase}"
