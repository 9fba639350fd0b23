"""Deliberate breakages of resume, commit, fencing and publishing: each must make the tests that guard it fail.

A guarantee is tested when breaking it makes a test fail. Each mutation below is applied to a fresh copy of the
working tree (tracked and untracked files; nothing here is changed), and the tests named for it run there with the
copy first on ``PYTHONPATH``, so that the copy's ``runner`` is the one imported, by the tests and by every
``runner work`` they start. A mutation is *caught* when pytest reports failed tests (exit code 1); anything else
(all passed, a collection error, a time-out) counts against it. Before the mutations, the same tests run on the
unmutated copy and must pass, or the check proves nothing.

    python scripts/mutation_check.py                 # every mutation; prints the table
    python scripts/mutation_check.py --only fencing  # the mutations whose name or group contains a word
    python scripts/mutation_check.py --write-docs    # also puts the table into docs/reliability.md

It takes about 20 minutes on 2 cores. CI does not run it; run it before changing resume, commit, fencing or
publishing, and keep every mutation caught.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- mutation table: begin -->", "<!-- mutation table: end -->"
TIMEOUT_S = 1200

KILL = "tests/test_kill_resume.py"
PUBLISHING_KILLS = f"{KILL}::test_kills_inside_every_step_of_publishing_resume_from_the_newest_verified_checkpoint"
TRAINING_KILLS = f"{KILL}::test_kills_at_random_moments_in_training_after_commits_resume_exactly"
OUTAGE = f"{KILL}::test_an_outage_that_outlasts_the_final_flush_keeps_the_checkpoint_and_the_next_session_finishes"
TAKEOVER = f"{KILL}::test_a_claim_taken_over_during_its_final_publish_keeps_the_checkpoint_for_the_next_claim_here"
HALVING = "tests/test_oom.py::test_a_halving_survives_a_kill_before_the_next_checkpoint"
DURABLE = "tests/test_checkpoints.py::test_every_file_of_a_checkpoint_is_made_durable_before_the_rename_that_commits_it"
PUBLISHER = "tests/test_publisher.py"
KEPT = "tests/test_kept_snapshot.py"
TWO_VMS = "tests/test_two_vms.py"
FINAL_RECORD = f"{KILL}::test_a_kill_between_the_final_commit_and_its_record_ends_with_status_on_that_checkpoint"
FIT = "tests/test_metrics_match_fit.py::test_epoch_metrics_and_weights_equal_model_fit_on_the_same_batches"
EDIT = "tests/test_edit.py"
SCHEDULES = "tests/test_schedules.py::test_kills_after_commits_end_as_the_uninterrupted_run"
PRETRAINED = "tests/test_pretrained.py"
FINE_TUNE_KILLS = f"{PRETRAINED}::test_kills_around_the_switch_end_as_the_uninterrupted_run_and_a_resume_downloads_nothing"
FINE_TUNE_RUN = f"{PRETRAINED}::test_the_uninterrupted_run_trains_the_head_then_fine_tunes_the_top_of_the_base"


@dataclass(frozen=True)
class Mutation:
    """One deliberate breakage: ``old`` becomes ``new`` in ``path`` (each ``old`` must occur exactly once)."""

    group: str
    name: str
    path: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]


def _state_field(field: str, value: str) -> tuple[tuple[str, str], ...]:
    """Load a snapshot with one field of its training state forgotten or mangled."""
    mangled = f"        state = TrainingState(**{{**document, {field!r}: {value}}})\n"
    return (("        state = TrainingState(**document)\n", mangled),)


SNAPSHOT = "runner/train/snapshots/snapshot.py"
TRAINER = "runner/train/trainer.py"
ENGINE = "runner/train/engine/loop.py"
CHECKPOINTS = "runner/checkpoints.py"

MUTATIONS = (
    Mutation(
        "resume", "position in the epoch forgotten", TRAINER,
        (("start_sample=state.seen)", "start_sample=0)"),),
        (PUBLISHING_KILLS,),
    ),
    Mutation("resume", "completed epochs forgotten", SNAPSHOT, _state_field("epoch", "0"), (PUBLISHING_KILLS,)),
    Mutation("resume", "step counter forgotten", SNAPSHOT, _state_field("step", "0"), (PUBLISHING_KILLS,)),
    Mutation("resume", "global step forgotten", SNAPSHOT, _state_field("global_step", "0"), (PUBLISHING_KILLS,)),
    Mutation(
        "resume", "running metrics (Keras' metric state) forgotten", SNAPSHOT,
        (('            _assign(_metric_variables(model), arrays, "metrics", checkpoint)\n', "            pass\n"),),
        (PUBLISHING_KILLS,),
    ),
    Mutation("resume", "samples seen mangled", SNAPSHOT, _state_field("seen", "document['seen'] + 8"), (PUBLISHING_KILLS,)),
    Mutation(
        "resume", "best value mangled", SNAPSHOT,
        _state_field("best", "{'monitor': 'val_loss', 'value': -1.0, 'epoch': -1}"),
        (PUBLISHING_KILLS,),
    ),
    Mutation(
        "resume", "optimizer state forgotten", SNAPSHOT,
        (('        _assign(_optimizer_variables(model), arrays, "optimizer", checkpoint)\n', ""),),
        (PUBLISHING_KILLS,),
    ),
    Mutation(
        "resume", "seed generators (Dropout, augmentation) forgotten", SNAPSHOT,
        (("        variable.assign(value)\n", '        if "seed_generator" not in variable.path:\n            variable.assign(value)\n'),),
        (PUBLISHING_KILLS,),
    ),
    Mutation(
        "resume", "halved batch size forgotten", TRAINER,
        (
            ("        size = state.batch_size or self.spec.dataset.batch_size\n", "        size = self.spec.dataset.batch_size\n"),
            ("        if recorded and recorded < size:\n", "        if False:\n"),
        ),
        (HALVING,),
    ),
    Mutation(
        "resume", "restore takes the oldest checkpoint, not the newest", CHECKPOINTS,
        (("        for info in self.committed():\n            if info.generation < self.fresh_from:", "        for info in self.committed()[::-1]:\n            if info.generation < self.fresh_from:"),),
        (PUBLISHING_KILLS,),
    ),
    Mutation(
        "resume", "the checkpoint resumed from is not recorded in state.json", TRAINER,
        (("            context.record_checkpoint(info, metrics=state.history[-1] if state.history else {})\n", ""),),
        (FINAL_RECORD,),
    ),
    Mutation(
        "metrics", "metrics not reset at the start of an epoch (validation leaks into training)", TRAINER,
        (("                self.model.reset_metrics()  # where fit", "                pass  # where fit"),),
        (FIT,),
    ),
    Mutation(
        "engine", "a compiled call trains one step, whatever it is asked", ENGINE,
        (("            for _ in tf.range(steps):\n", "            for _ in tf.range(1):\n"),),
        (FIT,),
    ),
    Mutation(
        "commit", "no temporary folder (files copied under the committed name)", CHECKPOINTS,
        (
            ("        temp = self.job.paths.checkpoint_in_progress(ident)\n", "        temp = target\n"),
            ("            storage.commit_dir(temp, target)\n", ""),
        ),
        (PUBLISHING_KILLS,),
    ),
    Mutation(
        "commit", "no manifest", CHECKPOINTS,
        (("            storage.atomic_write_json(temp / MANIFEST_NAME, manifest)\n", ""),),
        (PUBLISHING_KILLS,),
    ),
    Mutation(
        "commit", "no fsync of the files before the rename", "runner/storage.py",
        (("            if durable:\n                _fsync_file(writer)\n", "            if durable:\n                writer.flush()\n"),),
        (DURABLE,),
    ),
    Mutation(
        "commit", "no fsync of the files written from memory before the rename", "runner/storage.py",
        (("            produce(hashing)  # type: ignore[arg-type]\n            _fsync_file(raw)\n", "            produce(hashing)  # type: ignore[arg-type]\n            raw.flush()\n"),),
        (DURABLE,),
    ),
    Mutation(
        "fencing", "fence checks disabled", "runner/queue.py",
        (('        """Raise :class:`Fenced` if this claim is no longer current: lease lost or a newer generation."""\n        self._current_state()\n', '        """Raise :class:`Fenced` if this claim is no longer current: lease lost or a newer generation."""\n'),),
        (TAKEOVER, PUBLISHER),
    ),
    Mutation(
        "fencing", "claim generation not bumped", "runner/queue.py",
        (
            ("        generation = max(state.generation, job.newest_claim_marker()) + 1\n", "        generation = max(state.generation, 1)\n"),
            ("        if not storage.create_exclusive(job.paths.claim_marker(generation), token.encode()):\n", "        if not (storage.create_exclusive(job.paths.claim_marker(generation), token.encode()) or True):\n"),
        ),
        (PUBLISHING_KILLS,),
    ),
    Mutation(
        "fencing", "claim marker's token not checked (two VMs, one generation)", "runner/queue.py",
        (("        if self.token:\n            self.job.check_claim(", "        if False:\n            self.job.check_claim("),),
        (TWO_VMS,),
    ),
    Mutation(
        "publisher", "an older pending snapshot uploaded after a newer one", "runner/train/snapshots/publisher.py",
        (("            dropped, self._pending = self._pending, snapshot\n", "            dropped, self._pending = (snapshot, self._pending) if self._pending else (None, snapshot)\n"),),
        (PUBLISHER,),
    ),
    Mutation(
        "publisher", "a fenced upload's snapshot deleted, not kept", "runner/train/snapshots/publisher.py",
        (("                with self._condition:\n                    self.error = error\n            else:", "                shutil.rmtree(snapshot.folder, ignore_errors=True)\n                with self._condition:\n                    self.error = error\n            else:"),),
        (PUBLISHER, TAKEOVER),
    ),
    Mutation(
        "end", "done although the last checkpoint was not published", TRAINER,
        (("        if not publisher.flush(timeout := flush_timeout()):\n            raise StorageError(\n                f\"{paths.checkpoints}: the last", "        if not publisher.flush(timeout := flush_timeout()) and False:\n            raise StorageError(\n                f\"{paths.checkpoints}: the last"),),
        (OUTAGE,),
    ),
    Mutation(
        "end", "a kept snapshot never published", TRAINER,
        (("        info = publish_kept(self.cache_dir, self.context.store)\n", "        info = None\n"),),
        (OUTAGE, TAKEOVER),
    ),
    Mutation(
        "end", "a kept snapshot published although a newer claim committed", "runner/kept.py",
        (("    if reason is None and newer:\n", "    if False:\n"),),
        (KEPT,),
    ),
    Mutation(
        "edit", "a restore takes a checkpoint of a replaced spec", CHECKPOINTS,
        (("            if info.generation < self.fresh_from:\n", "            if False:\n"),),
        (EDIT,),
    ),
    Mutation(
        "edit", "a replacement does not take a generation of its own", "runner/edit.py",
        (("    generation = max(state.generation, job.newest_claim_marker()) + 1\n", "    generation = state.generation\n"),),
        (EDIT,),
    ),
    Mutation(
        "edit", "a kept snapshot of a replaced or deleted job published", "runner/kept.py",
        (("    reason = _not_this_jobs(job, kept)\n", "    reason = None\n"),),
        (EDIT,),
    ),
    Mutation("schedule", "the plateau's factor forgotten on resume", SNAPSHOT, _state_field("lr_scale", "1.0"), (SCHEDULES,)),
    Mutation("schedule", "the plateau's state forgotten on resume", SNAPSHOT, _state_field("plateau", "None"), (SCHEDULES,)),
    Mutation(
        "schedule", "the early stop's state forgotten on resume", SNAPSHOT, _state_field("early_stopping", "None"),
        (SCHEDULES,),
    ),
    Mutation(
        "schedule", "augmentation drawn from a stateful generator, not from (seed, epoch, image)",
        "runner/train/data/augment.py",
        (("lambda pair: tf.random.stateless_uniform([DRAWS], seed=pair)", "lambda pair: tf.random.uniform([DRAWS])"),),
        (SCHEDULES,),
    ),
    Mutation(
        "schedule", "the best epoch's weights not kept in the snapshot", SNAPSHOT,
        (("    if state.best_weights is not None:\n", "    if False:\n"),),
        (SCHEDULES,),
    ),
    Mutation(
        "edit", "a replacement whose marker lost to another machine's still writes", "runner/edit.py",
        (("        job.check_claim(generation, token)\n", "        pass\n"),),
        (EDIT,),
    ),
    Mutation(
        "edit", "a claim whose marker is gone (job deleted, name submitted again) fences nobody", "runner/job.py",
        (("        if not storage.exists(self.paths.claim_marker(generation)):\n", "        if False:\n"),),
        (EDIT,),
    ),
    Mutation(
        "pretrained", "a resume loads a fine-tuned snapshot into the frozen model", TRAINER,
        (("            state = load_snapshot(self.model, scratch, checkpoint=info.id, prepare=self._use_phase)\n",
          "            state = load_snapshot(self.model, scratch, checkpoint=info.id)\n"),),
        (FINE_TUNE_KILLS,),
    ),
    Mutation(
        "pretrained", "the new optimizer's schedule starts again from step 0", TRAINER,
        (("                state.step_offset += int(old.iterations.numpy())\n", "                pass\n"),),
        (FINE_TUNE_RUN,),
    ),
    Mutation(
        "pretrained", "a resume downloads the ImageNet weights again", TRAINER,
        (("            model = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes, "
          "pretrained=False)\n",
          "            model = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes)\n"),),
        (FINE_TUNE_KILLS,),
    ),
    Mutation(
        "pretrained", "a loaded snapshot's Normalization keeps the statistics it was built with", SNAPSHOT,
        (("        finalize_layers(model)\n", "        pass\n"),),
        (f"{PRETRAINED}::test_a_snapshot_of_efficientnet_loads_into_a_network_built_without_its_weights",),
    ),
    Mutation(
        "pretrained", "a download is kept without its hash checked", "runner/train/models/imagenet.py",
        (("            if expected is not None and sha256 != expected.lower():\n", "            if False:\n"),),
        (f"{PRETRAINED}::test_a_download_that_does_not_match_the_mirror_sums_is_one_line_naming_the_url_and_the_cache",),
    ),
    Mutation(
        "fencing", "a job stored as running whose lease was released is claimed before its last write arrives",
        "runner/queue.py",
        (("        if state.status is JobStatus.RUNNING and lease.found_free:\n", "        if False:\n"),),
        ("tests/test_lease.py::test_a_job_stored_as_running_with_its_lease_released_is_claimed_only_once_its_state_had_time_to_arrive",),
    ),
)  # fmt: skip


@dataclass
class Outcome:
    mutation: Mutation | None
    exit_code: int
    seconds: float
    failed: list[str]
    output: str = ""
    """The end of pytest's output: what a failing unmutated run is explained by."""

    @property
    def caught(self) -> bool:
        return self.exit_code == 1 and bool(self.failed)


def _copy_tree(target: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored), copied to ``target``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _apply(copy: Path, mutation: Mutation) -> None:
    path = copy / mutation.path
    text = path.read_text()
    for old, new in mutation.edits:
        if text.count(old) != 1:
            raise SystemExit(f"mutation {mutation.name!r}: {old!r} occurs {text.count(old)} times in {mutation.path}")
        text = text.replace(old, new)
    path.write_text(text)


def _run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, float, list[str], str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy), env.get("PYTHONPATH", "")]))
    env.pop("RUNNER_QUEUE", None)
    imported = subprocess.run(
        [sys.executable, "-c", "import runner; print(runner.__file__)"], cwd=copy, env=env, capture_output=True, text=True
    ).stdout.strip()
    if not imported.startswith(str(copy)):
        raise SystemExit(f"the copy's runner is not the one imported ({imported}): the check would prove nothing")
    started = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        code, output = -1, ""
    # ERROR: a test's setup failed, e.g. the uninterrupted reference run broke under the mutation.
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    return code, time.monotonic() - started, failed, output[-4000:]


def check(mutation: Mutation | None, tests: tuple[str, ...]) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="runner-mutation-") as folder:
        copy = Path(folder) / "repo"
        _copy_tree(copy)
        if mutation is not None:
            _apply(copy, mutation)
        code, seconds, failed, output = _run_tests(copy, tests)
    return Outcome(mutation, code, seconds, failed, output)


def table(outcomes: list[Outcome]) -> str:
    lines = ["| group | mutation | tests run | caught by | result |", "|---|---|---|---|---|"]
    for outcome in outcomes:
        mutation = outcome.mutation
        assert mutation is not None
        tests = ", ".join(f"`{Path(t.split('::')[0]).name}`" for t in mutation.tests)
        caught_by = ", ".join(f"`{name.split('::')[-1]}`" for name in outcome.failed) or "-"
        result = "caught" if outcome.caught else f"**not caught** (pytest exit {outcome.exit_code})"
        lines.append(f"| {mutation.group} | {mutation.name} | {tests} | {caught_by} | {result} |")
    return "\n".join(lines)


def _name(row: str) -> str:
    return row.split(" | ")[1]


def write_docs(outcomes: list[Outcome], seconds: float) -> None:
    """Put the table into docs/reliability.md; a partial run (``--only``) replaces only its own rows."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    text = DOC.read_text()
    rows = table(outcomes).splitlines()  # header, separator, one row per mutation
    if len(outcomes) < len(MUTATIONS) and BEGIN in text:
        # Every mutation in MUTATIONS' order: this run's row, else the one from an earlier run (rows of mutations
        # that no longer exist are dropped; one never run says so).
        fresh = {_name(row): row for row in rows[2:]}
        lines = text[text.index(BEGIN) : text.index(END)].splitlines()
        earlier = {_name(line): line for line in lines if line.startswith("| ") and not line.startswith("| group")}
        never = "| {group} | {name} | - | - | not run |"
        rows = rows[:2] + [
            fresh.get(m.name) or earlier.get(m.name) or never.format(group=m.group, name=m.name) for m in MUTATIONS
        ]
    caught = sum(row.endswith("| caught |") for row in rows[2:])
    header = (
        f"Generated by `python scripts/mutation_check.py --write-docs` on commit {commit.strip()}, "
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()}: "
        f"**{caught} of {len(rows) - 2} mutations caught**."
    )
    block = f"{BEGIN}\n{header}\n\n" + "\n".join(rows) + f"\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL)
    else:
        text = text.rstrip() + f"\n\n## Mutations\n\n{block}\n"
    DOC.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="WORD", help="only mutations whose group or name contains WORD")
    parser.add_argument("--write-docs", action="store_true", help="put the table into docs/reliability.md")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or args.only in m.group or args.only in m.name]
    started = time.monotonic()
    every_test = tuple(dict.fromkeys(test for mutation in chosen for test in mutation.tests))
    baseline = check(None, every_test)
    print(f"unmutated: pytest exit {baseline.exit_code} in {baseline.seconds:.0f}s", flush=True)
    if baseline.exit_code != 0:
        print(baseline.output, file=sys.stderr)
        print(f"the guarding tests fail without any mutation ({baseline.failed}): fix them first", file=sys.stderr)
        return 1
    outcomes = []
    for mutation in chosen:
        outcome = check(mutation, mutation.tests)
        outcomes.append(outcome)
        verdict = "caught" if outcome.caught else f"NOT CAUGHT (exit {outcome.exit_code})"
        print(f"{mutation.group:9} {mutation.name:60} {verdict:24} {outcome.seconds:5.0f}s", flush=True)
    print()
    print(table(outcomes))
    if args.write_docs:
        write_docs(outcomes, time.monotonic() - started)
    missed = [outcome.mutation.name for outcome in outcomes if not outcome.caught and outcome.mutation]
    if missed:
        print(f"\n{len(missed)} mutation(s) not caught: {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
