"""Training on several devices in step (``training.distribute: mirrored``), on 2 and 4 logical CPU devices.

``RUNNER_LOGICAL_CPUS=N`` gives the engine N logical CPUs to mirror over, the way a VM with N GPUs gives it N
GPUs: the same ``tf.distribute.MirroredStrategy``, the same split of each global batch, the same summed
gradients. Real `runner work` processes train the tiny digits job, die by SIGKILL after commits, and resume.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runner.settings import LOGICAL_CPUS_ENV
from tests.conftest import REPO, run_cli
from tests.support.keras_jobs import job_of, keras_env, make_digit_folders, submit_keras_spec
from tests.support.kill_harness import (
    Kill,
    KillRun,
    Reference,
    assert_same_result,
    check_resumes,
    newest_variables,
    status_record,
)

pytestmark = pytest.mark.slow

NAME = "tiny"
MIRRORED = {"distribute": "mirrored", "steps_per_execution": 3}
BATCH_7 = {"batch_size": 7}
"""72 training images in batches of 7: the last holds 2, so on 4 devices two of them get none."""
EVERY_CALL = {"every_minutes": 0.000001}
"""A snapshot after every compiled call: kills after a commit land mid-epoch."""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_digit_folders(tmp_path_factory.mktemp("digits"), train_per_class=24)


def devices_env(folder: Path, devices: int) -> dict[str, str]:
    env = keras_env(folder / "cache")
    if devices > 1:
        env[LOGICAL_CPUS_ENV] = str(devices)
    return env


def new_run(folder: Path, digits: Path, devices: int, *, seed: int, **overrides: object) -> KillRun:
    folder.mkdir(parents=True, exist_ok=True)
    env = devices_env(folder, devices)
    submit_keras_spec(folder, folder / "queue", digits, NAME, env, **overrides)
    return KillRun(folder / "queue", NAME, env, rng=random.Random(seed), folder=folder)


def engine_line(run: KillRun) -> str:
    return next(line for line in run.job.paths.log.read_text().splitlines() if "engine:" in line)


def test_each_device_gets_its_own_share_of_every_global_batch() -> None:
    env = {**keras_env(Path("/nonexistent")), LOGICAL_CPUS_ENV: "4"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.replica_batches", "16", "7"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    split = json.loads(done.stdout.splitlines()[-1])
    assert split["devices"] == 4
    batches = split["batches"]
    assert len(batches) == 3  # the global batches of 7, 7 and 2
    for number, shares in enumerate(batches):
        assert len(shares) == 4
        together = sorted(example for share in shares for example in share)
        assert together == list(range(number * 7, min(number * 7 + 7, 16))), "a share repeats or misses examples"
        assert max(len(share) for share in shares) <= 2, f"a device got more than its share: {shares}"


def test_two_devices_take_the_step_one_device_takes_and_status_shows_them(digits: Path, tmp_path: Path) -> None:
    """Without randomness in the model, mirrored training is the single-device computation, split: each device's
    loss is scaled by 1/2 and the gradients summed. Had either been missed, the weights would differ by far more."""
    plain = {"model": {"params": {"filters": 4, "dense": 16, "dropout": 0.0, "augment": False}}}
    ends = {}
    for devices in (1, 2):
        run = new_run(tmp_path / str(devices), digits, devices, seed=0, training={**MIRRORED, "epochs": 2}, **plain)
        run.finish()
        ends[devices] = (run, newest_variables(run.job))
    one, two = ends[1][1], ends[2][1]
    model_keys = [key for key in one if key.startswith("model/")]
    assert model_keys
    for key in model_keys:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert any(not np.array_equal(two[key], one[key]) for key in model_keys), "the two runs did not differ at all"

    run = ends[2][0]
    assert "2 devices (CPU:0, CPU:1), mirrored" in engine_line(run)
    assert "1 device (CPU:0)" in engine_line(ends[1][0])
    (placed,) = run.events("devices")
    assert placed["devices"] == 2 and placed["strategy"] == "mirrored" and placed["backend"] == "tensorflow"
    record = status_record(run.queue, NAME, run.env)
    assert (record["devices"], record["backend"], record["trajectory_changed"]) == (2, "tensorflow", None)
    table = run_cli("status", "--queue", str(run.queue), env={**run.env, "COLUMNS": "200"})
    assert "tf ×2" in table.stdout, table.stdout


def test_kills_after_commits_on_several_devices_resume_bit_identical(digits: Path, tmp_path: Path) -> None:
    """On 4 devices, where each epoch's last batch (2 images) leaves two of them none. Two devices are killed and
    resumed in the test below, and take the step one device takes in the one above."""
    devices = 4
    overrides = {"dataset": BATCH_7, "training": MIRRORED, "checkpoint": EVERY_CALL}
    reference_run = new_run(tmp_path / "reference", digits, devices, seed=0, **overrides)
    reference_run.finish()
    reference = Reference.of(reference_run.queue, NAME, reference_run.env)

    run = new_run(tmp_path / "killed", digits, devices, seed=devices, **overrides)
    run.session(Kill.at("snapshot-taken", 2))
    run.session(Kill.after_commit(2, delay_s=(0.0, 0.05)))
    run.finish()

    assert all(session.landed for session in run.sessions), run.summary()
    assert f"{devices} devices" in engine_line(run)
    assert any(event["step"] > 0 for event in run.resumes()), run.summary()
    assert not run.events("devices-changed")
    check_resumes(run)
    assert_same_result(run, reference)
    run.report()


def test_a_resume_on_another_number_of_devices_goes_on_and_says_the_trajectory_differs(
    digits: Path, tmp_path: Path
) -> None:
    run = new_run(tmp_path, digits, 2, seed=3, dataset=BATCH_7, training=MIRRORED, checkpoint=EVERY_CALL)
    run.session(Kill.after_commit(2, delay_s=(0.0, 0.05)))
    assert run.sessions[0].landed, run.summary()
    run.env = devices_env(tmp_path, 4)
    result = run.finish()

    assert "was trained on 2 devices and this session has 4" in result.stderr, result.stderr[-2000:]
    (changed,) = run.events("devices-changed")
    assert (changed["before"], changed["after"]) == (2, 4)
    assert changed["checkpoint"] == run.resumes()[0]["checkpoint"]
    record = status_record(run.queue, NAME, run.env)
    assert record["state"] == "done" and record["devices"] == 4
    assert "differs from an uninterrupted run" in record["trajectory_changed"]
    table = run_cli("status", "--queue", str(run.queue), env={**run.env, "COLUMNS": "200"})
    assert "trained on 2 devices and this session has 4" in " ".join(table.stdout.split()), table.stdout


def test_mirrored_on_one_device_warns_once_and_trains_there(digits: Path, tmp_path: Path) -> None:
    env = devices_env(tmp_path, 1)
    queue = tmp_path / "queue"
    for name in ("first", "second"):
        submit_keras_spec(tmp_path, queue, digits, name, env, training={"distribute": "mirrored", "epochs": 1})
    result = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    warning = "training.distribute: mirrored, but TensorFlow sees one device (CPU:0): training on it alone"
    assert result.stderr.count(warning) == 1, result.stderr
    for name in ("first", "second"):
        state = job_of(queue, name).read_state()
        assert (state.status.value, state.devices) == ("done", 1)


@pytest.mark.parametrize("value", ["two", "0", "65"])
def test_a_logical_cpu_count_that_is_not_one_is_refused_before_any_job_is_claimed(
    digits: Path, tmp_path: Path, value: str
) -> None:
    env = {**keras_env(tmp_path / "cache"), LOGICAL_CPUS_ENV: value}
    submit_keras_spec(tmp_path, tmp_path / "queue", digits, NAME, env)
    result = run_cli("work", "--queue", str(tmp_path / "queue"), env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {LOGICAL_CPUS_ENV} must be a whole number of devices from 1 to 64, got {value!r}"
    ]
    assert job_of(tmp_path / "queue", NAME).read_state().status.value == "queued"
