"""Out of GPU memory during training: `training.on_oom: fail` fails the job with one line saying what to change;
`halve_batch` goes back to the last checkpoint with half the batch size, which survives a kill and a resume, and
continues mid-epoch at the sample where the checkpoint stopped.

No GPU here: the model's first layer (tests/support/oom_model.py) stands in for a GPU's memory limit and makes
TensorFlow raise its real out-of-memory error from inside `train_on_batch` and `evaluate`. Each run is a real
`runner work` process with the Keras trainer on a few real digit images.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.checkpoints import CheckpointStore
from runner.errors import OutOfMemory
from runner.history import read_history
from runner.job import JobStatus
from tests.conftest import REPO, run_cli, start_cli
from tests.support.keras_jobs import job_of, keras_env, keras_spec, make_digit_folders

FACTORY = "tests.support.oom_model:oom_model"
TRAIN_IMAGES = 3 * 16


def oom_spec(name: str, data: Path, *, batch_size: int, params: dict[str, Any], **training: Any) -> dict[str, Any]:
    """A tiny job whose model runs out of "memory" above ``params["max_batch"]`` images a batch; one step per
    compiled call, so that an error strikes at a known step and mid-epoch checkpoints follow every step."""
    training = {"steps_per_execution": 1, **training}
    spec = keras_spec(name, data, dataset={"batch_size": batch_size}, training=training)
    spec["model"] = {"factory": FACTORY, "params": params}
    return spec


def submit(tmp: Path, queue: Path, env: dict[str, str], spec: dict[str, Any]) -> None:
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = run_cli("submit", str(path), "--queue", str(queue), env=env)
    assert result.returncode == 0, result.stderr


def work(queue: Path, env: dict[str, str]) -> Any:
    return run_cli("work", "--queue", str(queue), env=env, timeout=300)


def events(queue: Path, name: str, kind: str) -> list[dict[str, Any]]:
    return [event for event in job_of(queue, name).events.read() if event["event"] == kind]


def status_of(queue: Path, name: str, env: dict[str, str]) -> dict[str, Any]:
    result = run_cli("status", "--queue", str(queue), "--json", env=env)
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}[name]


def recorded_epochs(record: Path) -> list[list[list[str]]]:
    """The training batches the stand-in layer let through (image fingerprints), split into epochs by the
    validation that ends each one."""
    epochs: list[list[list[str]]] = [[]]
    for line in record.read_text().splitlines():
        batch = json.loads(line)
        if batch["training"]:
            epochs[-1].append(batch["images"])
        elif epochs[-1]:
            epochs.append([])
    return [epoch for epoch in epochs if epoch]


def one_line(text: str) -> str:
    return " ".join(text.split())  # the console wraps long lines to its width


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_digit_folders(tmp_path_factory.mktemp("digits"), train_per_class=16, val_per_class=4)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return keras_env(tmp_path / "cache")


def test_the_error_says_what_to_change() -> None:
    assert str(OutOfMemory(64, image_size=(150, 150))) == (
        "out of GPU memory at batch size 64 and image size 150x150: lower dataset.batch_size (to 32, say) or "
        "dataset.image_size (to [75, 75], say), or set training.on_oom: halve_batch"
    )
    assert str(OutOfMemory(1, gpu=False, halved_from=16, image_size=(16, 16))).startswith(
        "out of memory at batch size 1 and image size 16x16 (halved from 16): even one image per step is too much: "
        "lower dataset.image_size (to [8, 8], say)"
    )
    assert str(OutOfMemory(20, image_size=(2000, 2000), building=True)) == (
        "out of GPU memory building the model for images of 2000x2000: lower dataset.image_size (to [1000, 1000], "
        "say) or the model's size (model.params)"
    )
    assert isinstance(OutOfMemory(8), MemoryError) and "\n" not in str(OutOfMemory(1))


@pytest.mark.slow
def test_a_model_too_large_for_memory_at_its_image_size_names_image_size(
    tmp_path: Path, env: dict
) -> None:
    """Real memory, really exhausted: the process may address 12 GB, and the tutorial's network at 1000x1000
    wants a 16 GB kernel after its Flatten (the weights alone; no batch size can help)."""
    queue = tmp_path / "queue"
    few = make_digit_folders(tmp_path / "few", train_per_class=2, val_per_class=1)  # decoded at 1000x1000: few
    spec = keras_spec("huge", few, dataset={"image_size": [1000, 1000], "color_mode": "rgb"}, training={"epochs": 1})
    spec["model"] = {"builtin": "simple_cnn", "params": {"filters": 32, "dense": 512}}
    submit(tmp_path, queue, env, spec)

    def at_most_12_gb() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))

    result = subprocess.run(
        [sys.executable, "-m", "runner", "work", "--queue", str(queue)], capture_output=True, text=True, env=env,
        cwd=REPO, timeout=300, preexec_fn=at_most_12_gb,
    )  # fmt: skip

    line = (
        "out of memory building the model for images of 1000x1000: lower dataset.image_size (to [500, 500], say) "
        "or the model's size (model.params)"
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"job 'huge' failed: {line}" in one_line(result.stderr), result.stderr[-3000:]
    assert job_of(queue, "huge").read_state().error == line


@pytest.mark.slow
def test_on_oom_fail_fails_the_job_with_one_line_and_no_traceback(tmp_path: Path, digits: Path, env: dict) -> None:
    queue = tmp_path / "queue"
    submit(tmp_path, queue, env, oom_spec("oom-fail", digits, batch_size=16, params={"max_batch": 5}, epochs=2))

    result = work(queue, env)

    line = (
        "out of memory at batch size 16 and image size 16x16: lower dataset.batch_size (to 8, say) or "
        "dataset.image_size (to [8, 8], say), or set training.on_oom: halve_batch"
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"job 'oom-fail' failed: {line}" in one_line(result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    state = job_of(queue, "oom-fail").read_state()
    assert state.status is JobStatus.FAILED and state.error == line
    status = status_of(queue, "oom-fail", env)
    assert status["error"] == line and status["batch_size"] == 16  # never halved: the spec's
    log = job_of(queue, "oom-fail").paths.log.read_text()
    assert "Traceback" in log and "ResourceExhaustedError" in log  # the whole story is in the job's log
    assert events(queue, "oom-fail", "oom") == []


@pytest.mark.slow
def test_halve_batch_halves_until_a_batch_fits_and_finishes(tmp_path: Path, digits: Path, env: dict) -> None:
    queue, record = tmp_path / "queue", tmp_path / "batches.jsonl"
    params = {"max_batch": 5, "record_to": str(record)}
    spec = oom_spec("halve", digits, batch_size=16, params=params, epochs=2, on_oom="halve_batch")
    submit(tmp_path, queue, env, spec)

    result = work(queue, env)

    assert result.returncode == 0, result.stderr[-3000:]
    ooms = events(queue, "halve", "oom")
    assert [(oom["batch_size_from"], oom["batch_size_to"]) for oom in ooms] == [(16, 8), (8, 4)]
    assert all(oom["epoch"] == 0 and oom["step"] == 0 and oom["back_to"]["checkpoint"] is None for oom in ooms)
    assert "on with batch size 4" in one_line(result.stderr) and "Traceback" not in result.stderr
    assert job_of(queue, "halve").read_state().batch_size == 4
    status = status_of(queue, "halve", env)
    assert status["state"] == "done" and status["batch_size"] == 4
    table = run_cli("status", "--queue", str(queue), env=env | {"COLUMNS": "300"})
    assert "halve: batch size 4 (the spec says 16): halved after running out of memory" in one_line(table.stdout)
    assert [int(row["epoch"]) for row in read_history(job_of(queue, "halve").paths.history)] == [0, 1]
    epochs = recorded_epochs(record)
    assert [sum(len(batch) for batch in epoch) for epoch in epochs] == [TRAIN_IMAGES] * 2
    assert {len(batch) for epoch in epochs for batch in epoch} == {4}
    assert "WARNING" in job_of(queue, "halve").paths.log.read_text()


@pytest.mark.slow
def test_a_halved_batch_size_survives_a_kill_and_resume(tmp_path: Path, digits: Path, env: dict) -> None:
    queue, record = tmp_path / "queue", tmp_path / "batches.jsonl"
    params = {"max_batch": 5, "pause_s": 0.05, "record_to": str(record)}
    spec = oom_spec("survive", digits, batch_size=16, params=params, epochs=4, on_oom="halve_batch")
    submit(tmp_path, queue, env, spec)
    worker = start_cli("work", "--queue", str(queue), env=env)
    try:
        deadline = time.monotonic() + 120
        while not _checkpoint_after_second_oom(queue) and worker.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after the batch size was halved"
            time.sleep(0.05)
        assert worker.poll() is None, "the job ended before it could be killed"
        os.killpg(worker.pid, signal.SIGKILL)
    finally:
        worker.wait()
        worker.stdout.close()
        worker.stderr.close()
    store = CheckpointStore(job_of(queue, "survive"), keep=2)
    newest = store.newest()
    assert newest is not None and json.loads((newest.path / "state.json").read_text())["batch_size"] == 4
    batches_before = len(record.read_text().splitlines())

    result = work(queue, env)

    assert result.returncode == 0, result.stderr[-3000:]
    assert len(events(queue, "survive", "oom")) == 2  # the new session started at 4, not at the spec's 16
    assert events(queue, "survive", "resumed")[-1]["steps_per_epoch"] == TRAIN_IMAGES // 4
    after = [json.loads(line) for line in record.read_text().splitlines()[batches_before:]]
    assert after and {len(batch["images"]) for batch in after if batch["training"]} == {4}
    assert [int(row["epoch"]) for row in read_history(job_of(queue, "survive").paths.history)] == [0, 1, 2, 3]
    status = status_of(queue, "survive", env)
    assert status["state"] == "done" and status["batch_size"] == 4


@pytest.mark.slow
def test_a_halving_survives_a_kill_before_the_next_checkpoint(tmp_path: Path, digits: Path, env: dict) -> None:
    queue, record = tmp_path / "queue", tmp_path / "batches.jsonl"
    params = {"max_batch": 5, "pause_s": 0.3, "record_to": str(record)}  # 12 batches of 4: 3.6 s to the checkpoint
    spec = oom_spec("early", digits, batch_size=16, params=params, epochs=2, on_oom="halve_batch")
    submit(tmp_path, queue, env, spec)
    worker = start_cli("work", "--queue", str(queue), env=env)
    try:
        deadline = time.monotonic() + 120
        while len(events(queue, "early", "oom")) < 2 and worker.poll() is None:  # written after state.json's
            assert time.monotonic() < deadline, "the batch size was not halved twice"
            time.sleep(0.02)
        os.killpg(worker.pid, signal.SIGKILL)
    finally:
        worker.wait()
        worker.stdout.close()
        worker.stderr.close()
    if CheckpointStore(job_of(queue, "early"), keep=2).newest() is not None:
        pytest.skip("a checkpoint was committed before the kill landed")
    assert job_of(queue, "early").read_state().batch_size == 4  # recorded at once, before any checkpoint
    batches_before = len(record.read_text().splitlines()) if record.exists() else 0

    result = work(queue, env)

    assert result.returncode == 0, result.stderr[-3000:]
    assert len(events(queue, "early", "oom")) == 2  # no new halving: the new session started at 4
    after = [json.loads(line) for line in record.read_text().splitlines()[batches_before:]]
    assert after and {len(batch["images"]) for batch in after if batch["training"]} == {4}
    assert [int(row["epoch"]) for row in read_history(job_of(queue, "early").paths.history)] == [0, 1]


def _checkpoint_after_second_oom(queue: Path) -> bool:
    kinds = [event["event"] for event in job_of(queue, "survive").events.read()]
    return kinds.count("oom") == 2 and "checkpoint" in kinds[len(kinds) - kinds[::-1].index("oom") :]


@pytest.mark.slow
def test_out_of_memory_mid_epoch_goes_on_from_the_checkpoints_sample(tmp_path: Path, digits: Path, env: dict) -> None:
    """Batches of 8 fit for 10 steps (6 a epoch), then need 4: the error strikes at step 5 of epoch 2, just after
    a mid-epoch checkpoint (one after every step) at sample 32, and training goes on from sample 32 with batches
    of 4, so every image of that epoch is trained on exactly once."""
    queue, record = tmp_path / "queue", tmp_path / "batches.jsonl"
    params = {"max_batch": 4, "fits_first": 10, "record_to": str(record)}
    spec = oom_spec("mid", digits, batch_size=8, params=params, epochs=3, on_oom="halve_batch")
    spec["checkpoint"] = {"every_epochs": 1, "every_minutes": 1e-6, "keep": 2}
    submit(tmp_path, queue, env, spec)

    result = work(queue, env)

    assert result.returncode == 0, result.stderr[-3000:]
    [oom] = events(queue, "mid", "oom")
    assert (oom["batch_size_from"], oom["batch_size_to"], oom["during"]) == (8, 4, "training")
    assert (oom["epoch"], oom["step"]) == (1, 4)
    assert oom["back_to"] | {"checkpoint": None} == {"checkpoint": None, "epoch": 1, "step": 4, "sample": 32}
    first, halved, last = recorded_epochs(record)
    kept = [batch for batch in halved if len(batch) == 8][: oom["back_to"]["step"]]
    after = [batch for batch in halved if len(batch) != 8]
    assert [len(batch) for batch in after] == [4] * 4
    images = Counter(image for batch in kept + after for image in batch)
    assert images == Counter(image for batch in first for image in batch) == Counter(i for b in last for i in b)
    assert sum(images.values()) == TRAIN_IMAGES
    assert [int(row["epoch"]) for row in read_history(job_of(queue, "mid").paths.history)] == [0, 1, 2]
    assert job_of(queue, "mid").read_state().batch_size == 4


@pytest.mark.slow
def test_out_of_memory_in_validation_goes_back_and_trains_the_epoch_again(
    tmp_path: Path, digits: Path, env: dict
) -> None:
    """Batches of 8 fit for the 6 training steps of the first epoch, not for its validation: with no checkpoint
    yet, training goes back to the initial weights and does that epoch again with batches of 4."""
    queue, record = tmp_path / "queue", tmp_path / "batches.jsonl"
    params = {"max_batch": 4, "fits_first": 6, "record_to": str(record)}
    spec = oom_spec("in-val", digits, batch_size=8, params=params, epochs=2, on_oom="halve_batch")
    submit(tmp_path, queue, env, spec)

    result = work(queue, env)

    assert result.returncode == 0, result.stderr[-3000:]
    [oom] = events(queue, "in-val", "oom")
    assert (oom["during"], oom["epoch"], oom["step"], oom["batch_size_to"]) == ("validation", 0, 6, 4)
    assert oom["back_to"] == {"checkpoint": None, "epoch": 0, "step": 0, "sample": 0}
    trained = [[len(batch) for batch in epoch] for epoch in recorded_epochs(record)]
    assert trained == [[8] * 6 + [4] * 12, [4] * 12]  # the first try of epoch 1, then the epoch again at 4
    assert [int(row["epoch"]) for row in read_history(job_of(queue, "in-val").paths.history)] == [0, 1]
