"""Colab: finding it, Drive for the queue, the end of a session (--flush, --release-runtime), the time limit
(--max-hours and Colab's 12-hour default), and what each session trains on (nvidia-smi, recorded per job).

Colab itself cannot exist here: ``tests/support/fake_colab`` stands in for ``google.colab`` and records each
call; ``tests.support.colab_cli`` is the real ``runner`` command with Drive's mount point moved into the
test's folder. A small script stands in for NVIDIA's ``nvidia-smi``. Everything else is real: ``runner``
processes, queue folders, the worker and the counting trainer.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

import runner
from runner import colab, defaults, device
from runner.device import (
    Gpu,
    describe_devices,
    detect_gpus,
    parse_nvidia_smi,
    short_device,
)
from runner.errors import DriveUnavailable, UsageError
from runner.paths import default_cache_dir, default_queue_dir, on_colab
from runner.queue import Queue
from runner.session import SessionOptions, time_limit_hours
from runner.worker import Worker, WorkResult
from tests.conftest import (
    COUNTING_TRAINER,
    make_spec,
    make_spec_dict,
    run_cli,
    runner_env,
    write_spec,
)
from tests.support.colab_helpers import (
    FAKE_COLAB,
    ColabVM,
    colab_vm,
    cpu_only_path,
    flat,
    forget_fake_colab,
    gpu_path,
    install_nvidia_smi,
    lines_with,
    one_error_line,
    pretend_ipython,
    queue_at,
    run_colab_cli,
    start_colab_cli,
)
from tests.support.counting_trainer import CountingTrainer, expected_value
from tests.support.worker_helpers import (
    events,
    quiet_console,
    reaped,
    result_value,
    state,
    status_json,
    verified_checkpoints,
    wait_until,
)

PARKED = {"model": {"params": {"steps": 5, "step_seconds": 0.05, "park_at_epoch": 1}}, "training": {"epochs": 4}}
"""A job that waits in its epoch 1 until it is asked to stop, so a stop always lands mid-training."""
"""About 3 s of training (sleeping, so it takes at least that), a checkpoint every 0.5 s."""

T4 = "Tesla T4, 15360\n"
"""What nvidia-smi prints for runner's query on a Colab T4 runtime."""


@pytest.fixture
def not_colab(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as it is outside Colab (whatever the machine running the tests is)."""
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    forget_fake_colab()
    if on_colab():
        pytest.skip("google.colab is importable here: this machine is a Colab runtime")


@pytest.fixture
def colab_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ColabVM]:
    """This test process modelled as a Colab kernel's: ``COLAB_RELEASE_TAG`` set, the stand-in ``google.colab``
    importable, Drive's mount point (and the default queue on it) in ``tmp_path``, the counting trainer."""
    vm = colab_vm(tmp_path)
    monkeypatch.syspath_prepend(str(FAKE_COLAB))
    monkeypatch.setattr(defaults, "DRIVE_MOUNT_POINT", str(vm.mount_point))
    monkeypatch.setattr(defaults, "QUEUE_DIR_COLAB", str(vm.queue_root))
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    monkeypatch.setenv("FAKE_COLAB_LOG", str(vm.log))
    monkeypatch.setenv("FAKE_COLAB_MOUNT_POINT", str(vm.mount_point))
    monkeypatch.setenv(defaults.TRAINER_ENV, COUNTING_TRAINER)
    monkeypatch.delenv(defaults.QUEUE_ENV, raising=False)
    for variable in ("FAKE_COLAB_MOUNT", "FAKE_COLAB_FLUSH", "FAKE_COLAB_UNASSIGN"):
        monkeypatch.delenv(variable, raising=False)
    try:
        yield vm
    finally:
        forget_fake_colab()


def colab_env(vm: ColabVM, **extra: str) -> dict[str, str]:
    """A modelled Colab VM without a GPU (no nvidia-smi on $PATH)."""
    return vm.env(PATH=cpu_only_path(), **extra)


# --- finding Colab and its queue ----------------------------------------------------------------------------


def test_colab_is_recognised_by_its_release_tag(not_colab: None) -> None:
    assert on_colab({"COLAB_RELEASE_TAG": "release-colab_20240601-060135_RC00"})
    assert not on_colab({"COLAB_RELEASE_TAG": ""})
    assert not on_colab({})


def test_colab_is_recognised_by_an_importable_google_colab_without_importing_it(
    not_colab: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    protobuf_before = importlib.util.find_spec("google.protobuf") is not None
    monkeypatch.syspath_prepend(str(FAKE_COLAB))
    try:
        assert on_colab({})
        assert default_queue_dir({}) == Path(defaults.QUEUE_DIR_COLAB)
        # Looked up only: importing google.colab outside a kernel has side effects on a real runtime.
        assert "google.colab" not in sys.modules
        # The stand-in joins the shared `google` namespace package instead of hiding protobuf (and TensorFlow).
        assert (importlib.util.find_spec("google.protobuf") is not None) == protobuf_before
    finally:
        forget_fake_colab()


def test_the_default_queue_is_on_drive_on_colab_and_local_elsewhere(not_colab: None) -> None:
    on = {"COLAB_RELEASE_TAG": "release"}
    assert default_queue_dir(on) == Path("/content/drive/MyDrive/runner") == Path(defaults.QUEUE_DIR_COLAB)
    assert default_queue_dir({}) == Path("runner-queue")
    assert default_queue_dir({**on, "RUNNER_QUEUE": "/data/q"}) == Path("/data/q")
    assert default_cache_dir(on) == Path("/content/runner-cache")
    assert default_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/runner")


def test_in_notebook_kernel_needs_an_ipython_shell_with_a_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert not colab.in_notebook_kernel()  # a `!runner` shell cell or a plain script
    pretend_ipython(monkeypatch, shell=False, kernel=False)
    assert not colab.in_notebook_kernel()  # IPython imported, but no shell running
    pretend_ipython(monkeypatch, shell=True, kernel=False)
    assert not colab.in_notebook_kernel()  # a terminal `ipython`
    pretend_ipython(monkeypatch, shell=True, kernel=True)
    assert colab.in_notebook_kernel()  # a notebook cell


# --- Drive -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["work"], ["submit", "SPEC"]])
def test_a_shell_cell_on_colab_without_drive_says_how_to_mount_it_in_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    vm = colab_vm(tmp_path)
    args = [str(write_spec(tmp_path)) if arg == "SPEC" else arg for arg in command]

    done = run_colab_cli(*args, env=colab_env(vm))

    assert done.returncode == 1, done.stderr
    line = flat(one_error_line(done.stderr))
    assert "is not mounted" in line
    assert f"drive.mount('{vm.mount_point}')" in line
    assert "--queue" in line
    assert vm.calls() == []  # a shell cannot show Drive's consent prompt: no mount is tried
    assert not vm.my_drive.exists()
    assert done.stdout == ""


def test_a_shell_cell_on_colab_uses_drive_when_it_is_mounted(tmp_path: Path) -> None:
    vm = colab_vm(tmp_path)
    vm.mount_drive()

    submitted = run_colab_cli("submit", str(write_spec(tmp_path)), env=colab_env(vm))
    shown = run_colab_cli("status", "--json", env=colab_env(vm))

    assert submitted.returncode == 0, submitted.stderr
    assert shown.returncode == 0, shown.stderr
    assert [record["name"] for record in json.loads(shown.stdout)] == ["job-a"]
    assert (vm.queue_root / "jobs" / "job-a" / "spec.yaml").is_file()  # the default queue is on Drive
    assert vm.calls() == []  # already mounted: no mount


def test_a_notebook_cell_mounts_drive_once_with_a_timeout_then_runs_the_job(
    colab_here: ColabVM, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretend_ipython(monkeypatch, shell=True, kernel=True)

    name = runner.submit(make_spec_dict())
    result = runner.work(max_hours=1)

    assert colab_here.call_names() == ["drive.mount"]  # once: the second call found Drive mounted
    mount = colab_here.calls()[0]["args"]
    assert mount["mountpoint"] == str(colab_here.mount_point)
    assert mount["timeout_ms"] == int(colab.DRIVE_MOUNT_TIMEOUT_S * 1000) > 0
    assert result.done == [name] and result.exit_code == 0
    assert result_value(queue_at(colab_here.queue_root), name) == expected_value(3, 4)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("refuse", "ValueError: mount failed"),
        ("timeout", "ValueError: mount failed: timeout during initial read of root folder"),
        ("timeout-error", "TimeoutError: Timed out waiting for the mount to complete"),
        ("empty", "reported success but"),
    ],
)
def test_a_failed_mount_is_one_line_and_writes_nothing(
    colab_here: ColabVM, monkeypatch: pytest.MonkeyPatch, mode: str, reason: str
) -> None:
    pretend_ipython(monkeypatch, shell=True, kernel=True)
    monkeypatch.setenv("FAKE_COLAB_MOUNT", mode)

    with pytest.raises(DriveUnavailable) as raised:
        runner.submit(make_spec_dict())

    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message
    assert reason in message
    assert str(colab_here.mount_point) in message
    assert colab_here.call_names() == ["drive.mount"]
    assert not colab_here.queue_root.exists()


def test_ensure_drive_leaves_a_queue_off_drive_and_a_mounted_drive_alone(
    colab_here: ColabVM, tmp_path: Path
) -> None:
    colab.ensure_drive(tmp_path / "local-queue", can_prompt=True)  # a local queue on Colab needs no Drive
    assert colab_here.calls() == []

    (colab_here.mount_point / "My Drive").mkdir(parents=True)  # older runtimes' name for it
    colab.ensure_drive(colab_here.queue_root, can_prompt=False)
    assert colab_here.calls() == []

    with pytest.raises(DriveUnavailable):  # a queue on Drive given explicitly, Drive not mounted
        colab.ensure_drive(tmp_path / "elsewhere" / "drive" / "MyDrive" / "q", can_prompt=False,
                           mount_point=tmp_path / "elsewhere" / "drive")


def test_ensure_drive_does_nothing_outside_colab(
    not_colab: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(defaults, "DRIVE_MOUNT_POINT", str(tmp_path / "drive"))
    colab.ensure_drive(tmp_path / "drive" / "MyDrive" / "runner", can_prompt=False)  # no error, nothing made
    assert not (tmp_path / "drive").exists()


# --- the end of a session: --flush, --release-runtime ------------------------------------------------------


def colab_queue_with_jobs(vm: ColabVM, *specs: dict) -> Queue:
    """Drive mounted, with the counting jobs ``specs`` (name -> sections) in Colab's default queue."""
    vm.mount_drive()
    queue = queue_at(vm.queue_root)
    for spec in specs:
        queue.submit(make_spec(**spec))
    return queue


def test_release_runtime_flushes_drive_then_hands_the_runtime_back(tmp_path: Path) -> None:
    vm = colab_vm(tmp_path)
    colab_queue_with_jobs(vm, {"name": "job-a"}, {"name": "job-b"})

    done = run_colab_cli("work", "--release-runtime", "--max-hours", "1", env=colab_env(vm))

    assert done.returncode == 0, done.stderr
    assert vm.call_names() == ["drive.flush_and_unmount", "runtime.unassign"]
    assert vm.calls()[0]["args"]["timeout_ms"] == int(colab.DRIVE_FLUSH_TIMEOUT_S * 1000)
    # The table is printed before Drive is unmounted and the runtime released, so it still shows the jobs.
    assert "job-a" in done.stdout and "job-b" in done.stdout and "done" in done.stdout
    stderr = flat(done.stderr)
    assert stderr.index("Drive flushed and unmounted") < stderr.index("releasing the Colab runtime")
    cloud = queue_at(vm.cloud_queue_root)  # what reached Drive before it was unmounted
    assert [view.shown_state(0) for view in cloud.views()] == ["done", "done"]
    assert result_value(cloud, "job-b") == expected_value(3, 4)


@pytest.mark.parametrize(("failing", "code"), [(False, 0), (True, 1)])
def test_a_runtime_that_cannot_be_released_says_what_to_click_and_keeps_the_exit_code(
    tmp_path: Path, failing: bool, code: int
) -> None:
    vm = colab_vm(tmp_path)
    params = {"steps": 4, "fail_at_epoch": 1} if failing else {"steps": 4}
    colab_queue_with_jobs(vm, {"name": "job-a", "model": {"params": params}})

    done = run_colab_cli("work", "--release-runtime", "--max-hours", "1", env=colab_env(vm, FAKE_COLAB_UNASSIGN="fail"))

    assert done.returncode == code, done.stderr
    assert vm.call_names() == ["drive.flush_and_unmount", "runtime.unassign"]
    advice = lines_with(done.stderr, "Runtime > Disconnect and delete runtime")
    assert len(advice) == 1, done.stderr
    assert "RuntimeManagementError" in advice[0]
    assert "Traceback" not in done.stderr


def test_a_failed_flush_keeps_the_runtime_while_drive_may_hold_unsent_writes(tmp_path: Path) -> None:
    vm = colab_vm(tmp_path)
    queue = colab_queue_with_jobs(vm, {"name": "job-a"})

    done = run_colab_cli("work", "--release-runtime", "--max-hours", "1", env=colab_env(vm, FAKE_COLAB_FLUSH="fail"))

    assert done.returncode == 0, done.stderr
    assert vm.call_names() == ["drive.flush_and_unmount"]  # and no runtime.unassign
    assert len(lines_with(done.stderr, "--flush failed (ValueError: flush_and_unmount failed)")) == 1, done.stderr
    assert len(lines_with(done.stderr, "not releasing the runtime")) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert state(queue, "job-a").status.value == "done"


def test_flush_alone_flushes_drive_and_keeps_the_runtime(tmp_path: Path) -> None:
    vm = colab_vm(tmp_path)
    colab_queue_with_jobs(vm, {"name": "job-a"})

    done = run_colab_cli("work", "--flush", "--max-hours", "1", env=colab_env(vm))

    assert done.returncode == 0, done.stderr
    assert vm.call_names() == ["drive.flush_and_unmount"]
    assert "Drive flushed and unmounted" in done.stderr
    assert not vm.my_drive.exists()
    assert state(queue_at(vm.cloud_queue_root), "job-a").status.value == "done"


def test_the_table_after_flush_still_shows_the_jobs_that_ran(tmp_path: Path) -> None:
    vm = colab_vm(tmp_path)
    colab_queue_with_jobs(vm, {"name": "job-a"})

    done = run_colab_cli("work", "--flush", "--max-hours", "1", env=colab_env(vm, COLUMNS="200"))

    assert done.returncode == 0, done.stderr
    assert "no jobs yet" not in done.stdout
    assert "job-a" in done.stdout


def test_release_runtime_without_drive_mounted_releases_after_saying_there_is_nothing_to_flush(
    tmp_path: Path,
) -> None:
    vm = colab_vm(tmp_path)
    local = tmp_path / "local-queue"
    Queue(local).submit(make_spec())

    done = run_colab_cli("work", "--queue", str(local), "--release-runtime", "--max-hours", "1", env=colab_env(vm))

    assert done.returncode == 0, done.stderr
    assert vm.call_names() == ["runtime.unassign"]
    assert len(lines_with(done.stderr, "nothing to flush")) == 1, done.stderr


def test_flush_and_release_outside_colab_do_nothing_and_say_so(tmp_path: Path, not_colab: None) -> None:
    queue = Queue(tmp_path / "queue")
    queue.submit(make_spec())

    done = run_cli("work", "--queue", str(queue.root), "--flush", "--release-runtime", env=runner_env(COLUMNS="200"))

    assert done.returncode == 0, done.stderr
    assert lines_with(done.stderr, "not on Colab, nothing to do") != []
    assert len(lines_with(done.stderr, "nothing to do")) == 1
    assert "job-a" in done.stdout  # not going away: the table is shown
    assert state(queue, "job-a").status.value == "done"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_work_stopped_by_a_signal_neither_flushes_nor_releases(tmp_path: Path, signum: int) -> None:
    vm = colab_vm(tmp_path)
    queue = colab_queue_with_jobs(vm, {"name": "job-a", **PARKED})

    with reaped(start_colab_cli("work", "--release-runtime", "--max-hours", "1", env=colab_env(vm))) as process:
        wait_until(lambda: state(queue, "job-a").checkpoint, "a first checkpoint")
        os.kill(process.pid, signum)
        out, err = process.communicate(timeout=60)

    assert process.returncode == 128 + signum, err
    assert vm.calls() == []  # a person stopped it: keep Drive mounted and the runtime theirs
    assert vm.my_drive.is_dir()
    assert [event["reason"] for event in events(queue, "job-a", "interrupted")] == ["signal"]
    assert "job-a" in out  # the table is shown, since the runtime stays


# --- --max-hours -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "-0", "inf", "nan"])
def test_max_hours_that_is_no_time_limit_is_refused_in_one_line(queue: Queue, value: str) -> None:
    queue.submit(make_spec())

    done = run_cli("work", "--queue", str(queue.root), f"--max-hours={value}")

    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert "--max-hours must be a positive number of hours" in line
    assert events(queue, "job-a", "claimed") == []
    assert state(queue, "job-a").status.value == "queued"


def test_max_hours_that_is_not_a_number_is_a_usage_error(queue: Queue) -> None:
    queue.submit(make_spec())

    done = run_cli("work", "--queue", str(queue.root), "--max-hours", "abc")

    assert done.returncode == 2
    assert "invalid float value: 'abc'" in done.stderr
    assert "Traceback" not in done.stderr
    assert events(queue, "job-a", "claimed") == []


def test_check_max_hours_accepts_positive_finite_hours() -> None:
    assert colab.check_max_hours(0.25) == 0.25
    assert colab.check_max_hours(1e-9) == 1e-9
    for bad in (0.0, -2.0, float("inf"), float("-inf"), float("nan")):
        with pytest.raises(UsageError, match="--max-hours must be a positive number of hours"):
            colab.check_max_hours(bad)


def test_max_hours_stops_the_job_with_a_checkpoint_and_the_next_session_resumes_it(queue: Queue) -> None:
    queue.submit(make_spec("job-a", priority=1, **PARKED))
    queue.submit(make_spec("job-b"))

    # 0.0004 h is 1.44 s; job-a waits in epoch 1 until it is asked to stop, so the limit comes while it trains.
    first = run_cli("work", "--queue", str(queue.root), "--max-hours", "0.0004")

    assert first.returncode == defaults.EXIT_TIME_LIMIT == 75, first.stderr
    assert "stopped at the time limit" in flat(first.stderr)
    interrupted = events(queue, "job-a", "interrupted")
    assert [event["reason"] for event in interrupted] == ["max-hours"]
    stopped_at = state(queue, "job-a").checkpoint
    assert stopped_at is not None
    assert stopped_at == verified_checkpoints(queue, "job-a")[0].id  # committed and intact
    assert events(queue, "job-b", "claimed") == []  # not started after the limit
    shown = status_json(queue, run_cli)
    assert shown["job-a"]["state"] == "interrupted"
    assert shown["job-a"]["checkpoint"] == stopped_at
    assert shown["job-b"]["state"] == "queued"

    second = run_cli("work", "--queue", str(queue.root))

    assert second.returncode == 0, second.stderr
    assert [event["checkpoint"] for event in events(queue, "job-a", "resumed")] == [stopped_at]
    assert result_value(queue, "job-a") == expected_value(4, 5)  # as if never stopped
    assert state(queue, "job-b").status.value == "done"


class JumpingClock:
    """A monotonic clock that jumps two hours ahead once ``trigger(calls so far)`` holds: the time limit, reached at a
    chosen point instead of after a chosen wait."""

    def __init__(self, trigger: Callable[[int], bool]) -> None:
        self.trigger, self.calls = trigger, 0

    def __call__(self) -> float:
        self.calls += 1
        return 1000.0 + (7200.0 if self.trigger(self.calls) else 0.0)


def limited_worker(queue: Queue, trigger: Callable[[int], bool], console: Console | None = None) -> Worker:
    """An in-process worker with a one-hour limit that :class:`JumpingClock` reaches when ``trigger`` says."""
    return Worker(
        queue, CountingTrainer, console=console or quiet_console(), max_hours=1.0, clock=JumpingClock(trigger)
    )


def test_the_time_limit_mid_job_checkpoints_mid_epoch_and_starts_no_other_job(queue: Queue) -> None:
    queue.submit(make_spec("job-a", priority=1, model={"params": {"steps": 50}}))
    queue.submit(make_spec("job-b"))

    result = limited_worker(queue, lambda calls: calls > 40).run()  # some steps into job-a's first epoch

    assert result.time_limited == ["job-a"] and result.time_limit_reached
    assert result.done == [] and result.exit_code == 75
    checkpoint = verified_checkpoints(queue, "job-a")[0]
    assert (checkpoint.epoch, checkpoint.step) != (0, 0)  # saved where it stopped, not at an epoch's start
    assert events(queue, "job-b", "claimed") == []

    again = Worker(queue, CountingTrainer, console=quiet_console()).run()

    assert again.done == ["job-a", "job-b"] and again.exit_code == 0
    assert result_value(queue, "job-a") == expected_value(3, 50)


def test_a_job_stopped_by_the_time_limit_is_work_left_even_when_it_is_the_only_one(queue: Queue) -> None:
    queue.submit(make_spec("job-a", model={"params": {"steps": 50}}))

    result = limited_worker(queue, lambda calls: calls > 40).run()

    assert result.time_limited == ["job-a"] and result.time_limit_reached and result.exit_code == 75
    assert len(events(queue, "job-a", "claimed")) == 1  # stopped, not claimed again by the same session


def test_the_time_limit_between_jobs_starts_no_new_one_and_says_so(queue: Queue) -> None:
    queue.submit(make_spec("job-a", priority=1))
    queue.submit(make_spec("job-b"))
    finished = queue.paths.job("job-a").final / "result.json"
    console = quiet_console()

    result = limited_worker(queue, lambda _: finished.exists(), console=console).run()

    assert result.done == ["job-a"] and result.time_limited == []
    assert result.time_limit_reached and result.exit_code == 75
    assert events(queue, "job-b", "claimed") == []
    assert "time limit reached: no new job started" in console.file.getvalue()


def test_a_time_limit_with_nothing_left_to_run_is_success(queue: Queue) -> None:
    queue.submit(make_spec("job-a"))
    finished = queue.paths.job("job-a").final / "result.json"

    result = limited_worker(queue, lambda _: finished.exists()).run()

    assert result.done == ["job-a"] and not result.time_limit_reached and result.exit_code == 0


def test_work_result_exit_codes() -> None:
    assert WorkResult().exit_code == 0
    assert WorkResult(time_limit_reached=True, time_limited=["a"]).exit_code == 75
    assert WorkResult(time_limit_reached=True, failed=["b"]).exit_code == 1
    assert WorkResult(time_limit_reached=True, signal=int(signal.SIGTERM)).exit_code == 143


# --- Colab's 12-hour default -------------------------------------------------------------------------------


def test_default_max_hours_counts_the_12_hours_from_the_vm_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release")
    assert colab.default_max_hours(0.0) == 11.5
    assert colab.default_max_hours(None) == 11.5  # uptime unknown: as if the VM had just started
    assert colab.default_max_hours(3600.0) == 10.5
    assert colab.default_max_hours(11.8 * 3600) == 0.0  # past the margin: stop at once
    assert colab.default_max_hours(40 * 3600) == 0.0
    monkeypatch.delenv("COLAB_RELEASE_TAG")
    forget_fake_colab()
    if not on_colab():
        assert colab.default_max_hours(3600.0) is None  # elsewhere: no limit unless asked


def test_vm_uptime_is_read_from_proc_uptime(tmp_path: Path) -> None:
    uptime = tmp_path / "uptime"
    uptime.write_text("12345.67 45678.90\n")
    assert colab.vm_uptime_s(uptime) == 12345.67
    uptime.write_text("garbage\n")
    assert colab.vm_uptime_s(uptime) is None
    uptime.write_text("")
    assert colab.vm_uptime_s(uptime) is None
    assert colab.vm_uptime_s(tmp_path / "missing") is None


def test_the_session_says_the_colab_default_limit_aloud(colab_here: ColabVM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(colab, "vm_uptime_s", lambda: 3600.0)
    console = Console(file=io.StringIO(), width=200)

    assert time_limit_hours(SessionOptions(), console) == 10.5
    assert "stopping with a checkpoint within 10.5 h, before the 12-hour cap" in console.file.getvalue()

    quiet = Console(file=io.StringIO(), width=200)
    assert time_limit_hours(SessionOptions(max_hours=2.0), quiet) == 2.0  # given: no default, nothing said
    assert quiet.file.getvalue() == ""
    with pytest.raises(UsageError):
        time_limit_hours(SessionOptions(max_hours=0.0), quiet)


def test_outside_colab_there_is_no_default_limit(not_colab: None) -> None:
    console = Console(file=io.StringIO(), width=200)
    assert time_limit_hours(SessionOptions(), console) is None
    assert console.file.getvalue() == ""


def test_runner_work_on_colab_states_its_default_limit(tmp_path: Path) -> None:
    vm = colab_vm(tmp_path)
    local = tmp_path / "local-queue"
    local.mkdir()  # a queue with nothing to run

    default = run_colab_cli("work", "--queue", str(local), env=colab_env(vm))
    given = run_colab_cli("work", "--queue", str(local), "--max-hours", "3", env=colab_env(vm))

    uptime_s = colab.vm_uptime_s()
    if uptime_s is not None and uptime_s >= 11.4 * 3600:
        pytest.skip("this machine has been up for more than 11.4 hours: the default limit has (nearly) passed")
    assert default.returncode == 0, default.stderr
    said = lines_with(flat(default.stderr), "Colab session: stopping with a checkpoint within")
    assert len(said) == 1, default.stderr
    assert "h, before the 12-hour cap (change it with --max-hours)" in said[0]
    assert given.returncode == 0, given.stderr
    assert "Colab session:" not in given.stderr


def test_a_notebook_late_in_its_colab_session_starts_no_job(
    colab_here: ColabVM, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    colab_here.mount_drive()
    monkeypatch.setattr(colab, "vm_uptime_s", lambda: 11.8 * 3600)
    runner.submit(make_spec_dict())

    result = runner.work()

    assert result.time_limit_reached and result.exit_code == 75
    assert result.done == []
    assert events(queue_at(colab_here.queue_root), "job-a", "claimed") == []
    said = " ".join(capsys.readouterr().err.split())
    assert "this Colab VM has run 11.8 h, past the point where runner stops" in said
    assert "within 0.0 h" not in said


# --- devices -----------------------------------------------------------------------------------------------


def test_parse_nvidia_smi() -> None:
    assert parse_nvidia_smi("Tesla T4, 15360\n") == [Gpu("Tesla T4", 15360)]
    two = "NVIDIA A100-SXM4-40GB, 40960\nNVIDIA A100-SXM4-40GB, 40960\n"
    assert parse_nvidia_smi(two) == [Gpu("NVIDIA A100-SXM4-40GB", 40960)] * 2
    assert parse_nvidia_smi("GRID A100D-4C, [N/A]\n") == [Gpu("GRID A100D-4C", None)]
    assert parse_nvidia_smi("NVIDIA L4, 23034\r\n\n  \n") == [Gpu("NVIDIA L4", 23034)]
    assert parse_nvidia_smi("") == []
    assert parse_nvidia_smi("No devices were found\n") == []


def test_devices_are_described_in_full_for_records_and_shortly_for_the_table() -> None:
    two = parse_nvidia_smi("NVIDIA A100-SXM4-40GB, 40960\nNVIDIA A100-SXM4-40GB, 40960\n")
    assert describe_devices([]) == "CPU"
    assert describe_devices([Gpu("Tesla T4", 15360)]) == "Tesla T4 (15360 MiB)"
    assert describe_devices(two) == "2 x NVIDIA A100-SXM4-40GB (40960 MiB)"
    assert describe_devices([Gpu("GRID A100D-4C", None)]) == "GRID A100D-4C"
    mixed = describe_devices([Gpu("Tesla T4", 15360), Gpu("NVIDIA L4", 23034)])
    assert mixed == "Tesla T4 (15360 MiB), NVIDIA L4 (23034 MiB)"
    assert short_device("Tesla T4 (15360 MiB)") == "T4"
    assert short_device("2 x NVIDIA A100-SXM4-40GB (40960 MiB)") == "2 x A100-SXM4-40GB"
    assert short_device(mixed) == "T4, L4"
    assert short_device("CPU") == "CPU"
    assert short_device(None) == "-"


def test_detect_gpus_asks_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", gpu_path(install_nvidia_smi(tmp_path / "bin", T4)))
    assert detect_gpus() == [Gpu("Tesla T4", 15360)]


def test_no_nvidia_smi_or_a_failing_one_means_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", cpu_only_path())
    assert detect_gpus() == []
    driver_gone = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
    monkeypatch.setenv("PATH", gpu_path(install_nvidia_smi(tmp_path / "bin", driver_gone, exit_code=9)))
    assert detect_gpus() == []


def test_a_hanging_nvidia_smi_means_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It would answer "Tesla T4" after 60 s: the answer must come from the timeout, not from waiting it out.
    monkeypatch.setenv("PATH", gpu_path(install_nvidia_smi(tmp_path / "bin", T4, hang_s=60)))
    monkeypatch.setattr(device, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    gpus = detect_gpus()
    assert gpus == []
    assert describe_devices(gpus) == "CPU"


def test_the_session_device_warns_only_on_a_gpu_less_colab(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release")
    assert colab.session_device(said.append, detect=list) == "CPU"
    assert said == [colab.NO_GPU_ADVICE]
    assert "Runtime > Change runtime type" in colab.NO_GPU_ADVICE
    assert colab.session_device(said.append, detect=lambda: [Gpu("Tesla T4", 15360)]) == "Tesla T4 (15360 MiB)"
    assert said == [colab.NO_GPU_ADVICE]
    monkeypatch.delenv("COLAB_RELEASE_TAG")
    forget_fake_colab()
    if not on_colab():
        assert colab.session_device(said.append, detect=list) == "CPU"
        assert said == [colab.NO_GPU_ADVICE]  # a laptop's CPU is no mistake worth a warning


def test_a_session_without_a_gpu_records_the_cpu(queue: Queue) -> None:
    queue.submit(make_spec())

    done = run_cli("work", "--queue", str(queue.root), env=runner_env(PATH=cpu_only_path()))

    assert done.returncode == 0, done.stderr
    assert [event["device"] for event in events(queue, "job-a", "claimed")] == ["CPU"]
    assert state(queue, "job-a").device == "CPU"
    assert status_json(queue, run_cli)["job-a"]["device"] == "CPU"


def test_a_session_on_a_gpu_records_it_and_the_table_shows_it_shortly(queue: Queue, tmp_path: Path) -> None:
    asked = tmp_path / "nvidia-smi-calls"
    path = gpu_path(install_nvidia_smi(tmp_path / "bin", T4, log=asked))
    queue.submit(make_spec("job-a"))
    queue.submit(make_spec("job-b"))

    done = run_cli("work", "--queue", str(queue.root), env=runner_env(PATH=path))
    table = run_cli("status", "--queue", str(queue.root), env=runner_env(COLUMNS="200"))

    assert done.returncode == 0, done.stderr
    assert len(asked.read_text().splitlines()) == 1  # asked once per session, not per job
    for name in ("job-a", "job-b"):
        assert [event["device"] for event in events(queue, name, "claimed")] == ["Tesla T4 (15360 MiB)"]
        assert state(queue, name).device == "Tesla T4 (15360 MiB)"
    assert status_json(queue, run_cli)["job-a"]["device"] == "Tesla T4 (15360 MiB)"
    assert table.returncode == 0, table.stderr
    row = lines_with(table.stdout, "job-a")
    assert len(row) == 1 and " T4 " in f"{row[0]} " and "Tesla" not in row[0], table.stdout


@pytest.mark.parametrize("gpu", [False, True])
def test_runner_work_on_a_colab_without_gpu_warns_once_and_still_runs(tmp_path: Path, gpu: bool) -> None:
    vm = colab_vm(tmp_path)
    local = Queue(tmp_path / "local-queue")
    local.submit(make_spec("job-a"))
    local.submit(make_spec("job-b"))
    path = gpu_path(install_nvidia_smi(tmp_path / "bin", T4)) if gpu else cpu_only_path()

    done = run_colab_cli("work", "--queue", str(local.root), "--max-hours", "1", env=vm.env(PATH=path))

    assert done.returncode == 0, done.stderr
    warnings = flat(done.stderr).count(colab.NO_GPU_ADVICE)
    assert warnings == (0 if gpu else 1), done.stderr
    assert [state(local, name).status.value for name in ("job-a", "job-b")] == ["done", "done"]
