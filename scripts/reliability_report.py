"""Run the kill tests and the chaos harness, and write docs/reliability.md from what they measured.

    python scripts/reliability_report.py            # the CI-sized set (about ten minutes)
    python scripts/reliability_report.py --soak     # a longer soak: more seeds, more kills, higher fault rates
    python scripts/reliability_report.py --json results.json --output /tmp/reliability.md

Every figure is measured by this run. The kill tests (tests/test_kill_resume.py, run here with
``$RUNNER_KILL_REPORT``) give the kills that landed, by phase, and the resumes (mid-epoch, at epoch boundaries).
The chaos scenarios give sessions, kills and VM deaths that cut a run short, faults injected by the simulated
Drive (by errno), retries logged by the storage layer, checkpoints kept locally because publishing failed past
the retry budget, restore fallbacks, and the outcome checked against an undisturbed run. The mutation table
(scripts/mutation_check.py --write-docs) and the two-VM figures (tests/two_vms.py) are kept from the page as it
was. Needs FUSE (Linux, /dev/fuse, libfuse2 + fusepy) like tests/test_drivesim.py.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.chaos import ChaosResult, Scenario, make_archive, reference_run, run_scenario
from tests.drivesim.sim import available

EPOCHS = 20


def scenarios(soak: bool) -> list[Scenario]:
    """The CI set (the scenarios of tests/test_chaos.py plus two more seeds), or a longer soak."""
    base = [
        Scenario("kills+faults/epoch", seed=1, disturbed_sessions=3, fault_rate=0.02, durability_lag_s=1.5,
                 epochs=EPOCHS),
        Scenario("kills+faults/step", seed=2, disturbed_sessions=3, fault_rate=0.03, durability_lag_s=1.0,
                 epochs=EPOCHS, mid_epoch=True, vm_death_share=0.7),
        # A lease of 30 s refreshes every 10 s: the 8 s outage cannot span two refreshes (see tests/test_chaos.py).
        Scenario("outage>budget", seed=3, disturbed_sessions=0, durability_lag_s=None, outage_s=8.0,
                 retry_budget_s=2.0, epochs=EPOCHS, max_sessions=3, lease_duration_s=30.0),
        Scenario("sigkill-only", seed=4, disturbed_sessions=3, fault_rate=0.02, durability_lag_s=2.0,
                 epochs=EPOCHS, vm_death_share=0.0),
        Scenario("vm-deaths/step", seed=5, disturbed_sessions=3, fault_rate=0.02, durability_lag_s=2.0,
                 epochs=EPOCHS, mid_epoch=True, vm_death_share=1.0),
    ]  # fmt: skip
    if not soak:
        return base
    soak_runs = [
        Scenario(f"soak/{'step' if seed % 2 else 'epoch'}", seed=seed, disturbed_sessions=6, max_sessions=16,
                 fault_rate=0.05, fault_errnos=(errno.EIO, errno.ENOTCONN), durability_lag_s=1.0 + (seed % 3) * 0.5,
                 epochs=EPOCHS, mid_epoch=bool(seed % 2), kill_window_s=(0.0, 6.0))
        for seed in range(10, 20)
    ]  # fmt: skip
    outages = [
        Scenario(f"soak/outage {seconds:g}s", seed=30 + index, disturbed_sessions=0, durability_lag_s=None,
                 outage_s=seconds, retry_budget_s=2.0, epochs=EPOCHS, max_sessions=3,
                 lease_duration_s=4 * seconds)
        for index, seconds in enumerate((5.0, 12.0))
    ]  # fmt: skip
    return base + soak_runs + outages


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "runner"], cwd=REPO, capture_output=True, text=True, check=False)
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" (runner/ modified)" if dirty.stdout.strip() else "")


def _cell_faults(result: ChaosResult) -> str:
    parts = [f"{name} {count}" for name, count in sorted(result.faults.items())]
    if result.outage_faults:
        parts.append(f"outage {result.outage_faults}")
    return ", ".join(parts) or "0"


def _outcome(result: ChaosResult) -> str:
    if result.ok:
        return "done, bit-identical"
    bits = [result.outcome]
    if result.outcome == "done":
        bits.append("bit-identical" if result.bit_identical else "WEIGHTS DIFFER")
        bits.append("history ok" if result.history_ok else "HISTORY WRONG")
        if result.trained_through_outage is False:
            bits.append(f"but NOT trained through the outage by one claim (gen {result.generation})")
    return ", ".join(bits)


TESTS_SECTION = """\
## What is tested and how

Everything runs real code against real files and real processes: `runner work` is started as a process and
killed with SIGKILL; Drive is a real FUSE file system (tests/drivesim/) served by its own process; training is
real Keras on tiny real images with `deterministic: true`. No assertion is on wall-clock time.

| test file | what it checks | how |
|---|---|---|
| tests/test_storage.py | atomic writes never leave a partial file; transient errors (EIO, errno 107) retried with bounded, growing waits and logged; permanent ones (no space, permission) not retried and explained in one line; an error that never stops gives up with mount advice | writer processes SIGKILLed at random; a flaky `os.replace`/`os.fsync` stands in for a dropping mount |
| tests/test_checkpoints.py | commit (temp folder, manifest last, rename, every file and the manifest fsynced before the rename), newest-first order, prune only after a verified commit, fencing of a stale claim, restore falling back past damaged checkpoints, garbage collection | real checkpoint folders, real corruption of real files, processes SIGKILLed while committing and pruning |
| tests/test_lease.py | one holder at a time, immediate takeover of a dead holder on this host (also in a PID namespace), takeover of a frozen holder after the lease duration, fencing of a holder that comes back, lost-lease detection | racing helper processes killed and frozen with SIGKILL / SIGSTOP / SIGCONT (tests/support/lease_*.py) |
| tests/test_worker.py | claim order, a failing job does not stop the queue, cancel and retry, SIGTERM checkpoints and releases, SIGKILL at random then resume gives the uninterrupted value, damaged spec/state/lease files | in-process worker with a counting trainer; real `runner work` processes for signals and kills |
| tests/test_kill_resume.py | kills inside every step of publishing (between copy and manifest, manifest and rename, after the rename, after the state write, after the history rewrite), after a snapshot, during the export, and at random moments in training after a commit, on local disk and on the Drive simulator, and with mixed precision and with XLA (several steps per compiled call): each followed by a resume from the newest verified checkpoint with nothing redone, ending bit-identical with the same training state, history.csv, TensorBoard and status metrics; the kills' landing counted; an outage that outlasts the final flush and a claim taken over during it leave the job resumable with the checkpoint kept locally, which the next claim publishes | real `runner work` processes on tiny real digits (Dropout, augmentation, `deterministic: true`), killed at exact points (`$RUNNER_KILL_AT`) or after the n-th commit event; `$RUNNER_HOLD_AT` holds a worker while the test breaks Drive or takes the claim over (tests/support/kill_harness.py) |
| tests/test_metrics_match_fit.py | epoch metrics (every metric, every epoch) and final weights equal `model.fit`'s on the same batches, with several steps per compiled call and a checkpoint after each; CI runs it on the newest releases and on Colab's pins | a real `runner work` against `model.fit` of the same network, seeds and batches |
| tests/test_keras_resume.py | a truncated newest checkpoint falls back and still ends bit-identical; with every checkpoint damaged training starts again and says so; a finished job is never trained again | real Keras trainer on digits from the bundled archive |
| tests/test_publisher.py | newest-only replacement of a pending snapshot; a claim fenced during an upload publishes nothing more and leaves its snapshot to keep; close publishes what is pending, shutdown nothing more | a real claim, lease and store; a gate in the store's fence holds an upload between manifest and rename |
| tests/test_kept_snapshot.py | a snapshot kept on local disk is published under its own claim's id when no newer claim has committed, dropped (with an event) when one has, discarded when it got through after all; kept per job folder | real job folders and stores, no TensorFlow |
| tests/test_keras_jobs.py | the tutorial-shaped job end to end from a flaky local HTTP server; wrong sha256 and bad inputs each fail their own job with one line while the queue goes on; a failed job keeps its checkpoints and resumes after `runner retry` | real `runner work` against an `http.server` on 127.0.0.1 |
| tests/test_full_disk.py | ENOSPC in the job folder or the local cache keeps the previous checkpoint, stops with one line (exit 1), status says why, and the job resumes bit-identical once there is room | a small tmpfs as the job folder / cache |
| tests/test_many_hosts.py | three hosts on one queue with random kills and restarts train every job exactly once and never twice at a time; a host frozen past its lease is fenced when it resumes | real workers in their own UTS namespaces (`unshare --uts`), checked from the job folders alone |
| tests/test_corpus.py | 30+ malformed specs, archives, datasets and model factories each give one clear line and the right outcome (submit exits 2; a bad job fails alone); never a traceback, never a stray file | the corpus in tests/corpus/ with tests/corpus/EXPECTED.yaml |
| tests/test_drivesim.py | the simulator's own contract: passthrough, latency, bandwidth, faults only on chosen ops at about the rate, ambiguous faults, outages, write-back durable only after the lag, VM death losing exactly what was not durable, order of renames and content, clean unmount | a real FUSE mount and its counters |
| tests/test_chaos.py | the chaos runs below (the first three scenarios): every job finishes, bit-identical, history each epoch once, kills and VM deaths followed by a new claim, injected faults retried; an outage longer than the retry budget keeps training, keeps the checkpoint locally and publishes it after recovery | tests/chaos.py: each session a new VM (new DriveSim mount of the same remote, empty local cache, dataset zip copied off the simulated Drive again), ended by SIGKILL or VM death at a random moment |
"""

HARNESS_SECTION = """\
## The chaos harness

`tests/chaos.py` runs one scenario: a job (real Keras, {epochs} epochs, 3 digit classes, Dropout and augmentation,
`deterministic: true`) in a queue on a simulated Drive (`DriveSim`, 2 ms latency per metadata call), its
dataset kept as one zip on that Drive. Each session is a new Colab VM: a new mount of the same remote at the same
mount point (under /content/drive, so runner copies the zip to local disk), an empty `RUNNER_CACHE`, and a real
`python -m runner work`. A disturbed session ends at a random moment (up to 1 s) after its first or second
commit, as seen through its own mount, so in training or publishing: either by SIGKILL of the worker (the mount
then stops cleanly) or by `vm_dies` (worker and mount SIGKILLed; writes younger than the durability lag are lost). Then plain sessions (still with faults) run
until the job is done. Faults: EIO and errno 107 on `write`, `fsync`, `rename`, `open` at the given rate, with
the default retry policy. The outage scenario makes every call fail with errno 107 for the given seconds once the
first checkpoint is on Drive, with `RUNNER_RETRY_BUDGET=2`.

The outcome is read from the remote ("Drive") after the last session: state.json, events.jsonl (fallbacks,
claims), runner.log, the newest checkpoint's `variables.npz` compared with an undisturbed run's
(`np.array_equal` on every variable) and history.csv compared row by row.

Columns: *sessions* (VMs started), *kills* / *VM deaths* (that cut a run short, i.e. the job was not done yet),
*faults* (injected by the simulator, by errno; *outage*: calls failed by the outage), *retries* (retry lines
logged by runner.storage), *kept locally* (publishing failed past the retry budget: the snapshot was kept on local
disk and published later; "publishing checkpoint failed, will retry"), *fallbacks* (restore passed over a newest
checkpoint that did not verify), *gen* (claims of the job), *outcome* (checked against the undisturbed run).
"""


KILL_TESTS = "tests/test_kill_resume.py"
KEPT_BLOCKS = (
    ("<!-- mutation table: begin -->", "<!-- mutation table: end -->"),
    ("<!-- two VMs: begin -->", "<!-- two VMs: end -->"),
)
"""Sections generated by other scripts: carried over from the page as it was."""


def run_kill_tests() -> tuple[list[dict], int]:
    """Run the kill tests with a report file; their records and pytest's exit code."""
    with tempfile.TemporaryDirectory(prefix="runner-kills-") as scratch:
        report = Path(scratch) / "kills.jsonl"
        env = dict(os.environ, RUNNER_KILL_REPORT=str(report))
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", KILL_TESTS], cwd=REPO, env=env, check=False
        )
        records = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    return records, done.returncode


def render_kills(records: list[dict], exit_code: int) -> list[str]:
    landed = [phase for record in records for phase in record["landed"]]
    by_phase: dict[str, int] = {}
    for phase in landed:
        by_phase[phase] = by_phase.get(phase, 0) + 1
    lines = [
        "## Kills that land where they are meant to",
        "",
        (
            f"`{KILL_TESTS}` ({'all passed' if exit_code == 0 else f'**pytest exit {exit_code}**'}): "
            f"{len(records)} runs, {len(landed)} kills landed, "
            f"{sum(len(r['missed']) for r in records)} missed; "
            f"{sum(r['mid_epoch_resumes'] for r in records)} resumes mid-epoch, "
            f"{sum(r['boundary_resumes'] for r in records)} at an epoch boundary; "
            f"{sum(r['fallbacks'] for r in records)} fallbacks; "
            f"{sum(r['kept_published'] for r in records)} kept checkpoints published by a later claim."
        ),
        "",
        "Kills landed, by phase: " + ", ".join(f"{phase} {count}" for phase, count in sorted(by_phase.items())) + ".",
        "",
        "| test | sessions | kills landed (phase) | missed | resumes mid-epoch | at a boundary | fallbacks | gen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['test']} | {r['sessions']} | {', '.join(r['landed']) or '-'} | {', '.join(r['missed']) or '-'} "
            f"| {r['mid_epoch_resumes']} | {r['boundary_resumes']} | {r['fallbacks']} | {r['generation']} |"
        )
    lines += [
        "",
        "Each kill test asserts, from the job's events and its folder: every kill after a commit is followed by a",
        "claim that resumes from the newest checkpoint that verifies (read from the folder right after the kill),",
        "whose first new checkpoint lies beyond that point; no checkpoint ever fails to verify; the kills landed in",
        "the phases meant (a minimum count, from the kill log and the commit events); and the end equals an",
        "uninterrupted run: variables bit for bit (Keras' metric state among them), the training state of the last",
        "checkpoint (position, history, best, batch size), history.csv, TensorBoard's scalars and `runner status",
        "--json`'s metrics after every kill.",
        "",
    ]
    return lines


def kept_blocks(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError:
        return []
    found = []
    for begin, end in KEPT_BLOCKS:
        if match := re.search(re.escape(begin) + ".*?" + re.escape(end), text, flags=re.DOTALL):
            heading = "## Mutations" if "mutation" in begin else "## Two VMs on one Drive"
            found += [heading, "", match.group(0), ""]
    return found


def render(
    results: list[ChaosResult],
    *,
    soak: bool,
    seconds: float,
    commit: str,
    kills: list[str] = (),
    kept: list[str] = (),
) -> str:
    ok = sum(result.ok for result in results)
    total_faults = sum(result.faults_total for result in results)
    lines = [
        "# Reliability",
        "",
        "<!-- generated by scripts/reliability_report.py; do not edit by hand -->",
        "",
        (
            f"Generated by `python scripts/reliability_report.py{' --soak' if soak else ''}` on commit {commit}, "
            f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()} on {platform.machine()} "
            f"({len(results)} scenarios in {seconds:.0f} s)."
        ),
        "",
        (
            f"**{ok} of {len(results)} scenarios ended done and bit-identical**; "
            f"{sum(r.kills for r in results)} kills, {sum(r.vm_deaths for r in results)} VM deaths, "
            f"{total_faults} injected faults, {sum(r.retries for r in results)} logged retries, "
            f"{sum(r.publish_retries for r in results)} checkpoints kept locally past the retry budget."
        ),
        "",
        *kills,
        *kept,
        "## Chaos: kills, VM deaths and faults on a simulated Drive",
        "",
        (
            "| scenario | seed | sessions | kills | VM deaths | faults | retries | kept locally | fallbacks | gen "
            "| history | outcome |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario} | {r.seed} | {r.sessions} | {r.kills} | {r.vm_deaths} | {_cell_faults(r)} | {r.retries} "
            f"| {r.publish_retries} | {r.fallbacks} | {r.generation} | {'each epoch once' if r.history_ok else 'WRONG'} "
            f"| {_outcome(r)} |"
        )
    notes = []
    for r in results:
        if r.status_answers:
            during, last = r.status_answers[0], r.status_answers[-1]
            notes.append(
                f"- {r.scenario}: trained through the outage and published after it: "
                f"{'yes' if r.trained_through_outage else 'NO'}. `runner status --json`, asked "
                f"{len(r.status_answers)} times from the outage's start to a second after its end; first: "
                f"{_short(during)}. Last: {_short(last)}."
            )
        for problem in r.problems:
            notes.append(f"- {r.scenario} (seed {r.seed}): {_short(problem)}")
    if notes:
        lines += ["", "## Notes from this run", "", *notes]
    lines += ["", HARNESS_SECTION.format(epochs=EPOCHS), TESTS_SECTION]
    lines += [
        "## Regenerating",
        "",
        "```",
        "python scripts/reliability_report.py          # this table (CI-sized set)",
        "python scripts/reliability_report.py --soak   # a longer soak (more seeds, kills, higher fault rates)",
        "python -m pytest tests/test_chaos.py -q       # the CI chaos tests",
        "python scripts/mutation_check.py --write-docs # the mutation table (about 20 minutes)",
        "```",
        "",
    ]
    return "\n".join(lines)


def _short(text: str | None, limit: int = 300) -> str:
    text = " ".join((text or "").split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak", action="store_true", help="run the longer soak set")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "reliability.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON here")
    parser.add_argument("--only", default=None, help="run only scenarios whose name contains this")
    args = parser.parse_args(argv)
    usable, reason = available()
    if not usable:
        print(f"cannot run the chaos harness: {reason}", file=sys.stderr)
        return 2
    chosen = [s for s in scenarios(args.soak) if args.only is None or args.only in s.name]
    started = time.monotonic()
    print(f"kill tests ({KILL_TESTS}) ...", flush=True)
    kill_records, kill_exit = run_kill_tests()
    results: list[ChaosResult] = []
    with tempfile.TemporaryDirectory(prefix="runner-chaos-") as scratch:
        root = Path(scratch)
        archive = make_archive(root / "data")
        reference = reference_run(root / "reference", archive, chosen[0])
        for index, scenario in enumerate(chosen):
            print(f"[{index + 1}/{len(chosen)}] {scenario.name} (seed {scenario.seed}) ...", flush=True)
            result = run_scenario(scenario, root / f"run-{index}", archive, reference)
            print(f"    {'ok' if result.ok else 'NOT OK'}: {json.dumps(result.as_dict())[:600]}", flush=True)
            results.append(result)
    seconds = time.monotonic() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    kept = kept_blocks(args.output)
    page = render(
        results, soak=args.soak, seconds=seconds, commit=_commit(), kills=render_kills(kill_records, kill_exit), kept=kept
    )
    args.output.write_text(page)
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in results], indent=2))
    print(f"wrote {args.output} ({sum(r.ok for r in results)}/{len(results)} ok, {seconds:.0f} s)")
    return 0 if all(r.ok for r in results) and kill_exit == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
