"""Several machines on one queue: three workers as three hosts, random kills and restarts, a frozen host.

Each worker is a real ``runner work`` process in a UTS namespace of its own whose hostname is its host's name
(``unshare --uts``, see tests/support/hosts_cluster.py), so between hosts the lease has only the lease duration
to go by, as between two Colab VMs on one Drive folder. What is checked comes from the job folders alone:
state.json, final/result.json, the committed checkpoints' manifests and events.jsonl, whose claims and
checkpoints tell which generation trained when (tests/support/hosts_timeline.py).

Durations are only ever lower bounds ("not taken over before the lease expired"); upper bounds are generous
timeouts, so a loaded machine makes the tests slower, never wrong.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest

from runner.checkpoints import CheckpointStore, parse_checkpoint_id
from runner.job import JobStatus
from runner.lease import read_holder
from runner.queue import Queue
from tests.conftest import make_spec, runner_env
from tests.support.counting_trainer import expected_value
from tests.support.hosts_cluster import Host, Run, host_of, pid_of, uts_namespaces_work
from tests.support.hosts_timeline import generations, late_commits, timeline_problems
from tests.support.worker_helpers import (
    events,
    result_value,
    state,
    temp_entries,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not uts_namespaces_work(), reason="needs `unshare --uts` (root on Linux)"),
]

LEASE_S = 3.0
"""Every worker of the queue gets this lease duration (they must all agree); heartbeats come every second."""
HEARTBEAT_S = LEASE_S / 3
HOSTS = ("host-a", "host-b", "host-c")
FENCED = re.compile(r"no longer current|fenced|lease lost", re.IGNORECASE)


def cluster(tmp_path: Path, queue: Queue, names: tuple[str, ...] = HOSTS) -> dict[str, Host]:
    """One :class:`Host` per name on ``queue``, all with the same short lease and the counting trainer."""
    env = runner_env(RUNNER_LEASE_DURATION=str(LEASE_S))
    return {name: Host(name, queue.root, env, tmp_path / "logs") for name in names}


def runs_report(hosts: dict[str, Host]) -> str:
    """Every run's fate and the end of its output, for assertion messages."""
    lines = []
    for host in hosts.values():
        for run in host.runs:
            fate = f"killed at {run.killed_at:.3f}" if run.killed_at else f"exit {run.returncode}"
            tail = " | ".join(" ".join(run.output().split()).split("job ")[-3:])[-300:]
            lines.append(f"{run.identity} started {run.started_at:.3f} {fate}: {tail}")
    return "\n".join(lines)


def manifests(queue: Queue, name: str) -> list[dict[str, Any]]:
    """The manifest of every committed checkpoint, each verified against its files."""
    job = queue.job(name)
    store = CheckpointStore(job, keep=job.read_spec().checkpoint.keep)
    return [store.verify(info).manifest for info in store.committed()]


def lease_holders(queue: Queue, names: list[str]) -> dict[str, str]:
    """Job name to ``host:pid`` of the worker that holds its lease now."""
    return {name: holder.describe() for name in names if (holder := read_holder(queue.job(name).paths)) is not None}


def start_hosts_that_are_up(queue: Queue, hosts: dict[str, Host], down: dict[str, tuple[float, dict[str, int]]]) -> None:
    """Start ``runner work`` on every host whose worker has ended, unless the host is down.

    A host is down (``down[name]``: until when, and the jobs it held with their claim generations) until each
    job it held has been claimed again elsewhere or is done, or the time is up.
    """
    for name, host in hosts.items():
        if host.running:
            continue
        if name in down:
            until, held = down[name]
            moved = all(
                (current := state(queue, job)).generation > generation or current.status is JobStatus.DONE
                for job, generation in held.items()
            )
            if time.monotonic() < until and not moved:
                continue
            del down[name]
        host.start()


def all_finished(queue: Queue, names: list[str]) -> bool:
    """Whether every job is done (a failed or cancelled one would be a bug here: nothing fails on purpose)."""
    return all(state(queue, name).status is JobStatus.DONE for name in names)


# --- three hosts, random kills ----------------------------------------------------------------------------------

JOBS = 5
MAX_KILLS = 8
CHAOS_S = 25.0
"""The random kills stop after MAX_KILLS or this many seconds, whichever comes first."""


def submit_jobs(queue: Queue, rng: random.Random) -> dict[str, tuple[int, int]]:
    """Five counting jobs of 2.2 to 4.8 s each, with mid-epoch checkpoints; returns each one's (epochs, steps)."""
    shapes = {}
    for index in range(JOBS):
        name, epochs, steps = f"job-{index}", rng.choice((4, 5)), 8
        params = {"steps": steps, "step_seconds": round(rng.uniform(0.07, 0.12), 3), "every_steps": 3}
        # keep 2 on some jobs, so that pruning runs across claims; keep all on others, for the late-commit check.
        keep = 2 if index % 2 else 1000
        queue.submit(make_spec(name, model={"params": params}, training={"epochs": epochs}, checkpoint={"keep": keep, "keep_done": keep}))
        shapes[name] = (epochs, steps)
    return shapes


@pytest.mark.parametrize("seed", [1, 2])
def test_three_hosts_with_random_kills_train_every_job_exactly_once_and_never_twice_at_a_time(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    queue = Queue(tmp_path / "queue", lease_duration=LEASE_S)
    shapes = submit_jobs(queue, rng)
    names = sorted(shapes)
    hosts = cluster(tmp_path, queue)
    down: dict[str, tuple[float, dict[str, int]]] = {}
    kills: list[Run] = []
    try:
        # Chaos: restart every host that is not down, SIGKILL a random one at a random moment (one that is
        # training, mostly), and either restart it at once (its successor on the same host takes over from the
        # dead pid) or leave it down until another host has waited out its lease and taken its job over (or
        # for a bounded time, when the other hosts are too busy to).
        chaos_end = time.monotonic() + CHAOS_S
        while len(kills) < MAX_KILLS and time.monotonic() < chaos_end and not all_finished(queue, names):
            start_hosts_that_are_up(queue, hosts, down)
            time.sleep(rng.uniform(0.8, 2.2))
            holders = lease_holders(queue, names)
            running = [name for name, host in hosts.items() if host.running]
            busy = [name for name in running if hosts[name].current.identity in holders.values()]
            first = not kills
            if not running or (first and not busy):
                continue
            victim = rng.choice(busy if busy and (first or rng.random() < 0.85) else running)
            identity = hosts[victim].current.identity
            kills.append(hosts[victim].kill())
            if first or rng.random() < 0.6:
                # The first victim stays down until another host has taken its job over, however long the others
                # are busy, so that every run has at least one takeover across hosts.
                held = {name: state(queue, name).generation for name, holder in holders.items() if holder == identity}
                down[victim] = (time.monotonic() + (90.0 if first else LEASE_S + 10.0), held)

        # Calm: every host runs `runner work` again whenever it has ended (once it is up again), until the whole
        # queue is done; then each ends on its own, nothing being runnable.
        calm_end = time.monotonic() + 120.0
        while not all_finished(queue, names):
            assert time.monotonic() < calm_end, f"the queue was not done in time\n{runs_report(hosts)}"
            start_hosts_that_are_up(queue, hosts, down)
            time.sleep(0.2)
        for host in hosts.values():
            if host.running:
                host.wait(timeout=60)
    finally:
        for host in hosts.values():
            host.cleanup()

    report = runs_report(hosts)
    killed = {run.pid: run for run in kills}
    for host in hosts.values():
        for run in host.runs:
            if run.pid not in killed:
                # A worker nobody killed ran its jobs to done (or found nothing to run): never fenced, never failed.
                assert run.returncode == 0, f"{run.identity} exited {run.returncode}\n{report}"
                assert "Traceback" not in run.output(), run.output()
                assert not FENCED.search(" ".join(run.output().split())), run.output()

    takeovers = {"same host": 0, "other host": 0}
    for name in names:
        epochs, steps = shapes[name]
        final = state(queue, name)
        assert final.status is JobStatus.DONE, name
        assert result_value(queue, name) == expected_value(epochs, steps), name
        found = events(queue, name)
        done = [event for event in found if event["event"] == "done"]
        assert len(done) == 1, f"{name} is done {len(done)} times: {done}"
        assert done[0]["generation"] == final.generation
        assert [event["event"] for event in found if event["event"] in {"failed", "cancelled"}] == []

        # No two claims at once: each generation claimed after the one before it wrote its last event.
        assert timeline_problems(found) == [], f"{name}\n{report}"
        claims = generations(found)
        assert max(claims) == final.generation
        assert final.restarts == sum(1 for entry in claims.values() if entry.resumed)

        # Nothing committed by a superseded generation, and every committed checkpoint verifies.
        on_disk = manifests(queue, name)
        assert on_disk, name
        assert late_commits(found, on_disk) == [], name
        assert temp_entries(queue, name) == []

        # Each claim resumed from the newest checkpoint committed before it (at least as new as any logged).
        logged: list[tuple[int, int, int]] = []
        for entry in sorted(claims.values(), key=lambda entry: entry.generation):
            resumed = parse_checkpoint_id(entry.resumed_from) if entry.resumed_from else None
            # (A claim killed before its restore logged nothing more than its claim.)
            if logged and (resumed is not None or entry.kinds() != ["claimed"]):
                assert resumed is not None and resumed >= max(logged), (
                    f"{name}: generation {entry.generation} resumed from {entry.resumed_from}, "
                    f"not from the newest of {sorted(logged)[-3:]}\n{found}"
                )
            if resumed is not None:
                assert resumed[0] < entry.generation, (name, entry.generation, entry.resumed_from)
            logged += [parse_checkpoint_id(e["checkpoint"]) for e in entry.events if e["event"] == "checkpoint"]

        # A killed worker on another host is taken over only once its lease has expired: its marker was last
        # refreshed at most one heartbeat before the kill, and the new host must see it unchanged for LEASE_S.
        ordered = [claims[number] for number in sorted(claims)]
        for earlier, later in itertools.pairwise(ordered):
            if host_of(earlier.worker) == host_of(later.worker):
                takeovers["same host"] += earlier.kinds()[-1] not in {"interrupted", "done"}
                continue
            takeovers["other host"] += 1
            run = killed.get(pid_of(earlier.worker))
            assert run is not None and run.killed_at is not None, (
                f"{name}: generation {later.generation} on {later.worker} took over from {earlier.worker}, "
                f"which nobody killed\n{report}"
            )
            assert later.claimed_at is not None
            waited = later.claimed_at - run.killed_at
            assert waited >= LEASE_S - HEARTBEAT_S - 0.1, (
                f"{name}: {later.worker} took over {waited:.2f}s after {earlier.worker} was killed, before the "
                f"{LEASE_S}s lease could have expired"
            )

    assert takeovers["other host"] >= 1, f"no job was taken over from a killed worker by another host\n{report}"
    print(
        f"\nseed {seed}: {JOBS} jobs, {len(kills)} kills, {sum(len(h.runs) for h in hosts.values())} worker runs, "
        f"takeovers of killed claims: {takeovers['same host']} on the same host, {takeovers['other host']} "
        f"from another host"
    )


# --- a frozen host is fenced ------------------------------------------------------------------------------------

FROZEN_PARAMS = {"steps": 8, "step_seconds": 0.15, "every_steps": 2}
FROZEN_EPOCHS = 4
"""About 4.8 s of training, a checkpoint every 0.3 s: host-a is frozen after ~1 s, host-b does the rest."""
FREEZE = Path(__file__).resolve().parent / "support" / "hosts_freeze.py"


@pytest.mark.parametrize("freeze", ["between-steps", "inside-a-fenced-state-write"])
def test_host_frozen_past_its_lease_is_fenced_on_resume_and_another_host_finishes(tmp_path: Path, freeze: str) -> None:
    """host-a is frozen (SIGSTOP) past its lease, host-b takes the job over, host-a is resumed (SIGCONT).

    between-steps: frozen by the test while its trainer sleeps through a step, just after a checkpoint.
    inside-a-fenced-state-write: host-a freezes itself between the generation check and the state.json write of
    its 4th ``record_checkpoint`` (tests/support/hosts_freeze.py), the one place where a check cannot help.
    Either way host-a must not write anything that counts once resumed.
    """
    queue = Queue(tmp_path / "queue", lease_duration=LEASE_S)
    queue.submit(
        make_spec("frozen", model={"params": FROZEN_PARAMS}, training={"epochs": FROZEN_EPOCHS}, checkpoint={"keep": 1000, "keep_done": 1000})
    )
    hosts = cluster(tmp_path, queue, ("host-a", "host-b"))
    host_a, host_b = hosts["host-a"], hosts["host-b"]
    paths = queue.job("frozen").paths

    def checkpoints_logged() -> list[str]:
        return [event["checkpoint"] for event in events(queue, "frozen", "checkpoint")]

    try:
        if freeze == "between-steps":
            run_a = host_a.start()
            wait_until(lambda: len(checkpoints_logged()) >= 3, "host-a's first checkpoints", timeout=60)
            # Freeze it while it sleeps through the steps after a checkpoint: not inside a commit or a write.
            seen = len(checkpoints_logged())
            wait_until(lambda: len(checkpoints_logged()) > seen, "host-a's next checkpoint", timeout=30, interval=0.002)
            time.sleep(FROZEN_PARAMS["step_seconds"] / 2)
            stopped_at = host_a.stop()
        else:
            run_a = host_a.start(program=(str(FREEZE), "5"))  # the claim's own write, then 4 records
            wait_until(host_a.frozen, "host-a to freeze inside its 4th state write", timeout=60, interval=0.002)
            stopped_at = time.time()
        time.sleep(0.05)
        before_stop = checkpoints_logged()
        assert len(before_stop) >= 4, before_stop
        holder = read_holder(paths)
        assert holder is not None and holder.describe() == run_a.identity

        # host-b starts after the freeze: it must watch the marker stay unchanged for the whole lease duration.
        run_b = host_b.start()
        claim_b = wait_until(
            lambda: next((e for e in events(queue, "frozen", "claimed") if e["generation"] == 2), None),
            "host-b's takeover",
            timeout=LEASE_S + 30,
        )
        assert claim_b["worker"] == run_b.identity
        assert claim_b["previous"] == "running" and claim_b["resumed"] is True
        assert claim_b["time"] - stopped_at >= 0.8 * LEASE_S, "host-b did not wait for host-a's lease to expire"
        assert claim_b["time"] - run_b.started_at >= 0.8 * LEASE_S
        assert host_a.running  # frozen, not dead: it was taken over by age alone

        # Resumed, host-a goes on until it tries to write: its claim is fenced.
        time.sleep(0.3)
        assert host_b.running, "host-b finished too fast to overlap with the resumed host-a"
        continued_at = host_a.cont()
        code_a = host_a.wait(timeout=30)
        holder, current = read_holder(paths), state(queue, "frozen")
        if host_b.running:
            # host-a's way out left host-b's claim alone: its lease marker and its generation in state.json.
            assert holder is not None and holder.describe() == run_b.identity, holder
            assert (current.generation, current.worker) == (2, run_b.identity), current
        code_b = host_b.wait(timeout=60)
    finally:
        for host in hosts.values():
            host.cleanup()

    found = events(queue, "frozen")
    report = f"{runs_report(hosts)}\n" + "\n".join(map(str, found))
    on_disk = manifests(queue, "frozen")
    # Nothing committed by generation 1 once generation 2 had claimed, and never two claims at once.
    assert late_commits(found, on_disk) == [], report
    assert timeline_problems(found) == [], report
    claims = generations(found)
    assert sorted(claims) == [1, 2], report
    assert claims[2].worker == run_b.identity, report

    output_a = " ".join(run_a.output().split())
    assert code_a == 1, output_a
    assert FENCED.search(output_a), output_a
    assert "generation 1" in output_a, output_a
    assert "Traceback" not in output_a, output_a
    assert run_a.ended_at is not None and run_a.ended_at >= continued_at
    assert code_b == 0, run_b.output()

    final = state(queue, "frozen")
    assert final.status is JobStatus.DONE
    assert final.generation == 2 and final.restarts == 1
    assert final.worker == run_b.identity
    assert result_value(queue, "frozen") == expected_value(FROZEN_EPOCHS, FROZEN_PARAMS["steps"])
    assert [(e["event"], e["generation"]) for e in found if e["event"] in {"done", "failed", "interrupted"}] == [
        ("done", 2)
    ]
    # Nothing of generation 1 was logged after the freeze, nor committed after it: every generation-1 checkpoint
    # on disk was created before host-a froze, and is one it logged before the freeze.
    assert all(event["time"] <= stopped_at for event in claims[1].events), report
    assert checkpoints_logged()[: len(before_stop)] == before_stop
    first = [manifest for manifest in on_disk if manifest["generation"] == 1]
    assert sorted(manifest["id"] for manifest in first) == sorted(before_stop)
    assert all(manifest["created_at"] <= stopped_at for manifest in first)
    assert temp_entries(queue, "frozen") == []
    # host-b resumed from host-a's newest pre-freeze checkpoint, and no later claim ever resumed from a checkpoint
    # of generation 1 made after the freeze (none was committed).
    assert claims[2].resumed_from == max(before_stop, key=parse_checkpoint_id)
    second = [manifest for manifest in on_disk if manifest["generation"] == 2]
    assert second and all(manifest["created_at"] >= claim_b["time"] - 0.002 for manifest in second)
    print(
        f"\nfrozen {freeze}: host-b claimed {claim_b['time'] - stopped_at:.2f}s after host-a froze; host-a fenced "
        f"on resume (exit {code_a}); host-b finished (exit {code_b}); generation-1 checkpoints {len(first)}, "
        f"generation-2 {len(second)}"
    )
