"""`runner demo` end to end: real digits, a real SIGKILL, a real resume, at least 95% validation accuracy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runner.checkpoints import parse_checkpoint_id
from runner.history import read_history
from runner.job import Job, JobStatus
from runner.paths import QueuePaths
from runner.spec import load_spec
from tests.conftest import REPO, run_cli
from tests.support.keras_jobs import keras_env

pytestmark = pytest.mark.slow


def test_demo_kills_resumes_and_reaches_95_percent(tmp_path: Path) -> None:
    env = keras_env(tmp_path / "cache")
    result = run_cli("demo", "--queue", str(tmp_path / "queue"), env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert "simulating a Colab disconnect" in output
    assert "resuming 'digits' from checkpoint" in output
    for count, noun in re.findall(r"(\d+) (epochs?) done", output):  # "1 epoch done", never "1 epochs done"
        assert (noun == "epoch") == (count == "1"), output

    job = Job(QueuePaths(tmp_path / "queue").job("digits"))
    state = job.read_state()
    assert state.status is JobStatus.DONE and state.restarts == 1
    events = job.events.read()
    resumed = [event for event in events if event["event"] == "resumed"]
    assert len(resumed) == 1
    assert_resumed_from_the_newest_commit(events, resumed[0])

    history = read_history(job.paths.history)
    epochs = load_spec(REPO / "jobs" / "digits.yaml").training.epochs
    assert [row["epoch"] for row in history] == [str(epoch) for epoch in range(epochs)]
    assert float(history[-1]["val_accuracy"]) >= 0.95
    assert (job.paths.final / "model.keras").is_file()


def assert_resumed_from_the_newest_commit(events: list[dict], resumed: dict) -> None:
    """The resume restored the newest checkpoint committed before the kill, and nothing before it was trained again.

    Its ``checkpoint`` event is the last one logged before the resume, unless the kill fell between the checkpoint's
    rename and its event (the event is written after the commit): then it is newer than every logged one and its
    event is nowhere in the log."""
    checkpoints = [event for event in events if event["event"] == "checkpoint"]
    logged_before = [event["checkpoint"] for event in checkpoints if event["time"] < resumed["time"]]
    assert logged_before, "the kill landed before the first checkpoint"
    if resumed["checkpoint"] != logged_before[-1]:
        newest_logged = max(logged_before, key=parse_checkpoint_id)
        assert parse_checkpoint_id(resumed["checkpoint"]) > parse_checkpoint_id(newest_logged), "not the newest"
        assert resumed["checkpoint"] not in {event["checkpoint"] for event in checkpoints}
    later = [event for event in checkpoints if event["time"] > resumed["time"]]
    assert later and (later[0]["epoch"], later[0]["step"]) > (resumed["epoch"], resumed["step"]), "work was redone"


def test_the_jobs_folder_digits_spec_is_the_bundled_one() -> None:
    bundled = load_spec(REPO / "runner" / "datasets" / "digits.yaml")
    in_jobs = load_spec(REPO / "jobs" / "digits.yaml")
    assert in_jobs == bundled
    assert Path(bundled.dataset.source).is_file()


def test_the_demo_exits_non_zero_when_its_job_does_not_end_done(tmp_path: Path) -> None:
    env = keras_env(tmp_path / "cache")
    env["RUNNER_TRAINER"] = "tests.support.failing_trainer:FailingTrainer"
    result = run_cli("demo", "--queue", str(tmp_path / "queue"), env=env, timeout=120)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1, output[-3000:]
    assert "the demo job ended failed, not done" in output
    assert "Traceback" not in output
