"""The bad-input corpus (tests/corpus/): malformed specs, archives, datasets and model factories, kept as files.

Each one must give one clear line naming its cause and the right outcome: `runner submit` exits 2 for a bad spec
and writes nothing; a bad job found at run time ends failed while the rest of the queue goes on. Never a
traceback on the console, never a file written outside the cache and the queue, never a corpus file changed.
tests/corpus/EXPECTED.yaml says what each file must do.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.cli import main
from runner.job import JobStatus
from runner.queue import Queue
from tests.conftest import REPO, make_spec, run_cli, runner_env

CORPUS = Path(__file__).resolve().parent / "corpus"
EXPECTED: dict[str, Any] = yaml.safe_load((CORPUS / "EXPECTED.yaml").read_text(encoding="utf-8"))
NOT_INPUTS = {"EXPECTED.yaml", "make_archives.py"}
ESCAPED = "runner-corpus-escaped"
"""Every archive entry (and YAML tag) that tries to write outside its place uses this in its file name."""

CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def corpus_files() -> set[str]:
    """Every file of the corpus, relative to it (Python's caches aside)."""
    return {
        path.relative_to(CORPUS).as_posix()
        for path in CORPUS.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> sha256), Python's caches aside."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def spec_cases() -> dict[str, tuple[int, list[str]]]:
    """Spec file -> (number of error lines, fragments)."""
    cases = {}
    for name, expected in EXPECTED["specs"].items():
        if isinstance(expected, dict):
            cases[name] = (expected["lines"], expected["error"])
        else:
            cases[name] = (1, expected)
    return cases


def escaped_files(*roots: Path) -> list[Path]:
    return [path for root in roots if root.exists() for path in root.rglob(f"*{ESCAPED}*")]


def escaped_in_tmp() -> set[Path]:
    return set(Path("/tmp").glob(f"{ESCAPED}*"))


# --- the corpus itself ------------------------------------------------------------------------------------------


def test_the_corpus_has_at_least_30_inputs_and_every_file_is_listed() -> None:
    listed: set[str] = set(EXPECTED["specs"]) | {EXPECTED["control"], *EXPECTED["uses"]}
    for case in EXPECTED["jobs"]:
        listed |= {case["spec"]} | ({case["input"]} if "input" in case else set())
    entries = len(EXPECTED["specs"]) + len(EXPECTED["jobs"])
    assert entries >= 30, f"only {entries} corpus entries"
    assert len(EXPECTED["specs"]) >= 15 and len(EXPECTED["jobs"]) >= 15
    files = corpus_files() - NOT_INPUTS
    assert sorted(listed - files) == [], "EXPECTED.yaml names files that are not in the corpus"
    assert sorted(files - listed) == [], "corpus files that EXPECTED.yaml does not list (orphans)"
    for case in EXPECTED["jobs"]:  # each job spec uses its input
        spec = yaml.safe_load((CORPUS / case["spec"]).read_text())
        assert spec["name"] == Path(case["spec"]).stem, case["spec"]
        if case.get("input", "").startswith("archives/"):
            assert spec["dataset"]["source"] == f"../{case['input']}", case["spec"]
        if case.get("input", "").startswith("factories/"):
            assert spec["model"]["factory"].split(":")[0] == Path(case["input"]).stem, case["spec"]


def test_the_archives_are_small_and_make_archives_rebuilds_them_byte_for_byte(tmp_path: Path) -> None:
    archives = CORPUS / "archives"
    assert all(path.stat().st_size <= 8 * 1024 for path in archives.iterdir()), "corpus archives stay a few KB"
    subprocess.run([sys.executable, str(CORPUS / "make_archives.py"), str(tmp_path)], check=True, capture_output=True)
    assert tree_digest(tmp_path) == tree_digest(archives)


# --- specs: `runner submit` exits 2 and writes nothing ------------------------------------------------------------


@pytest.fixture
def existing_queue(tmp_path: Path) -> Queue:
    """A queue that already holds a job, so that "writes nothing" can be checked on the whole folder."""
    queue = Queue(tmp_path / "queue")
    queue.submit(make_spec("existing"))
    return queue


@pytest.mark.parametrize("name", sorted(spec_cases()))
def test_a_corpus_spec_is_refused_at_submit_with_one_line_per_problem(
    name: str, existing_queue: Queue, capsys: pytest.CaptureFixture[str]
) -> None:
    count, fragments = spec_cases()[name]
    path = CORPUS / name
    before = tree_digest(existing_queue.root)

    code = main(["submit", str(path), "--queue", str(existing_queue.root)])

    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in out + err
    assert out == ""
    assert not CONTROL_CHARACTERS.search(err), f"raw control characters on the console: {err!r}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == count, lines
    assert all(line.startswith("error: ") and str(path) in line for line in lines), lines
    for fragment in fragments:
        assert any(fragment in line for line in lines), (fragment, lines)
    assert tree_digest(existing_queue.root) == before, "the queue changed"
    assert existing_queue.names() == ["existing"]
    assert not escaped_in_tmp(), "a YAML tag ran code"


def test_all_corpus_specs_at_once_in_a_real_process_exit_2_and_change_nothing(existing_queue: Queue) -> None:
    cases = spec_cases()
    paths = [str(CORPUS / name) for name in sorted(cases)]
    before = tree_digest(existing_queue.root)

    result = run_cli("submit", *paths, "--queue", str(existing_queue.root))

    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    problems = [f"not an error line: {line!r}" for line in lines if not line.startswith("error: ")]
    for name in sorted(cases):
        mine = [line for line in lines if f"{CORPUS / name}: " in line]
        missing = [fragment for fragment in cases[name][1] if not any(fragment in line for line in mine)]
        if missing:
            problems.append(f"{name}: no line holds {missing}: {mine}")
    assert not problems, "\n".join(problems)
    assert tree_digest(existing_queue.root) == before, "the queue changed"


# --- run time: one queue, one `runner work`, every bad job fails on its own -----------------------------------------


@pytest.mark.slow
def test_corpus_jobs_each_fail_with_one_line_and_the_good_job_still_runs(tmp_path: Path) -> None:
    env = runner_env(
        RUNNER_CACHE=str(tmp_path / "cache"),
        TF_CPP_MIN_LOG_LEVEL="3",
        CUDA_VISIBLE_DEVICES="",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("RUNNER_TRAINER")  # the real Keras trainer
    env["PYTHONPATH"] = f"{CORPUS / 'factories'}:{env['PYTHONPATH']}"
    queue = tmp_path / "queue"
    corpus_before = tree_digest(CORPUS)
    tmp_before = escaped_in_tmp()
    cases = {Path(case["spec"]).stem: case for case in EXPECTED["jobs"]}
    specs = [str(CORPUS / case["spec"]) for case in EXPECTED["jobs"]] + [str(CORPUS / EXPECTED["control"])]

    submitted = run_cli("submit", *specs, "--queue", str(queue), env=env)
    assert submitted.returncode == 0, submitted.stderr
    result = run_cli("work", "--queue", str(queue), env=env, timeout=600)

    console = result.stdout + result.stderr
    problems = []
    if result.returncode != 1:
        problems.append(f"`runner work` exited {result.returncode}, not 1")
    if "Traceback" in console:
        problems.append("a traceback on the console")
    final = {name: Queue(queue).job(name).read_state() for name in [*cases, "good"]}
    for name, case in cases.items():
        state = final[name]
        if state.status is not JobStatus.FAILED:
            problems.append(f"{name}: {state.status.value}, not failed (error {state.error!r})")
            continue
        error = state.error or ""
        if not error or "\n" in error or "\r" in error:
            problems.append(f"{name}: the error is not one line: {error!r}")
        missing = [fragment for fragment in case["error"] if fragment not in error]
        if missing:
            problems.append(f"{name}: error {error!r} does not hold {missing}")
        if f"job '{name}' failed" not in console:
            problems.append(f"{name}: the console does not say it failed")
        job = Queue(queue).job(name)
        if (job.paths.final / "model.keras").exists() or state.checkpoint is not None:
            problems.append(f"{name}: a checkpoint or an export appeared")
    good = final["good"]
    if good.status is not JobStatus.DONE:
        problems.append(f"good: {good.status.value}, not done (error {good.error!r})")
    elif not (Queue(queue).job("good").paths.final / "model.keras").is_file():
        problems.append("good: done, but no final/model.keras")
    assert not problems, "\n".join(problems) + "\n--- console (tail) ---\n" + console[-3000:]

    # Nothing written outside the cache and the queue; nothing of the corpus changed.
    assert escaped_files(tmp_path, REPO / "tests", REPO / "runner") == []
    assert escaped_in_tmp() == tmp_before
    assert tree_digest(CORPUS) == corpus_before
