"""The notebook API: ``runner.submit``, ``runner.work``, ``runner.status``, ``runner.logs``.

Everything runs in this process on real queue folders with the counting trainer, as a notebook cell would;
``runner status --json`` runs as a real process to compare the API's records with the CLI's. (Drive and Colab
through the API are in test_colab.py; ``runner.plot`` in test_plot.py.)
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
import yaml

import runner
import runner.api as api_module
from runner import defaults
from runner.errors import JobExists, JobNotFound, QueueNotFound, SpecError, UsageError
from runner.queue import Queue
from runner.spec import parse_spec
from runner.worker import WorkResult
from tests.conftest import (
    COUNTING_TRAINER,
    make_spec,
    make_spec_dict,
    run_cli,
    write_spec,
)
from tests.support.colab_helpers import forget_fake_colab
from tests.support.counting_trainer import expected_value
from tests.support.worker_helpers import events, result_value, state


@pytest.fixture(autouse=True)
def notebook_outside_colab(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A notebook kernel on a plain machine: the counting trainer, no queue variable, not Colab."""
    monkeypatch.setenv(defaults.TRAINER_ENV, COUNTING_TRAINER)
    monkeypatch.delenv(defaults.QUEUE_ENV, raising=False)
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    forget_fake_colab()
    monkeypatch.chdir(tmp_path)


def kernel_handler(signum: int, frame: FrameType | None) -> None:
    """Stands in for the SIGINT handler a notebook kernel installs (it turns "interrupt" into an exception)."""


@pytest.fixture
def kernel_sigint() -> Iterator[object]:
    """SIGINT handled by :func:`kernel_handler` for the test, as in a kernel; the old handler put back after."""
    previous = signal.signal(signal.SIGINT, kernel_handler)
    try:
        yield kernel_handler
    finally:
        signal.signal(signal.SIGINT, previous)


# --- submit ------------------------------------------------------------------------------------------------


def test_submit_takes_a_file_a_dict_or_a_jobspec_and_returns_the_name(tmp_path: Path) -> None:
    queue = tmp_path / "q"

    names = [
        runner.submit(write_spec(tmp_path, "from-file"), queue=queue),
        runner.submit(str(write_spec(tmp_path, "from-str-path")), queue=str(queue)),
        runner.submit(make_spec_dict("from-dict"), queue=queue),
        runner.submit(make_spec("from-jobspec"), queue=Queue(queue)),
    ]

    assert names == ["from-file", "from-str-path", "from-dict", "from-jobspec"]
    assert sorted(Queue(queue).names()) == sorted(names)
    assert Queue(queue).job("from-dict").read_spec() == make_spec("from-dict")


def test_submit_uses_the_default_queue_outside_colab(tmp_path: Path) -> None:
    assert runner.submit(make_spec_dict()) == "job-a"

    assert (tmp_path / defaults.QUEUE_DIR_LOCAL / "jobs" / "job-a" / "spec.yaml").is_file()


def test_submitting_the_same_spec_again_is_fine_and_a_different_one_is_refused(tmp_path: Path) -> None:
    queue = tmp_path / "q"
    runner.submit(make_spec_dict(), queue=queue)

    assert runner.submit(make_spec_dict(), queue=queue) == "job-a"  # a notebook cell run twice
    with pytest.raises(JobExists, match="job 'job-a' already exists"):
        runner.submit(make_spec_dict(training={"epochs": 9}), queue=queue)

    assert len(events(Queue(queue), "job-a", "submitted")) == 1
    assert Queue(queue).job("job-a").read_spec().training.epochs == 3  # unchanged


@pytest.mark.parametrize(
    ("sections", "field"),
    [({"training": {"epochs": 0}}, "training.epochs"), ({"trainig": {"epochs": 3}}, "trainig")],
)
def test_an_invalid_dict_raises_spec_error_naming_the_field_and_writes_nothing(
    tmp_path: Path, sections: dict, field: str
) -> None:
    with pytest.raises(SpecError) as raised:
        runner.submit(make_spec_dict(**sections), queue=tmp_path / "q")

    assert any(field in problem for problem in raised.value.problems), raised.value.problems
    assert not (tmp_path / "q").exists()


# --- work --------------------------------------------------------------------------------------------------


def test_work_runs_every_job_and_returns_what_it_did(tmp_path: Path) -> None:
    queue = tmp_path / "q"
    runner.submit(make_spec_dict("job-a"), queue=queue)
    runner.submit(make_spec_dict("job-b", model={"params": {"steps": 4, "fail_at_epoch": 1}}), queue=queue)

    result = runner.work(queue=queue, max_hours=1)

    assert isinstance(result, WorkResult)
    assert result.done == ["job-a"] and result.failed == ["job-b"]
    assert result.exit_code == 1 and not result.time_limit_reached
    assert result_value(Queue(queue), "job-a") == expected_value(3, 4)
    assert "injected failure at epoch 1" in (state(Queue(queue), "job-b").error or "")

    again = runner.work(queue=queue)  # the one-line resume, run again: nothing left to do

    assert (again.done, again.failed, again.exit_code) == ([], [], 0)


def test_work_runs_only_the_job_asked_for(tmp_path: Path) -> None:
    queue = tmp_path / "q"
    runner.submit(make_spec_dict("job-a"), queue=queue)
    runner.submit(make_spec_dict("job-b"), queue=queue)

    result = runner.work(queue=queue, job="job-b")

    assert result.done == ["job-b"]
    assert state(Queue(queue), "job-a").status.value == "queued"


def test_work_puts_back_the_signal_handlers_it_replaced(tmp_path: Path, kernel_sigint: object) -> None:
    queue = tmp_path / "q"
    runner.submit(make_spec_dict(), queue=queue)
    sigterm = signal.getsignal(signal.SIGTERM)

    assert runner.work(queue=queue).done == ["job-a"]

    assert signal.getsignal(signal.SIGINT) is kernel_sigint
    assert signal.getsignal(signal.SIGTERM) == sigterm


def test_work_puts_back_the_signal_handlers_when_it_raises(tmp_path: Path, kernel_sigint: object) -> None:
    queue = tmp_path / "q"
    runner.submit(make_spec_dict(), queue=queue)

    with pytest.raises(JobNotFound):
        runner.work(queue=queue, job="no-such-job")
    with pytest.raises(UsageError, match="--max-hours must be a positive number of hours"):
        runner.work(queue=queue, max_hours=0)

    assert signal.getsignal(signal.SIGINT) is kernel_sigint
    assert events(Queue(queue), "job-a", "claimed") == []


def test_work_runs_in_a_background_thread_of_a_notebook(tmp_path: Path, kernel_sigint: object) -> None:
    """A notebook may train in a thread to keep its cells usable; only the main thread may set signal handlers."""
    queue = tmp_path / "q"
    runner.submit(make_spec_dict(), queue=queue)
    outcome: dict[str, object] = {}

    def train() -> None:
        try:
            outcome["result"] = runner.work(queue=queue)
        except BaseException as error:  # noqa: BLE001 (reported by the assertion below)
            outcome["error"] = error

    thread = threading.Thread(target=train)
    thread.start()
    thread.join(timeout=60)

    assert not thread.is_alive()
    assert "error" not in outcome, outcome
    assert outcome["result"].done == ["job-a"]  # type: ignore[attr-defined]
    assert signal.getsignal(signal.SIGINT) is kernel_sigint


# --- status ------------------------------------------------------------------------------------------------


@pytest.fixture
def ran(tmp_path: Path) -> Path:
    """A queue where job-a is done and job-b still queued."""
    queue = tmp_path / "q"
    runner.submit(make_spec_dict("job-a", priority=1), queue=queue)
    runner.submit(make_spec_dict("job-b"), queue=queue)
    runner.work(queue=queue, job="job-a")
    return queue


def test_status_is_a_sequence_of_records_by_position_and_name(ran: Path) -> None:
    report = runner.status(queue=ran)

    assert len(report) == 2
    assert [record["name"] for record in report] == ["job-a", "job-b"]
    assert report["job-a"]["state"] == "done" and report["job-a"]["epoch"] == 3
    assert report["job-b"]["state"] == "queued"
    assert report[1] is report["job-b"]
    with pytest.raises(JobNotFound):
        report["no-such-job"]


def test_status_json_is_the_cli_contract(ran: Path) -> None:
    report = runner.status(queue=ran)
    cli = run_cli("status", "--queue", str(ran), "--json")

    assert cli.returncode == 0, cli.stderr
    from_api, from_cli = json.loads(report.to_json()), json.loads(cli.stdout)
    assert [sorted(record) for record in from_api] == [sorted(record) for record in from_cli]
    stable = ("name", "state", "epoch", "epochs", "step", "restarts", "checkpoint", "metrics", "error", "device")
    assert [{key: r[key] for key in stable} for r in from_api] == [{key: r[key] for key in stable} for r in from_cli]


def test_status_shows_as_the_table_in_text_and_html(ran: Path) -> None:
    report = runner.status(queue=ran)

    text, html = str(report), report._repr_html_()

    assert f"queue {ran}" in text
    for name, shown in (("job-a", "done"), ("job-b", "queued")):
        row = [line for line in text.splitlines() if name in line]
        assert len(row) == 1 and shown in row[0], text
    assert repr(report) == text
    assert html.lstrip().lower().startswith("<!doctype html>") and "</html>" in html.lower()
    assert "job-a" in html and "job-b" in html


def test_status_of_an_empty_queue(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    report = runner.status(queue=tmp_path / "empty")

    assert len(report) == 0 and list(report) == [] and json.loads(report.to_json()) == []
    assert "no jobs yet" in str(report)


def test_the_queue_folder_is_looked_for_once_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a dropped mount the check must not spend the 300 s budget before status's own 10 s: one stat, and a
    failing one is left to the command's reads."""
    calls = []

    def dropped_mount(path: object, *args: object, **kwargs: object) -> os.stat_result:
        calls.append(path)
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", str(path))

    monkeypatch.setattr(api_module.os, "stat", dropped_mount)
    queue = api_module.open_queue(tmp_path / "on-drive", must_exist=True)
    assert queue.root == tmp_path / "on-drive" and calls == [tmp_path / "on-drive"]


def test_a_queue_folder_that_does_not_exist_is_an_error_not_an_empty_queue(tmp_path: Path) -> None:
    missing = tmp_path / "mistyped"
    for call in (lambda: runner.status(queue=missing), lambda: runner.work(queue=missing)):
        with pytest.raises(QueueNotFound, match=f"no queue folder at {missing} \\(as given\\)"):
            call()
    assert not missing.exists()


# --- logs --------------------------------------------------------------------------------------------------


def test_logs_returns_the_jobs_log_as_text(ran: Path) -> None:
    text = runner.logs("job-a", queue=ran)

    assert "starting on" in text and "claim generation 1" in text
    assert text.rstrip().endswith("done")
    assert runner.logs("job-b", queue=ran) == ""  # not run yet: no log
    with pytest.raises(JobNotFound, match="no job named 'no-such-job'"):
        runner.logs("no-such-job", queue=ran)


def test_a_submitted_spec_file_and_its_dict_are_the_same_job(tmp_path: Path) -> None:
    spec_file = write_spec(tmp_path, "job-a")
    queue = tmp_path / "q"

    runner.submit(spec_file, queue=queue)

    data = yaml.safe_load(spec_file.read_text())
    assert runner.submit(data, queue=queue) == "job-a"
    assert runner.submit(parse_spec(data), queue=queue) == "job-a"
