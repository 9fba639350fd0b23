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
    pull_every_s: float = 0.0
    """B's view of Drive is brought up to date only in bursts this far apart (0: continuously)."""
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
    output: dict[str, list[str]] = field(default_factory=dict)
    """Each VM's worker output, line by line."""

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
        """Restores off the job's line of training: a checkpoint of generation g ahead of the point from which a
        newer claim (older than the restorer) had already resumed, i.e. written by g after it was taken over."""
        bad = []
        for claim in self.claims:
            if claim.restored is None:
                continue
            parsed = parse_checkpoint_id(claim.restored)
            assert parsed is not None
            generation, position = parsed[0], parsed[1:]
            for other in self.claims:
                if other.job != claim.job or not generation < other.generation < claim.generation:
                    continue
                branched = parse_checkpoint_id(other.restored)[1:] if other.restored else (0, 0)
                if position > branched:
                    bad.append(f"{claim.job}: g{claim.generation} restored {claim.restored}, past g{other.generation}")
        return bad

    def row(self) -> dict:
        return {
            "lag_s": self.setup.lag_s,
            "lease_s": self.setup.lease_s,
            "stagger_s": self.setup.stagger_s,
            "pull_every_s": self.setup.pull_every_s,
            "takeovers": sum(1 for c in self.claims if c.generation > 1),
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
    folder.mkdir(parents=True, exist_ok=True)
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
        vms = {
            "vm-a": mounts(remote, folder / "vm-a", **options),
            "vm-b": mounts(remote, folder / "vm-b", **options, pull_every_s=setup.pull_every_s),
        }
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
        result.output[name] = [line for _, line in tail.lines]
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
    Setup(push_lag_s=1.0, pull_lag_s=1.0, lease_s=6.0),
    Setup(push_lag_s=2.5, pull_lag_s=2.5, lease_s=20.0),
    Setup(push_lag_s=1.0, pull_lag_s=1.0, lease_s=6.0, stagger_s=3.5),
    Setup(push_lag_s=2.5, pull_lag_s=2.5, lease_s=20.0, stagger_s=6.5),
    Setup(push_lag_s=1.0, pull_lag_s=1.0, lease_s=6.0, stagger_s=16.0, pull_every_s=15.0, jobs=1, epochs=40),
    Setup(push_lag_s=1.0, pull_lag_s=1.0, lease_s=30.0, stagger_s=16.0, pull_every_s=15.0, jobs=1, epochs=40),
]
"""Both VMs starting together (within the lag), B starting after A's claim has reached it, and B finding A's
job running while its view of Drive stalls for 15 s at a time, with a lease shorter and longer than the stall."""

BEGIN, END = "<!-- two VMs: begin -->", "<!-- two VMs: end -->"

ANALYSIS = """\
Measured by `python tests/two_vms.py --write-docs` on {date}: two `runner work`s on one queue, each on its own
simulated VM (a DriveSim mount with its own write-back cache and a view of the other's changes that lags by the
pull lag; tests/drivesim/puller.py), on other host names. Jobs use the counting trainer (real checkpoint store;
3 epochs of 1 s in the first four rows, one job of 40 epochs in the last two). *Lag* is from a write on one VM to
the other seeing it; *B's view stalls*: B's view of Drive is brought up to date only in bursts that far apart.

{table}

What holds, and what Drive makes impossible:

- **Results are right and every job ends done**, in every row: a second claim never corrupts a job.
- **Exclusive claims across VMs are impossible on Drive.** Each VM decides `O_EXCL` against its own view, so two
  workers that claim one job within the lag of each other both get the same generation (*same generation on both
  VMs*; it happens whenever both run at once, since each moves on to the next job within the other's lag). The
  claim marker holds the claim's token and Drive keeps the version uploaded last: once it reaches the other VM,
  `Claim.fence()` fences the claim it does not name, at its next checkpoint or state write. The overlap is thus
  about the lag plus the time to the next checkpoint (*longest overlap*: 2 to 3 s here with lags of 2 to 5 s).
- **A job shorter than the lag can finish on both VMs** (*finished twice* with the 5 s lag and 3 s jobs): neither
  sees the other before it is done, or one VM claims a job the other has already finished, because its view still
  shows it queued (row 4: no overlap at all, the second run came after the first). Both trained the same deterministic run, so the result is right either way;
  with a non-deterministic GPU the two final models differ and the one uploaded last is the one kept. Nothing
  short of waiting out the lag before finishing can prevent this, and Drive gives no bound on its lag.
- **No checkpoint of a fenced claim is restored**: restore orders by generation, passes over checkpoints whose
  manifest names a claim that lost its generation's marker, and a claim that resumed from an older point outranks
  the stale claim's later checkpoints (*fenced checkpoint restored*: none).
- **A live worker is taken over when the other VM's view stalls for longer than the lease** (row 5: B saw A's
  heartbeats only every 15 s, took over after 6 s of silence, and A, still alive, was fenced 2.9 s later; its work
  since B's resume point was done twice). With a lease longer than the stall (row 6) B leaves the job to A.
  Reports say Drive takes minutes to show changes on another VM; so a queue on Drive uses a 300 s lease by default
  (heartbeats every 100 s, stalls up to about 200 s ridden out), against 90 s elsewhere. The cost: a new VM waits
  up to 5 minutes for the job of a VM that died; a restarted session on the same VM takes over at once.
"""


def table(results: list[Result]) -> str:
    lines = [
        "| lag (push+pull) | B's view stalls | lease | B starts after | jobs | claims | takeovers | fenced "
        "| same generation on both VMs | longest overlap | finished twice | fenced checkpoint restored "
        "| all done, right result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        row = r.row()
        stall = f"{row['pull_every_s']:g} s" if row["pull_every_s"] else "no"
        lines.append(
            f"| {row['lag_s']:g} s | {stall} | {row['lease_s']:g} s | {row['stagger_s']:g} s | {r.setup.jobs} "
            f"| {row['claims']} | {row['takeovers']} | {row['fenced']} | {row['collisions']} "
            f"| {row['max_overlap_s']:g} s "
            f"| {', '.join(row['finished_twice']) or 'none'} | {len(row['fenced_restores']) or 'none'} "
            f"| {'yes' if row['all_done'] and row['results_ok'] else 'NO'} |"
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
        block = f"{BEGIN}\n{ANALYSIS.format(date=time.strftime('%Y-%m-%d'), table=text)}\n{END}"
        if BEGIN in page:
            page = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, page, flags=re.DOTALL)
        else:
            page = page.rstrip() + f"\n\n## Two VMs on one Drive\n\n{block}\n"
        doc.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
