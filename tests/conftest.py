"""Shared builders for the test suite: real folders, real processes, the counting trainer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.queue import Queue
from runner.spec import JobSpec, parse_spec
from tests.support import warm_start

REPO = Path(__file__).resolve().parent.parent
COUNTING_TRAINER = "tests.support.counting_trainer:CountingTrainer"


def make_spec_dict(name: str = "job-a", **sections: Any) -> dict[str, Any]:
    """A valid spec as plain data; ``sections`` are merged into the top-level mapping (one level deep)."""
    data: dict[str, Any] = {
        "name": name,
        "dataset": {"source": "/data/unused"},
        # The counting trainer reads its knobs from a factory's params (a built-in network's are checked at submit).
        "model": {"factory": "tests.support.counting_trainer:counting_model", "params": {"steps": 4}},
        "training": {"epochs": 3},
    }
    return merge_sections(data, sections)


def merge_sections(spec: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with ``overrides`` merged in: a mapping merges into its section, anything else replaces it."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def make_spec(name: str = "job-a", **sections: Any) -> JobSpec:
    """A valid :class:`JobSpec` for the counting trainer."""
    return parse_spec(make_spec_dict(name, **sections))


def write_spec(folder: Path, name: str = "job-a", **sections: Any) -> Path:
    """A spec file in ``folder``."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(make_spec_dict(name, **sections)))
    return path


NO_WEIGHTS_SERVER = "http://127.0.0.1:9"
"""Where ``weights: imagenet`` goes in tests that serve no weights: a refused port, never Keras' origin (tests
download nothing but from servers they start on 127.0.0.1)."""
os.environ.setdefault("RUNNER_WEIGHTS_URL", NO_WEIGHTS_SERVER)


def runner_env(**extra: str) -> dict[str, str]:
    """Environment for a `runner` subprocess that uses the counting trainer."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["RUNNER_TRAINER"] = COUNTING_TRAINER
    env.pop("RUNNER_QUEUE", None)
    env.pop("COLAB_RELEASE_TAG", None)
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m runner ARGS`` as a real process and capture its output."""
    process = start_python("-m", "runner", *args, env=env or runner_env())
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.wait(), out, err)


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -m runner ARGS`` in the background (its own process group)."""
    return start_python("-m", "runner", *args, env=env or runner_env())


def start_python(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``python ARGS`` in the background, in its own process group (so that a test can kill all of it);
    a session that trains starts warm where it can (tests/support/warm_start.py)."""
    if warm_start.warm_startable(args, env):
        try:
            return warm_start.start(args, env, REPO)  # type: ignore[return-value]
        except (OSError, RuntimeError):
            pass  # a starter that cannot start or went away: this session starts cold
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    """An empty queue in a temporary folder, with a short lease for fast takeovers."""
    return Queue(tmp_path / "queue", lease_duration=3.0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first (in their own order): on two cores, with ``--dist worksteal``, the short ones then
    fill in around the long ones, rather than a long one starting last and running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
