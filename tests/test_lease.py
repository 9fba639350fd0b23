"""The lease and claim fencing, with real processes that race, die, freeze and come back.

Competing holders are real processes (helpers in ``tests/support/lease_*.py``), killed and frozen with real
SIGKILL / SIGSTOP / SIGCONT. No assertion is on wall-clock durations: waits are bounded by generous timeouts,
and "immediate" takeover is proved by a 60 s lease being taken over at all while the test runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runner import defaults
from runner.checkpoints import CheckpointStore, parse_checkpoint_id
from runner.errors import Fenced, RunnerError, UsageError
from runner.job import JobStatus, worker_identity
from runner.lease import JobLease, LeaseHolder, lease_duration_from, read_holder
from runner.queue import Claim, Queue
from tests.drivesim import DriveSim
from tests.drivesim.fixtures import SimFactory, requires_fuse

from .conftest import REPO, make_spec, runner_env

SUPPORT = Path(__file__).resolve().parent / "support"
WAIT_S = 30.0
"""Upper bound for anything a test waits for; generous so that a loaded 2-core machine never trips it."""


# --- real child processes -------------------------------------------------------------------------------------


class Child:
    """A helper script running as a real process, its output (stdout and stderr) collected line by line."""

    def __init__(self, script: str, *args: object, stdin: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SUPPORT / script), *map(str, args)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=runner_env(),
            cwd=REPO,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<eof>")
            self._changed.notify_all()

    def wait_line(self, prefix: str, *, start: int = 0, timeout: float = WAIT_S) -> str:
        """The first line at index ``start`` or later that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if line.startswith(prefix):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or "<eof>" in self.lines:
                    raise AssertionError(f"{self.pid} never printed {prefix!r}; its output: {self.lines}")
                self._changed.wait(left)

    def send(self, line: str) -> None:
        """Write one line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        """SIGSTOP, and wait until the kernel shows the process stopped (so no heartbeat is half done)."""
        os.kill(self.pid, signal.SIGSTOP)
        _wait_until(lambda: _proc_state(self.pid) in {"T", "t"}, f"{self.pid} to stop")

    def cont(self) -> None:
        """SIGCONT."""
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap, so that its pid is really gone."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=WAIT_S)

    def finish(self, timeout: float = WAIT_S) -> int:
        """Wait for the child to exit by itself; its exit code."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.pid} did not exit; its output: {self.lines}") from None

    def cleanup(self) -> None:
        """Kill the child whatever its state (a stopped one is continued first), and close its pipes."""
        if self.proc.poll() is None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    break
            self.proc.wait(timeout=WAIT_S)
        self._reader.join(timeout=WAIT_S)  # reads to EOF now that the child is gone
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    """Start helper scripts as real processes; every one is killed at the end, stopped ones included."""
    children: list[Child] = []

    def start(script: str, *args: object, stdin: bool = False) -> Child:
        child = Child(script, *args, stdin=stdin)
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            child.cleanup()


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rpartition(")")[2].split()[0]


def _wait_until(condition: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _holder(queue: Queue, name: str) -> LeaseHolder:
    holder = read_holder(queue.paths.job(name))
    assert holder is not None, "no lease marker"
    return holder


@pytest.fixture
def held_leases() -> Iterator[list[JobLease]]:
    """Leases taken in the test process; released at the end so no heartbeat thread outlives the test."""
    leases: list[JobLease] = []
    try:
        yield leases
    finally:
        for lease in leases:
            lease.release()


needs_signals = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGSTOP checks read /proc")


# --- several processes race -----------------------------------------------------------------------------------


@pytest.mark.slow
@needs_signals
def test_racing_processes_hold_the_lease_one_at_a_time(
    queue: Queue, tmp_path: Path, spawn: Callable[..., Child]
) -> None:
    queue.submit(make_spec("race"))
    workdir = tmp_path / "race"
    (workdir / "tried").mkdir(parents=True)
    contenders = [spawn("lease_race.py", queue.root, "race", workdir, 4, 0.3) for _ in range(4)]
    for child in contenders:
        child.wait_line("ready")
    (workdir / "go").touch()
    for child in contenders:
        child.wait_line("done")
        assert child.finish() == 0

    holds = (workdir / "holds.log").read_text().splitlines()
    pids = {child.pid for child in contenders}
    # One hold at a time: every start is followed by the same process's end, never by another start.
    assert len(holds) == 2 * len(contenders), holds
    for start, end in zip(holds[::2], holds[1::2]):
        assert start.startswith("start ") and end == f"end {start.split()[1]}", holds
    assert {int(line.split()[1]) for line in holds[::2]} == pids
    # The race was contended: every process but the first winner was refused while someone held the lease.
    assert len(os.listdir(workdir / "tried")) == len(contenders) - 1
    assert read_holder(queue.paths.job("race")) is None  # the last holder released it


# --- a holder that dies -----------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_signals
def test_killed_holder_on_this_host_is_taken_over_at_once(
    queue: Queue, spawn: Callable[..., Child], held_leases: list[JobLease]
) -> None:
    queue.submit(make_spec("crash"))
    long = Queue(queue.root, lease_duration=60.0)
    holder_process = spawn("lease_hold.py", long.root, "crash", 60.0, 120)
    identity = holder_process.wait_line("held ").split()[1]

    alive = _holder(long, "crash")
    assert (alive.host, alive.pid) == (socket.gethostname(), holder_process.pid)
    assert alive.describe() == identity
    assert not alive.dead_on_this_host()
    contender = long.lease("crash")
    held_leases.append(contender)
    assert not contender.try_acquire()  # a live holder keeps its lease

    holder_process.kill()
    dead = _holder(long, "crash")
    assert dead.pid == holder_process.pid  # the marker outlives its writer
    assert dead.dead_on_this_host()
    # With a 60 s lease, succeeding at all while the test runs means the dead holder was not waited out.
    deadline = time.monotonic() + 5.0
    while not contender.try_acquire():
        assert time.monotonic() < deadline, "a dead holder on this host was not taken over"
        time.sleep(0.05)
    assert contender.held
    assert _holder(long, "crash").pid == os.getpid()


def _unshare_works() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare --pid` (root on Linux)")
def test_dead_holder_is_recognised_inside_a_container_pid_namespace(queue: Queue) -> None:
    # Colab runtimes are containers: their processes live in a PID namespace of their own, and filelock then
    # writes the marker's host as "<hostname>?pidns-<inode>".
    queue.submit(make_spec("boxed"))
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(SUPPORT / "lease_namespace.py"),
         str(queue.root), "boxed"],
        capture_output=True, text=True, env=runner_env(), cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["took_over"], seen  # filelock itself knows the holder died
    assert seen["alive"]["dead"] is False, seen
    assert seen["killed"]["dead"] is True, seen  # else status shows a dead local worker as running
    assert seen["alive"]["describe"] == seen["child_said"][1], seen  # host:pid, as the worker names itself


# --- a holder that freezes --------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_signals
def test_frozen_holder_is_taken_over_after_the_lease_duration_with_a_countdown(
    queue: Queue, spawn: Callable[..., Child], held_leases: list[JobLease]
) -> None:
    queue.submit(make_spec("frozen"))
    short = Queue(queue.root, lease_duration=3.0)
    holder_process = spawn("lease_hold.py", short.root, "frozen", 3.0, 120)
    identity = holder_process.wait_line("held ").split()[1]

    # Alive: its heartbeat changes the marker, and a contender waiting for it to go silent gives up.
    first = _holder(short, "frozen")
    _wait_until(lambda: _holder(short, "frozen").marker_key != first.marker_key, "a heartbeat")
    patient = short.lease("frozen")
    held_leases.append(patient)
    assert patient.wait_for_takeover(report=lambda holder, left: None, poll_s=0.1) is False
    assert not patient.held

    holder_process.stop()
    before, seen_at = _holder(short, "frozen"), time.time()
    time.sleep(0.5)
    after = _holder(short, "frozen")
    assert after.marker_key == before.marker_key  # no heartbeat while stopped
    assert after.heartbeat_age(time.time()) > before.heartbeat_age(seen_at)
    assert not after.dead_on_this_host()  # stopped is not dead

    contender = short.lease("frozen")
    held_leases.append(contender)
    assert not contender.try_acquire()  # silent, but not yet for the lease duration
    reports: list[tuple[LeaseHolder | None, float]] = []
    assert contender.wait_for_takeover(report=lambda holder, left: reports.append((holder, left)), poll_s=0.25)
    assert contender.held
    assert _holder(short, "frozen").pid == os.getpid()

    assert len(reports) >= 2, reports
    countdown = [left for _, left in reports]
    assert all(later <= earlier for earlier, later in zip(countdown, countdown[1:])), countdown
    assert countdown[0] > countdown[-1] >= 0.0 and countdown[0] <= 3.0, countdown
    assert {holder.describe() if holder else None for holder, _ in reports} == {identity}

    # Resumed, the old holder notices that its marker was replaced.
    holder_process.cont()
    lost = holder_process.wait_line("lost ")
    assert lost.split()[1] in {"owner-changed", "marker-missing"} and lost.endswith("held=False"), lost
    assert contender.held and contender.lost is None


# --- fencing ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_signals
def test_resumed_stale_holder_is_fenced_and_commits_nothing(
    queue: Queue, spawn: Callable[..., Child], held_leases: list[JobLease]
) -> None:
    queue.submit(make_spec("fenced"))
    short = Queue(queue.root, lease_duration=2.5)
    old = spawn("lease_commit.py", short.root, "fenced", 2.5, 100, stdin=True)
    assert old.wait_line("generation ") == "generation 1"
    before_stop = []
    for _ in range(2):
        start = len(old.lines)
        old.send("go")
        before_stop.append(old.wait_line("committed ", start=start).split()[1])

    # Stopped between two commits (it waits on stdin), as a frozen Colab VM would be.
    old.stop()
    lease = short.lease("fenced")
    held_leases.append(lease)
    assert lease.wait_for_takeover(report=lambda holder, left: None, poll_s=0.25)
    claim = short.claim("fenced", lease)
    assert claim is not None and claim.generation == 2
    store = CheckpointStore(claim.job, keep=100, fence=claim.fence)
    source = queue.root.parent / "new-source"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"generation 2")
    ours = store.commit(source, generation=2, epoch=3, step=0)

    resumed_at = len(old.lines)
    old.cont()
    for _ in range(3):
        old.send("go")
    fenced = old.wait_line("fenced ", start=resumed_at)
    lost = old.wait_line("lost ", start=resumed_at)
    assert old.finish() == 0
    after_resume = old.lines[resumed_at:]
    assert not [line for line in after_resume if line.startswith("committed")], after_resume
    assert "generation 2 has claimed" in fenced or "lease lost" in fenced, fenced
    assert lost.split()[1] in {"owner-changed", "marker-missing"}, lost  # JobLease.lost seen in the holder

    on_disk = [parse_checkpoint_id(name) for name in os.listdir(claim.job.paths.checkpoints)]
    assert None not in on_disk, "a temporary or stray folder was left in checkpoints/"
    stale = {checkpoint for checkpoint in on_disk if checkpoint[0] == 1}
    assert {(1, epoch, 0) for epoch in (1, 2)} == stale  # exactly what it committed before it was stopped
    assert max(epoch for _, epoch, _ in stale) <= max(parse_checkpoint_id(i)[1] for i in before_stop)
    assert store.newest() == ours
    logged = [e["checkpoint"] for e in claim.job.events.read() if e["event"] == "checkpoint" and e["generation"] == 1]
    assert logged == before_stop

    state = claim.job.read_state()
    assert state.generation == 2
    assert state.worker == worker_identity()
    assert state.status is JobStatus.RUNNING
    claim.fence()  # the new claim is still the current one


def test_lost_lease_fences_its_claim_in_process(queue: Queue, held_leases: list[JobLease]) -> None:
    queue.submit(make_spec("gone"))
    short = Queue(queue.root, lease_duration=0.9)  # heartbeat every 0.3 s
    lease = short.lease("gone")
    held_leases.append(lease)
    assert lease.try_acquire()
    claim = short.claim("gone", lease)
    assert claim is not None
    claim.fence()
    assert lease.held and lease.lost is None

    lease.paths.lease.unlink()
    _wait_until(lambda: lease.lost is not None, "the heartbeat to notice the missing marker")
    assert lease.lost.reason == "marker-missing"
    assert not lease.held
    with pytest.raises(Fenced, match="lease lost"):
        claim.fence()
    with pytest.raises(Fenced):
        claim.update(epoch=1)
    assert claim.job.read_state().epoch == 0


def test_replaced_marker_is_reported_as_lost(queue: Queue, held_leases: list[JobLease]) -> None:
    queue.submit(make_spec("swapped"))
    lease = Queue(queue.root, lease_duration=0.9).lease("swapped")
    held_leases.append(lease)
    assert lease.try_acquire()
    marker = lease.paths.lease
    replacement = marker.with_name("lease.other")
    replacement.write_text(marker.read_text().replace(f"pid={os.getpid()}", "pid=1"))
    os.replace(replacement, marker)  # another worker's marker now stands at the lease path
    _wait_until(lambda: lease.lost is not None, "the heartbeat to notice the replaced marker")
    assert lease.lost.reason == "owner-changed"
    assert not lease.held


# --- read_holder and the lease duration -------------------------------------------------------------------------


def test_read_holder_without_marker_and_with_garbage(queue: Queue, held_leases: list[JobLease]) -> None:
    queue.submit(make_spec("marker"))
    paths = queue.paths.job("marker")
    assert read_holder(paths) is None
    lease = queue.lease("marker")
    held_leases.append(lease)
    assert lease.try_acquire()
    mine = read_holder(paths)
    assert mine is not None and (mine.host, mine.pid) == (socket.gethostname(), os.getpid())
    assert mine.describe() == worker_identity()
    assert not mine.dead_on_this_host()
    assert mine.heartbeat_age(mine.heartbeat_at - 5.0) == 0.0  # another clock behind never gives a negative age
    lease.release()
    assert read_holder(paths) is None

    paths.lease.write_text("half a mark")
    unknown = read_holder(paths)
    assert unknown is not None and unknown.pid == -1 and unknown.host == "unknown"
    assert not unknown.dead_on_this_host()


def test_lease_duration_from_environment() -> None:
    assert lease_duration_from({}) == defaults.LEASE_DURATION_S
    assert lease_duration_from({defaults.LEASE_DURATION_ENV: "2.5"}) == 2.5
    assert lease_duration_from({defaults.LEASE_DURATION_ENV: "120"}) == 120.0


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "nan", "inf", ""])
def test_lease_duration_from_rejects_non_positive_or_non_numbers(raw: str) -> None:
    with pytest.raises(UsageError) as raised:
        lease_duration_from({defaults.LEASE_DURATION_ENV: raw})
    assert repr(raw) in str(raised.value) and defaults.LEASE_DURATION_ENV in str(raised.value)
    assert isinstance(raised.value, RunnerError) and raised.value.exit_code == 2


@pytest.mark.parametrize("duration", [0.0, -1.0, math.nan, math.inf])
def test_job_lease_rejects_bad_durations(queue: Queue, duration: float) -> None:
    with pytest.raises(ValueError, match="lease duration must be positive"):
        JobLease(queue.paths.job("any"), duration=duration)


# --- Queue.claim --------------------------------------------------------------------------------------------------


def test_claims_increment_generation_and_count_restarts(queue: Queue) -> None:
    job, _ = queue.submit(make_spec("claimed"))

    first_lease = queue.lease("claimed")
    assert first_lease.try_acquire()
    first = queue.claim("claimed", first_lease)
    assert first is not None and (first.generation, first.resumed) == (1, False)
    state = job.read_state()
    assert (state.status, state.generation, state.restarts) == (JobStatus.RUNNING, 1, 0)
    assert state.worker == worker_identity()
    first_lease.release()  # the worker vanished: state.json still says running (interrupted)

    second_lease = queue.lease("claimed")
    assert second_lease.try_acquire()
    second = queue.claim("claimed", second_lease)
    assert second is not None and (second.generation, second.resumed) == (2, True)
    state = job.read_state()
    assert (state.status, state.generation, state.restarts) == (JobStatus.RUNNING, 2, 1)
    with pytest.raises(Fenced, match="generation 2"):
        first.update(epoch=1)  # the older claim can no longer write
    second.update(epoch=1)

    claimed = [event for event in job.events.read() if event["event"] == "claimed"]
    assert [(e["generation"], e["previous"], e["resumed"]) for e in claimed] == [
        (1, "queued", False),
        (2, "running", True),
    ]
    assert all(event["worker"] == worker_identity() for event in claimed)

    second.finish(JobStatus.DONE)
    second_lease.release()
    third_lease = queue.lease("claimed")
    assert third_lease.try_acquire()
    try:
        assert queue.claim("claimed", third_lease) is None  # a finished job is never trained again
    finally:
        third_lease.release()
    state = job.read_state()
    assert (state.status, state.generation, state.restarts) == (JobStatus.DONE, 2, 1)
    assert len([event for event in job.events.read() if event["event"] == "claimed"]) == 2


def test_a_contender_with_another_lease_duration_gets_a_usage_error(
    queue: Queue, held_leases: list[JobLease]
) -> None:
    queue.submit(make_spec("job-a"))
    holder = queue.lease("job-a")
    assert holder.try_acquire()
    held_leases.append(holder)
    contender = Queue(queue.root, lease_duration=queue.lease_duration * 2).lease("job-a")
    with pytest.raises(UsageError, match=defaults.LEASE_DURATION_ENV):
        contender.try_acquire()
    assert holder.held


def test_a_queue_on_drive_gets_the_longer_lease_unless_the_environment_says_otherwise() -> None:
    drive, local = Path("/content/drive/MyDrive/runner"), Path("/tmp/runner-queue")
    assert lease_duration_from({}, queue_root=drive) == defaults.LEASE_DURATION_DRIVE_S > defaults.LEASE_DURATION_S
    assert lease_duration_from({}, queue_root=local) == defaults.LEASE_DURATION_S
    assert lease_duration_from({"RUNNER_LEASE_DURATION": "12"}, queue_root=drive) == 12.0


def _release_during_an_outage(sim: DriveSim, **env: str) -> tuple[Queue, str]:
    """A separate process holds job-a's lease, Drive goes away for 3 s, the process releases and exits: its stderr."""
    queue = Queue(sim.mountpoint / "queue", lease_duration=2.0)
    queue.submit(make_spec("job-a"))
    holder = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "support" / "worker_hold_lease.py"), str(queue.root), "job-a", "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=runner_env(**env),
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    sim.outage(3.0)
    _, err = holder.communicate("", timeout=60)  # stdin closed: it releases during the outage, then exits
    assert holder.returncode == 0, err
    return queue, err


@requires_fuse
def test_releasing_a_lease_during_a_short_outage_removes_the_marker_once_drive_answers(tmp_path: Path) -> None:
    """A marker left behind would name this live process: no worker on this host could claim the job again."""
    with SimFactory(tmp_path) as mounts:
        sim = mounts()
        _, err = _release_during_an_outage(sim)
        assert "retrying in" in err, f"the release met no outage: the test proved nothing\n{err}"
        assert "it goes stale instead" not in err, err
        assert not (sim.remote / "queue" / "jobs" / "job-a" / "lease").exists()


@requires_fuse
def test_releasing_a_lease_while_drive_is_down_leaves_a_stale_marker_instead_of_raising(tmp_path: Path) -> None:
    with SimFactory(tmp_path) as mounts:
        sim = mounts()
        # A retry budget of 1 s gives up on the removal long before Drive is back.
        queue, err = _release_during_an_outage(sim, RUNNER_RETRY_BUDGET="1")
        assert "could not remove the lease marker" in err and "it goes stale instead" in err
        time.sleep(3.5)  # the outage we set is over
        marker = sim.remote / "queue" / "jobs" / "job-a" / "lease"
        assert marker.exists(), "the outage did not keep the marker in place: the test proved nothing"
        assert queue.lease("job-a").try_acquire(), "a dead holder's stale marker on this host was not taken over"


@requires_fuse
def test_claiming_through_a_short_drive_outage_waits_it_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Everything a worker does before training (list the queue, take the lease, read spec and state, claim)
    retries errno 107 instead of ending the worker: one such error, on the lease, used to end a whole session."""
    caplog.set_level("WARNING", logger="runner.storage")
    with SimFactory(tmp_path) as mounts:
        sim = mounts(cache_s=0.0)  # every call reaches the mount, and so the outage

        def through_an_outage(step: Callable[[], object]) -> object:
            before = sum(sim.stats()["outage"].values())
            sim.outage(1.0)
            result = step()
            assert sum(sim.stats()["outage"].values()) > before, f"{step} met no outage: the test proved nothing"
            return result

        queue = Queue(sim.mountpoint / "queue", lease_duration=30.0)
        queue.submit(make_spec("job-a"))
        views = through_an_outage(queue.views)
        job = through_an_outage(lambda: queue.job("job-a"))
        assert through_an_outage(job.read_spec).name == "job-a"  # type: ignore[attr-defined]
        lease = queue.lease("job-a")
        assert through_an_outage(lease.try_acquire)
        try:
            claim = through_an_outage(lambda: queue.claim("job-a", lease))
        finally:
            lease.release()  # before the unmount: the lease keeps its marker open
        assert isinstance(claim, Claim) and claim.generation == 1
        assert [view.name for view in views] == ["job-a"]  # type: ignore[attr-defined]
        assert any("retrying in" in record.getMessage() for record in caplog.records)


def test_an_empty_marker_is_left_alone_until_the_silent_lease_wait_takes_it_over(
    queue: Queue, held_leases: list[JobLease]
) -> None:
    """An empty marker is either one being written or, on a lagging mount, another VM's whose content has not
    arrived yet (taking it over at once let two VMs train one job): only the wait for a silent lease takes it."""
    queue.submit(make_spec("job-a"))
    paths = queue.lease("job-a").paths
    paths.lease.write_bytes(b"")
    lease = queue.lease("job-a")
    assert not lease.try_acquire(), "an empty marker was taken over at once"
    assert lease.wait_for_takeover(report=lambda holder, left: None, poll_s=0.2), "the silent wait did not take it"
    held_leases.append(lease)
    holder = read_holder(paths)
    assert holder is not None and holder.pid == os.getpid()


# --- a released lease whose last state write arrives late -------------------------------------------------------


def test_a_job_stored_as_running_with_its_lease_released_is_claimed_only_once_its_state_had_time_to_arrive(
    tmp_path: Path,
) -> None:
    """On Drive, a worker's last state write (done) can reach another VM after the removal of its lease marker
    that followed it. The claimer then finds the job running with no lease: it waits for the write instead of
    running a finished job again (seen as a job finished twice by two VMs, tests/test_two_vms.py)."""
    queue = Queue(tmp_path / "queue", lease_duration=4.0)
    queue.submit(make_spec("job-a"))
    first_lease = queue.lease("job-a")
    assert first_lease.try_acquire()
    first = queue.claim("job-a", first_lease)
    assert first is not None
    first_lease.release()  # the marker goes first; the done write is late
    late = threading.Timer(0.4, lambda: first.finish(JobStatus.DONE))
    late.start()
    second_lease = queue.lease("job-a")
    try:
        assert second_lease.try_acquire() and second_lease.found_free
        assert queue.claim("job-a", second_lease) is None, "a finished job was claimed again"
    finally:
        late.join()
        second_lease.release()
    assert queue.job("job-a").read_state().generation == 1


def test_a_job_still_running_after_the_wait_is_claimed(tmp_path: Path) -> None:
    """A marker lost for another reason (deleted by hand) must not keep the job from running for good."""
    queue = Queue(tmp_path / "queue", lease_duration=1.0)
    queue.submit(make_spec("job-a"))
    first_lease = queue.lease("job-a")
    assert first_lease.try_acquire() and queue.claim("job-a", first_lease) is not None
    first_lease.release()
    second_lease = queue.lease("job-a")
    try:
        assert second_lease.try_acquire()
        claim = queue.claim("job-a", second_lease)
        assert claim is not None and claim.generation == 2 and claim.resumed
    finally:
        second_lease.release()
