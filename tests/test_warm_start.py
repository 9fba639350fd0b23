"""The warm starter (tests/support/warm_start.py) gives each session a real process of its own, as
``subprocess.Popen`` does: its arguments, environment, working directory and pipes, a process group of its own,
Python's exit codes and ``atexit`` handlers, fresh random draws, and death by SIGKILL that the test sees."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, runner_env
from tests.support import warm_start
from tests.support.keras_jobs import keras_env

PROBE = ("-m", "tests.support.warm_probe")


def probe(*args: str, tmp_path: Path) -> warm_start.WarmProcess:
    env = {**keras_env(tmp_path / "cache"), "PROBE": "seen"}
    return warm_start.start((*PROBE, *args), env, REPO)


def said(out: str) -> dict:
    return json.loads(out.splitlines()[0])


def test_a_child_gets_its_arguments_environment_pipes_and_group_and_keras_already_imported(tmp_path: Path) -> None:
    child = probe("exit", "0", tmp_path=tmp_path)
    out, err = child.communicate(timeout=60)
    seen = said(out)
    assert child.returncode == 0 and err == "to stderr\n"
    assert seen["argv"] == ["exit", "0"] and seen["probe"] == "seen" and seen["cwd"] == str(REPO)
    assert seen["group_leader"] and seen["preloaded"], seen
    assert out.splitlines()[-1] == "atexit ran"


@pytest.mark.parametrize(("args", "code"), [(("exit", "3"), 3), (("raise",), 1)])
def test_exit_codes_are_pythons(tmp_path: Path, args: tuple[str, ...], code: int) -> None:
    child = probe(*args, tmp_path=tmp_path)
    out, err = child.communicate(timeout=60)
    assert child.returncode == code, err
    if args[0] == "raise":
        assert "ValueError: raised in the probe" in err and "Traceback" in err
    assert out.splitlines()[-1] == "atexit ran"


def test_a_sigkilled_child_dies_of_sigkill_and_its_output_so_far_is_read(tmp_path: Path) -> None:
    child = probe("sleep", "60", tmp_path=tmp_path)
    with pytest.raises(subprocess.TimeoutExpired):
        child.communicate(timeout=2)
    assert child.poll() is None
    os.killpg(child.pid, signal.SIGKILL)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert said(out)["argv"] == ["sleep", "60"] and "atexit ran" not in out


def test_an_ended_child_stays_signallable_until_the_test_has_seen_it_end(tmp_path: Path) -> None:
    """As a Popen child stays a zombie until it is reaped: a test that saw it run may still signal its group."""
    child = probe("exit", "0", tmp_path=tmp_path)
    deadline = time.monotonic() + 60
    while not select.select([child._status], [], [], 0.05)[0]:  # the starter has sent its exit code
        assert time.monotonic() < deadline
    os.killpg(child.pid, signal.SIGKILL)  # no ProcessLookupError: not reaped yet
    child.communicate(timeout=30)
    assert child.returncode == 0


def test_a_session_outlives_its_starter_being_let_go_and_reports_its_own_exit(tmp_path: Path) -> None:
    child = probe("sleep", "3", tmp_path=tmp_path)
    for starter in list(warm_start._starters.values()):
        starter.close()  # as when starters for other environments push it out
    warm_start._starters.clear()
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and out.splitlines()[-1] == "atexit ran"


def test_two_children_draw_different_random_numbers(tmp_path: Path) -> None:
    draws = []
    for _ in range(2):
        child = probe("exit", "0", tmp_path=tmp_path)
        draws.append(said(child.communicate(timeout=60)[0])["draw"])
    assert draws[0] != draws[1]


@pytest.mark.parametrize(
    ("args", "extra", "warm"),
    [
        (("-m", "runner", "work", "--queue", "q"), {}, True),
        (("-m", "runner", "predict", "x"), {}, True),
        (("-m", "runner", "status"), {}, False),
        (("-m", "runner", "work", "--verbose"), {}, False),
        (("-m", "runner", "work"), {"RUNNER_TF_VERBOSE": "1"}, False),
        (("-m", "runner", "work"), {"RUNNER_LOGICAL_CPUS": "2"}, False),
        (("-m", "runner", "work"), {"RUNNER_TRAINER": "tests.support.counting_trainer:CountingTrainer"}, False),
        (("-m", "runner", "demo"), {}, False),
    ],
)
def test_sessions_that_change_how_tensorflow_starts_start_cold(
    tmp_path: Path, args: tuple[str, ...], extra: dict[str, str], warm: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(warm_start.COLD_START_ENV, raising=False)
    env = {**keras_env(tmp_path / "cache"), **extra}
    assert warm_start.warm_startable(args, env) is warm
    monkeypatch.setenv(warm_start.COLD_START_ENV, "1")
    assert not warm_start.warm_startable(args, env)


def test_runner_variables_and_pytests_share_a_starter_and_others_do_not() -> None:
    env = runner_env()
    same = {**env, "RUNNER_CACHE": "/elsewhere", "PYTEST_CURRENT_TEST": "another"}
    assert warm_start._starter_environment(env) == warm_start._starter_environment(same)
    for read_by_tensorflow_or_keras in ({"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"}, {"KERAS_HOME": "/other"}):
        other = {**env, **read_by_tensorflow_or_keras}
        assert warm_start._starter_environment(env) != warm_start._starter_environment(other)
