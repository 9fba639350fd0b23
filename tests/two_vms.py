"""Two VMs on one Drive: two `runner work`s on one queue, each through its own simulated Drive mount.

Each VM is a :class:`DriveSim` mount of one remote folder with its own write-back cache (its changes reach Drive
``push_lag_s`` later) and its own view of the others' changes (they show up ``pull_lag_s`` after reaching
Drive), and a worker in its own UTS namespace (another host name, so neither takes over the other's lease as a
dead local process). The jobs use the counting trainer (tests/support/counting_trainer.py), which checkpoints
through the real store, so a run takes seconds and its result is known.

:func:`run` returns what happened, read from the workers' own output, time-stamped as it appears (the job folder's
events are appended by both VMs and Drive keeps the last upload of a file, so they can lose lines), and from
Drive after both mounts are down: which claims ran each job and when, how long two ran the same job at once,
jobs finished more than once, restores of a checkpoint written by a claim that was fenced, and each job's result.
``python tests/two_vms.py`` measures a grid of lags, lease durations and start offsets and prints the table;
``--write-docs`` puts it into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.checkpoints import parse_checkpoint_id
from tests.conftest import run_cli, runner_env, write_spec
from tests.drivesim.fixtures import SimFactory
from tests.support.counting_trainer import expected_value
from tests.support.hosts_cluster import Host

CLAIMED = re.compile(r"(?:starting|resuming) job '([^']+)' \(claim generation (\d+)\)")
RESTORED = re.compile(r"resumed '([^']+)' from (g\d+-e\d+-s\d+)")
DONE = re.compile(r"job '([^']+)' done")
FENCED = re.compile(r"job '([^']+)': claim generation (\d+) is no longer current")
LOST = re.compile(r"job '([^']+)': lease lost")
STOPPED = re.compile(r"job '([^']+)' (?:stopped|failed|cancelled|interrupted)")


@dataclass(frozen=True)
class Setup:
    """One two-VM run."""

    push_lag_s: float
    pull_lag_s: float
    lease_s: float
    stagger_s: float = 0.0
    """VM B's worker starts this long after VM A's."""
    jobs: int = 3
    epochs: int = 3
    steps: int = 4
    step_s: float = 0.25

    @property
    def lag_s(self) -> float:
        """From a write on one VM to the other VM seeing it."""
        return self.push_lag_s + self.pull_lag_s


@dataclass
class Claim:
    host: str
    job: str
    generation: int
    start: float
    end: float | None = None
    ended: str = "exit"
    restored: str | None = None


@dataclass
class Result:
    setup: Setup
    claims: list[Claim] = field(default_factory=list)
    done_lines: dict[str, int] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    results_ok: bool = False
    seconds: float = 0.0

    def overlap_s(self, job: str) -> float:
        """Seconds during which claims on two VMs ran ``job`` at once."""
        mine = [c for c in self.claims if c.job == job and c.end is not None]
        total = 0.0
        for index, first in enumerate(mine):
            for second in mine[index + 1 :]:
                if first.host != second.host:
                    total += max(0.0, min(first.end, second.end) - max(first.start, second.start))  # type: ignore[arg-type]
        return total

    @property
    def max_overlap_s(self) -> float:
        return max((self.overlap_s(job) for job in self.done_lines | self.states), default=0.0)

    @property
    def finished_twice(self) -> list[str]:
        return [job for job, count in self.done_lines.items() if count > 1]

    @property
    def generation_collisions(self) -> int:
        """Claims of one job that took the same generation on two VMs (each VM's exclusive create succeeded)."""
        seen: dict[tuple[str, int], set[str]] = {}
        for claim in self.claims:
            seen.setdefault((claim.job, claim.generation), set()).add(claim.host)
        return sum(1 for hosts in seen.values() if len(hosts) > 1)

    @property
    def fenced_restores(self) -> list[str]:
        """Restores of a checkpoint whose generation only fenced claims had (a stale claim's work taken up)."""
        bad = []
        for claim in self.claims:
            if claim.restored is None:
                continue
            parsed = parse_checkpoint_id(claim.restored)
            assert parsed is not None
            owners = [c for c in self.claims if c.job == claim.job and c.generation == parsed[0]]
            if owners and all(owner.ended == "fenced" for owner in owners):
                bad.append(f"{claim.job}: {claim.host} g{claim.generation} restored {claim.restored}")
        return bad

    def row(self) -> dict:
        return {
            "lag_s": self.setup.lag_s,
            "lease_s": self.setup.lease_s,
            "stagger_s": self.setup.stagger_s,
            "claims": len(self.claims),
            "fenced": sum(c.ended == "fenced" for c in self.claims),
            "collisions": self.generation_collisions,
            "max_overlap_s": round(self.max_overlap_s, 1),
            "finished_twice": self.finished_twice,
            "fenced_restores": self.fenced_restores,
            "all_done": all(state == "done" for state in self.states.values()) and len(self.states) == self.setup.jobs,
            "results_ok": self.results_ok,
            "seconds": round(self.seconds, 1),
        }


class _Tail:
    """Reads a host's log as it grows and time-stamps each new line."""

    def __init__(self, host: Host) -> None:
        self.host, self.lines, self._offset, self._partial = host, [], 0, ""

    def poll(self, now: float) -> None:
        run = self.host.current
        if run is None:
            return
        with contextlib.suppress(OSError), open(run.log, errors="replace") as handle:
            handle.seek(self._offset)
            text = handle.read()
            self._offset = handle.tell()
        text, self._partial = (self._partial + text), ""
        *complete, self._partial = text.split("\n")
        self.lines += [(now, " ".join(line.split())) for line in complete]


def _claims(host: str, lines: list[tuple[float, str]], exited_at: float) -> tuple[list[Claim], dict[str, int]]:
    claims: list[Claim] = []
    done: dict[str, int] = {}
    current: dict[str, Claim] = {}
    for at, line in lines:
        if match := CLAIMED.search(line):
            claim = Claim(host, match[1], int(match[2]), at)
            current[claim.job] = claim
            claims.append(claim)
            continue
        if (match := RESTORED.search(line)) and match[1] in current:
            current[match[1]].restored = match[2]
            continue
        for pattern, how in ((DONE, "done"), (FENCED, "fenced"), (LOST, "lease lost"), (STOPPED, "stopped")):
            if (match := pattern.search(line)) and match[1] in current:
                claim = current.pop(match[1])
                claim.end, claim.ended = at, how
                if how == "done":
                    done[claim.job] = done.get(claim.job, 0) + 1
                break
    for claim in current.values():
        claim.end = exited_at
    return claims, done


def run(setup: Setup, folder: Path) -> Result:
    """Run both VMs' workers on one queue until both exit; read what happened."""
    started = time.monotonic()
    remote = folder / "drive"
    queue = remote / "runner"
    env = runner_env(RUNNER_LEASE_DURATION=str(setup.lease_s), PYTHONUNBUFFERED="1")
    params = {"steps": setup.steps, "step_seconds": setup.step_s}
    for index in range(setup.jobs):
        spec = write_spec(folder, f"job-{index}", model={"params": params}, training={"epochs": setup.epochs})
        submitted = run_cli("submit", str(spec), "--queue", str(queue), env=env)
        if submitted.returncode != 0:
            raise RuntimeError(submitted.stderr)
    result = Result(setup)
    with SimFactory(folder) as mounts:
        options = {"durability_lag_s": setup.push_lag_s, "pull_lag_s": setup.pull_lag_s, "cache_s": 0.2}
        vms = {name: mounts(remote, folder / name, **options) for name in ("vm-a", "vm-b")}
        hosts = {name: Host(name, sim.mountpoint / "runner", env, folder / "logs") for name, sim in vms.items()}
        tails = {name: _Tail(host) for name, host in hosts.items()}
        exited: dict[str, float] = {}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                now = time.monotonic()
                for name, tail in tails.items():
                    tail.poll(now)
                    if name not in exited and hosts[name].current is not None and not hosts[name].running:
                        tail.poll(now)
                        exited[name] = now
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            hosts["vm-a"].start()
            time.sleep(setup.stagger_s)
            hosts["vm-b"].start()
            deadline = time.monotonic() + 240
            while len(exited) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            watcher.join()
            for host in hosts.values():
                host.cleanup()
        for sim in vms.values():
            sim.unmount()
    for name, tail in tails.items():
        claims, done = _claims(name, tail.lines, exited.get(name, time.monotonic()))
        result.claims += claims
        for job, count in done.items():
            result.done_lines[job] = result.done_lines.get(job, 0) + count
    expected = expected_value(setup.epochs, setup.steps)
    values = []
    for index in range(setup.jobs):
        job = queue / "jobs" / f"job-{index}"
        with contextlib.suppress(OSError, ValueError):
            result.states[f"job-{index}"] = json.loads((job / "state.json").read_text())["status"]
        with contextlib.suppress(OSError, ValueError):
            values.append(json.loads((job / "final" / "result.json").read_text())["value"])
    result.results_ok = values == [expected] * setup.jobs
    result.seconds = time.monotonic() - started
    return result


GRID = [
    Setup(push_lag_s=push, pull_lag_s=pull, lease_s=lease, stagger_s=stagger)
    for push, pull in ((0.25, 0.25), (1.0, 1.0), (2.5, 2.5))
    for lease in (6.0, 20.0)
    for stagger in (0.0, push + pull + 1.5)
]
"""Lags from a second to five, two lease durations, and B starting together with A or after A's claim arrived."""

BEGIN, END = "<!-- two VMs: begin -->", "<!-- two VMs: end -->"


def table(results: list[Result]) -> str:
    lines = [
        "| lag (push+pull) | lease | B starts after | claims | fenced | same generation on both | longest overlap "
        "| finished twice | fenced checkpoint restored | all done, right result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row = r.row()
        lines.append(
            f"| {row['lag_s']:g} s | {row['lease_s']:g} s | {row['stagger_s']:g} s | {row['claims']} | {row['fenced']} "
            f"| {row['collisions']} | {row['max_overlap_s']:g} s | {', '.join(row['finished_twice']) or 'none'} "
            f"| {len(row['fenced_restores']) or 'none'} | {'yes' if row['all_done'] and row['results_ok'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="Measure two VMs on one simulated Drive.")
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/reliability.md")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="runner-two-vms-") as scratch:
        for index, setup in enumerate(GRID):
            result = run(setup, Path(scratch) / f"run-{index}")
            results.append(result)
            print(json.dumps(result.row()), flush=True)
    text = table(results)
    print(text)
    if args.write_docs:
        doc = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
        page = doc.read_text()
        block = f"{BEGIN}\nMeasured by `python tests/two_vms.py --write-docs` on {time.strftime('%Y-%m-%d')}.\n\n{text}\n{END}"
        if BEGIN in page:
            page = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, page, flags=re.DOTALL)
        else:
            page = page.rstrip() + f"\n\n## Two VMs on one Drive\n\n{block}\n"
        doc.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
