"""Status: the ``runner status --json`` contract, damaged folders, the table, watch, eta and ages."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from runner import storage
from runner.checkpoints import parse_checkpoint_id
from runner.console import (
    FolderSizes,
    eta_seconds,
    format_age,
    format_size,
    render_status,
    status_records,
    status_table,
    watch_status,
)
from runner.job import JobStatus
from runner.paths import publish_note
from runner.queue import Queue
from runner.worker import Worker
from tests.conftest import make_spec, run_cli, runner_env, start_cli
from tests.drivesim import DriveSim
from tests.drivesim.fixtures import SimFactory, requires_fuse
from tests.support.counting_trainer import CountingTrainer, expected_value
from tests.support.worker_helpers import (
    quiet_console,
    reaped,
    state,
    status_json,
    store,
    wait_until,
)

CONTRACT_KEYS = {"name", "state", "epoch", "epochs", "step", "restarts", "checkpoint", "metrics", "error"}
STATES = {"queued", "running", "interrupted", "done", "failed", "cancelled"}
WIDE = runner_env(COLUMNS="400")
"""So that rich does not wrap long error lines of the table in the middle of a path."""


def check_contract(row: dict[str, Any]) -> None:
    """The keys and types every status object promises."""
    assert CONTRACT_KEYS <= row.keys()
    assert row["state"] in STATES
    assert isinstance(row["epoch"], int) and isinstance(row["step"], int) and isinstance(row["restarts"], int)
    assert row["epochs"] is None or isinstance(row["epochs"], int)
    assert row["checkpoint"] is None or parse_checkpoint_id(row["checkpoint"]) is not None
    assert isinstance(row["metrics"], dict)
    assert row["error"] is None or (isinstance(row["error"], str) and "\n" not in row["error"] and row["error"])


def table_rows(text: str) -> dict[str, str]:
    """The table's rows keyed by job name (error lines beneath the table, ``name: ...``, left out)."""
    rows = {}
    for line in text.splitlines():
        first = line.split(" ", 1)[0]
        if first and not first.endswith(":") and first not in ("queue", "job") and not first.startswith("─"):
            assert first not in rows, text
            rows[first] = line
    return rows


def render(renderable: Any) -> str:
    """A renderable as plain text, at width 100."""
    console = quiet_console()
    console.print(renderable)
    return console.file.getvalue()


def work(queue: Queue, only: str) -> None:
    Worker(queue, CountingTrainer, console=quiet_console(), only=only).run()


@pytest.fixture
def mixed(queue: Queue) -> Queue:
    """One job of each settled state: done, failed, cancelled and queued."""
    queue.submit(make_spec("s-done", priority=3))
    queue.submit(make_spec("s-failed", priority=2, model={"params": {"steps": 4, "fail_at_epoch": 1}}))
    queue.submit(make_spec("s-cancelled", priority=1))
    queue.submit(make_spec("s-queued", training={"epochs": 7}))
    work(queue, "s-done")
    work(queue, "s-failed")
    queue.cancel("s-cancelled")
    return queue


# --- the JSON contract ------------------------------------------------------------------------------------------


def test_status_json_is_an_array_in_claim_order_with_the_contract_keys(mixed: Queue) -> None:
    done = run_cli("status", "--queue", str(mixed.root), "--json")

    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert isinstance(rows, list)
    assert [row["name"] for row in rows] == ["s-done", "s-failed", "s-cancelled", "s-queued"]
    for row in rows:
        check_contract(row)


def test_status_json_values_of_settled_jobs(mixed: Queue) -> None:
    rows = status_json(mixed, run_cli)

    done = rows["s-done"]
    newest = store(mixed, "s-done").newest()
    assert (done["state"], done["epoch"], done["epochs"], done["step"]) == ("done", 3, 3, 0)
    assert done["restarts"] == 0
    assert done["checkpoint"] == newest.id and parse_checkpoint_id(newest.id)[1] == 3
    assert done["metrics"] == {"value": expected_value(3, 4) % 1000}
    assert done["error"] is None

    failed = rows["s-failed"]
    assert (failed["state"], failed["epoch"], failed["epochs"]) == ("failed", 1, 3)
    assert failed["checkpoint"] == store(mixed, "s-failed").newest().id
    assert failed["metrics"] == {"value": expected_value(1, 4) % 1000}
    assert "injected failure at epoch 1" in failed["error"] and "\n" not in failed["error"]

    cancelled = rows["s-cancelled"]
    assert (cancelled["state"], cancelled["epoch"], cancelled["checkpoint"], cancelled["error"]) == (
        "cancelled", 0, None, None,
    )

    queued = rows["s-queued"]
    assert queued == {**queued, "state": "queued", "epoch": 0, "epochs": 7, "step": 0, "restarts": 0}
    assert (queued["checkpoint"], queued["metrics"], queued["error"]) == (None, {}, None)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_status_shows_each_jobs_size_and_the_queues_total(mixed: Queue) -> None:
    rows = status_json(mixed, run_cli)
    table = run_cli("status", "--queue", str(mixed.root), env=runner_env(COLUMNS="200"))

    sizes = {name: folder_bytes(mixed.job(name).paths.folder) for name in rows}
    assert {name: row["size_bytes"] for name, row in rows.items()} == sizes
    assert sizes["s-done"] > 65536  # the checkpoint kept once it is done holds 64 KiB of weights
    assert sizes["s-queued"] < 4096  # a spec, a state and an event
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()  # a title wider than the table (a long queue path) wraps under it
    title = " ".join(line.strip() for line in lines[: next(i for i, line in enumerate(lines) if line.startswith("job"))])
    total = sum(sizes.values())
    assert title == f"queue {mixed.root} · {format_size(total)} in 4 jobs", title
    assert " size " in next(line for line in lines if line.startswith("job")) + " "
    assert format_size(sizes["s-done"]) in table_rows(table.stdout)["s-done"]


def test_watch_measures_sizes_again_only_after_a_while(queue: Queue) -> None:
    queue.submit(make_spec("job-a"))
    ticks = iter([0.0, 10.0, 40.0])
    sizes = FolderSizes(max_age_s=30.0, clock=lambda: next(ticks))
    view = queue.view("job-a")
    first = sizes.of(view)
    (view.folder / "extra.bin").write_bytes(b"x" * 5000)

    assert sizes.of(view) == first  # 10 s later: the measure of before
    assert sizes.of(view) == first + 5000  # 40 s later: measured again


@pytest.mark.parametrize(
    ("size", "shown"),
    [(None, "-"), (0, "0 B"), (1_234, "1.2 kB"), (12_345, "12 kB"), (850e6, "850 MB"), (42e8, "4.2 GB")],
)
def test_format_size(size: float | None, shown: str) -> None:
    assert format_size(None if size is None else int(size)) == shown


@pytest.mark.slow
def test_status_json_shows_running_then_interrupted_after_sigkill(queue: Queue) -> None:
    # Parked in epoch 2 (after its second checkpoint) until killed, so it is still running when status is asked.
    params = {"steps": 5, "step_seconds": 0.1, "park_at_epoch": 2}
    queue.submit(make_spec("victim", model={"params": params}, training={"epochs": 20}))
    with reaped(start_cli("work", "--queue", str(queue.root))) as process:
        first = wait_until(lambda: state(queue, "victim").checkpoint, "a first checkpoint")
        running = status_json(queue, run_cli)["victim"]
        check_contract(running)
        assert running["state"] == "running"
        # Kill just after a checkpoint is recorded, not while the next one is being published.
        wait_until(lambda: state(queue, "victim").checkpoint not in (None, first), "a second checkpoint")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    stored = state(queue, "victim")
    assert stored.status is JobStatus.RUNNING
    row = status_json(queue, run_cli)["victim"]
    check_contract(row)
    assert row["state"] == "interrupted"
    assert row["checkpoint"] == stored.checkpoint == store(queue, "victim").newest().id
    assert row["epoch"] == parse_checkpoint_id(row["checkpoint"])[1] >= 2
    assert (row["epochs"], row["restarts"], row["error"]) == (20, 0, None)
    assert row["metrics"] == {"value": expected_value(row["epoch"], 5) % 1000}


# --- damaged job folders ----------------------------------------------------------------------------------------


@pytest.fixture
def damaged(queue: Queue) -> Queue:
    """A queue with a garbage state.json in one job and an invalid YAML spec in another."""
    for name in ("bad-state", "fine", "bad-spec"):
        queue.submit(make_spec(name))
    queue.job("bad-state").paths.state.write_bytes(b"\x00{not json")
    queue.job("bad-spec").paths.spec.write_text("name: [unclosed\n")
    return queue


def test_status_json_reports_a_damaged_folder_on_its_own_row(damaged: Queue) -> None:
    rows = status_json(damaged, run_cli)

    assert set(rows) == {"bad-state", "fine", "bad-spec"}
    for row in rows.values():
        check_contract(row)
    assert rows["fine"]["state"] == "queued" and rows["fine"]["error"] is None
    assert rows["bad-state"]["state"] == "failed"
    assert "state.json" in rows["bad-state"]["error"]
    assert rows["bad-spec"]["state"] == "failed"
    assert "spec.yaml" in rows["bad-spec"]["error"]
    assert rows["bad-spec"]["epochs"] is None


def test_status_table_reports_a_damaged_folder_and_shows_the_others(damaged: Queue) -> None:
    shown = run_cli("status", "--queue", str(damaged.root), env=WIDE)

    assert shown.returncode == 0, shown.stderr
    assert "Traceback" not in shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    assert any("fine" in line and "queued" in line for line in lines)
    assert any(line.startswith("bad-state: ") and "state.json" in line for line in lines)
    assert any(line.startswith("bad-spec: ") and "spec.yaml" in line for line in lines)

    rows = table_rows(render(render_status(damaged)))
    assert "queued" in rows["fine"]
    assert "failed" in rows["bad-state"]
    assert "failed" in rows["bad-spec"]


# --- the table --------------------------------------------------------------------------------------------------


def test_status_table_has_a_row_per_job_with_state_and_epochs_and_errors_beneath(mixed: Queue) -> None:
    text = render(status_table(mixed.views(), 2e9, title="queue"))
    lines = text.splitlines()
    rows = table_rows(text)

    assert list(rows) == ["s-done", "s-failed", "s-cancelled", "s-queued"]
    assert "done" in rows["s-done"] and "3/3" in rows["s-done"]
    assert "failed" in rows["s-failed"] and "1/3" in rows["s-failed"] and "error (below)" in rows["s-failed"]
    assert "cancelled" in rows["s-cancelled"] and "0/3" in rows["s-cancelled"]
    assert "queued" in rows["s-queued"] and "0/7" in rows["s-queued"]
    # The full error goes on a line of its own beneath the table.
    error_lines = [line for line in lines if line.startswith("s-failed: ")]
    assert len(error_lines) == 1 and "injected failure at epoch 1" in error_lines[0]
    assert lines.index(error_lines[0]) > lines.index(rows["s-queued"])


def test_status_table_of_an_empty_queue_tells_how_to_submit(queue: Queue) -> None:
    text = render(render_status(queue))

    assert "runner submit" in text
    assert "queued" not in text


def test_watch_status_refreshes_with_the_given_sleep(mixed: Queue) -> None:
    naps: list[float] = []
    console = quiet_console()

    watch_status(mixed, console, interval=0, sleep=naps.append, rounds=2)

    assert naps == [0, 0]
    assert "s-done" in console.file.getvalue()


# --- eta and ages -----------------------------------------------------------------------------------------------


def test_eta_is_positive_for_a_running_job_with_progress(queue: Queue) -> None:
    ticks = itertools.count(time.time(), 0.001)
    # A long lease, so that the heartbeat (real mtime) still looks fresh at the made-up "now" below.
    queue = Queue(queue.root, lease_duration=600.0, clock=lambda: next(ticks))
    queue.submit(make_spec("moving", training={"epochs": 4}))
    lease = queue.lease("moving")
    assert lease.try_acquire()
    try:
        claim = queue.claim("moving", lease)
        started = claim.job.read_state().session_started_at
        claim.update(epoch=1, checkpoint="g000001-e000001-s000000000", checkpoint_at=started + 100.0)
        view = queue.view("moving")
        assert view.shown_state(started + 110.0) == "running"

        eta = eta_seconds(view, started + 110.0)
    finally:
        lease.release()

    assert eta is not None and eta > 0
    assert eta == pytest.approx(3 * 100.0 - 10.0)  # three epochs left at 100 s each, 10 s since the last


def test_eta_is_none_for_queued_and_done_jobs(mixed: Queue) -> None:
    now = 2e9
    assert eta_seconds(mixed.view("s-queued"), now) is None
    assert eta_seconds(mixed.view("s-done"), now) is None


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(42, "42s"), (42.9, "42s"), (300, "5m"), (2 * 3600 + 5 * 60, "2h 05m"), (3 * 86400 + 4 * 3600, "3d 4h"),
     (0, "0s"), (-5, "0s"), (None, "-")],
)
def test_format_age(seconds: float | None, shown: str) -> None:
    assert format_age(seconds) == shown


def test_a_checkpoint_kept_locally_is_shown_while_its_worker_runs(
    queue: Queue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path / "cache"))
    queue.submit(make_spec("waiting"))
    lease = queue.lease("waiting")
    assert lease.try_acquire()
    try:
        claim = queue.claim("waiting", lease)
        assert claim is not None
        note = publish_note(tmp_path / "cache", "waiting")
        note.parent.mkdir(parents=True)
        since = time.time() - 42
        note.write_text(json.dumps({"since": since, "epoch": 3, "step": 7, "generation": 1, "error": "errno 107"}))
        record = status_records(queue.views(), time.time())[0]
        table = render_text(status_table(queue.views(), time.time()))
        stale = note.read_text().replace('"generation": 1', '"generation": 0')
        note.write_text(stale)  # a note of an earlier claim is not news
        after = status_records(queue.views(), time.time())[0]
    finally:
        lease.release()

    assert record["publishing"]["kept_locally"] == "epoch 3 step 7"
    assert record["publishing"]["failing_for_s"] >= 42 and record["publishing"]["error"] == "errno 107"
    assert "kept on local disk" in table and "errno 107" in table
    assert after["publishing"] is None


def render_text(renderable: Any) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(renderable)
    return console.file.getvalue()


# --- a queue folder that fails (Drive dropped) ------------------------------------------------------------------


@pytest.fixture
def drive_sim(tmp_path: Path) -> Iterator[SimFactory]:
    with SimFactory(tmp_path / "sims") as factory:
        yield factory


def kept_note(cache: Path, queue: Queue, name: str, *, epoch: int, step: int, pid: int | None = None) -> None:
    """The note a worker's publisher leaves on this machine while a checkpoint of ``name`` waits on local disk
    (by default as if this test's process were that worker)."""
    note = publish_note(cache, name)
    note.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(queue.paths.job(name).folder)
    record = {"since": time.time() - 42, "epoch": epoch, "step": step, "generation": 1, "folder": folder}
    worker = {"pid": os.getpid() if pid is None else pid, "host": socket.gethostname()}
    note.write_text(json.dumps(record | worker | {"error": "errno 107"}))


def a_dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@requires_fuse
def test_status_on_a_failing_queue_folder_names_the_error_and_what_this_machine_keeps(
    drive_sim: Callable[..., DriveSim], tmp_path: Path
) -> None:
    sim = drive_sim(cache_s=0.0)  # no kernel cache: every read reaches the failing mount
    queue = Queue(sim.mountpoint / "queue")
    queue.submit(make_spec("waiting"))
    other = Queue(tmp_path / "another-queue")
    cache = tmp_path / "cache"
    kept_note(cache, queue, "waiting", epoch=3, step=7)
    kept_note(cache, other, "elsewhere", epoch=9, step=9)  # another queue's job: not this queue's news
    kept_note(cache, queue, "gone", epoch=5, step=0, pid=a_dead_pid())  # its worker died: not news either
    env = runner_env(RUNNER_CACHE=str(cache), RUNNER_RETRY_BUDGET="0.5", COLUMNS="400")
    sim.outage(600)
    try:
        table = run_cli("status", "--queue", str(queue.root), env=env)
        as_json = run_cli("status", "--json", "--queue", str(queue.root), env=env)
    finally:
        sim.outage(0)
    answered = run_cli("status", "--json", "--queue", str(queue.root), env=env)

    assert sum(sim.stats()["outage"].values()) >= 2, "the outage failed no call"
    for failed in (table, as_json):
        assert failed.returncode == 1, failed.stderr
        assert failed.stdout == "" and "Traceback" not in failed.stderr
        lines = [line for line in failed.stderr.splitlines() if not line.startswith("storage error (")]  # retries
        assert lines[0].startswith("error:") and "Transport endpoint is not connected" in lines[0], lines
        assert len(lines) > 1, failed.stderr
        assert lines[1].startswith("waiting: the checkpoint at epoch 3 step 7 is kept on this machine's disk"), lines
        assert len(lines) == 2, lines  # the other queue's note is not shown
    assert answered.returncode == 0 and [row["name"] for row in json.loads(answered.stdout)] == ["waiting"]


@requires_fuse
def test_watch_shows_a_failing_queue_folder_and_goes_on_watching(
    drive_sim: Callable[..., DriveSim], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = drive_sim(cache_s=0.0)
    queue = Queue(sim.mountpoint / "queue")
    queue.submit(make_spec("waiting"))
    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path / "cache"))
    kept_note(tmp_path / "cache", queue, "waiting", epoch=3, step=7)
    monkeypatch.setattr(storage, "_budget", [0.3])
    frames = []

    def outage_then_recovery(_: float) -> None:
        frames.append(None)
        sim.outage(600 if len(frames) == 1 else 0)

    console = Console(file=io.StringIO(), width=300, force_terminal=True, color_system=None)  # every frame drawn
    watch_status(queue, console, interval=0, sleep=outage_then_recovery, rounds=2)
    failing, _, recovered = console.file.getvalue().partition("is published when the folder answers again")

    assert "Transport endpoint is not connected" in failing
    assert "waiting: the checkpoint at epoch 3 step 7 is kept on this machine's disk" in failing
    assert "waiting  queued" in recovered  # the table again once the folder answers


@pytest.mark.parametrize("width", [80, 64])
def test_the_table_fits_a_narrow_screen_by_dropping_columns_in_a_fixed_order(mixed: Queue, width: int) -> None:
    """Colab's `!` cells are 80 columns: nothing may be cut there, and every metric stays whole."""
    wide = render_text_at(status_table(mixed.views(), time.time(), width=400), 400)
    narrow = render_text_at(status_table(mixed.views(), time.time(), width=width), width)
    headers = narrow.splitlines()[0].split()

    assert "…" not in narrow and all(len(line) <= width for line in narrow.splitlines()), narrow
    assert headers[:3] == ["job", "state", "epochs"] and "metrics" in headers
    order = ["eta", "restarts", "step", "worker", "size", "saved"]
    dropped = [header for header in order if header not in headers]
    assert dropped == order[: len(dropped)] and dropped, narrow
    for token in re.findall(r"\w+=[\d.e-]+", wide):  # every metric of the wide table, whole, in the narrow one
        assert token in narrow, (token, narrow)


def render_text_at(renderable: Any, width: int) -> str:
    console = Console(file=io.StringIO(), width=width)
    console.print(renderable)
    return console.file.getvalue()
