"""A GPU that nvidia-smi reports but TensorFlow cannot use (a CPU build, mismatched CUDA): training warns once,
records it, and still runs. Real TensorFlow on this CPU-only machine is exactly that case; the stand-in
``nvidia-smi`` (tests/support/colab_helpers.py) stands in for the driver's tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.support.colab_helpers import cpu_only_path, flat, gpu_path, install_nvidia_smi
from tests.support.keras_jobs import job_of, keras_env, make_digit_folders, write_keras_spec

pytestmark = pytest.mark.slow


def run_tiny_job(tmp_path: Path, path: str) -> tuple[str, list[dict]]:
    data = make_digit_folders(tmp_path / "data", classes=2, train_per_class=6, val_per_class=2)
    spec = write_keras_spec(tmp_path, "tiny", data, training={"epochs": 1})
    env = keras_env(tmp_path / "cache") | {"PATH": path}
    queue = tmp_path / "queue"
    assert run_cli("submit", "--queue", str(queue), str(spec), env=env).returncode == 0
    worked = run_cli("work", "--queue", str(queue), env=env, timeout=300)
    assert worked.returncode == 0, worked.stderr[-3000:]
    events = [json.loads(line) for line in job_of(queue, "tiny").paths.events.read_text().splitlines()]
    return flat(worked.stderr), events


def test_a_gpu_tensorflow_cannot_see_is_one_warning_and_an_event(tmp_path: Path) -> None:
    stand_in = install_nvidia_smi(tmp_path / "bin", "Tesla T4, 15360\n")

    said, events = run_tiny_job(tmp_path, gpu_path(stand_in))

    assert said.count("nvidia-smi reports Tesla T4 (15360 MiB), but TensorFlow") == 1
    assert "tensorflow[and-cuda]" in said
    unused = [event for event in events if event["event"] == "gpu-unused"]
    assert [event["device"] for event in unused] == ["Tesla T4 (15360 MiB)"]
    assert events[-1]["event"] == "done"


def test_no_warning_when_there_is_no_gpu_at_all(tmp_path: Path) -> None:
    said, events = run_tiny_job(tmp_path, cpu_only_path())

    assert "nvidia-smi reports" not in said
    assert not [event for event in events if event["event"] == "gpu-unused"]
