"""The engine on Keras' JAX backend (``KERAS_BACKEND=jax``): Colab's TPU runtime, which ships no TensorFlow.

Real `runner work` processes train the tiny digits job on JAX's CPU: it trains, snapshots, dies by SIGKILL after
commits and resumes bit for bit, exports, and shows its backend in status; on two and four JAX devices it trains
data parallel (``keras.distribution.DataParallel``). CI runs this file on both legs that have JAX, one of them a
machine without TensorFlow. A checkpoint written on either backend resumes on the other with every variable exact.
"""

from __future__ import annotations

import importlib.util
import json
import os
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
    status_record,
)

HAS_JAX = importlib.util.find_spec("jax") is not None
HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAS_JAX, reason="JAX is not installed")]

only_without_tensorflow = pytest.mark.skipif(
    HAS_TENSORFLOW and not os.environ.get("RUNNER_JAX_TESTS"),
    reason="runs in CI's JAX leg (.ci/jax_stack), on a machine without TensorFlow, as on a TPU runtime; set "
    "RUNNER_JAX_TESTS=1 to run it here too",
)
"""Where TensorFlow is installed too, only the test that needs both backends runs: the suite stays within its time."""

NAME = "tiny"
EVERY_CALL = {"every_minutes": 0.000001}
"""A snapshot after every compiled call: kills after a commit land mid-epoch."""
THREE_PER_CALL = {"steps_per_execution": 3}
WITHOUT_RANDOM_ROTATION = {"model": {"params": {"filters": 4, "dense": 16, "dropout": 0.25, "augment": False}}}
"""Keras marks RandomRotation as not XLA-compilable, so the default job's step runs uncompiled; without it, the
step is compiled with jax.jit (Dropout's random numbers included)."""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_digit_folders(tmp_path_factory.mktemp("digits"), train_per_class=24)


def jax_env(folder: Path, devices: int = 1, *, backend: str = "jax") -> dict[str, str]:
    env = {**keras_env(folder / "cache"), "KERAS_BACKEND": backend}
    env.pop(LOGICAL_CPUS_ENV, None)
    if devices > 1:
        env[LOGICAL_CPUS_ENV] = str(devices)
    return env


def new_run(folder: Path, digits: Path, *, seed: int, devices: int = 1, **overrides: object) -> KillRun:
    folder.mkdir(parents=True, exist_ok=True)
    env = jax_env(folder, devices)
    submit_keras_spec(folder, folder / "queue", digits, NAME, env, **overrides)
    return KillRun(folder / "queue", NAME, env, rng=random.Random(seed), folder=folder)


def engine_line(run: KillRun) -> str:
    return next(line for line in run.job.paths.log.read_text().splitlines() if "engine:" in line)


@only_without_tensorflow
def test_a_jax_job_trains_exports_and_shows_its_backend(digits: Path, tmp_path: Path) -> None:
    run = new_run(tmp_path, digits, seed=0, training={"epochs": 2}, **WITHOUT_RANDOM_ROTATION)
    result = run.finish()
    assert "Traceback" not in result.stderr
    assert "XLA on" in engine_line(run) and "1 device (CPU:0)" in engine_line(run)
    state = run.job.read_state()
    assert (state.status.value, state.backend, state.devices, state.trajectory_changed) == ("done", "jax", 1, None)
    (placed,) = run.events("devices")
    assert (placed["backend"], placed["strategy"]) == ("jax", "none")
    final = run.job.paths.folder / "final"
    assert sorted(path.name for path in final.iterdir()) == ["model.json", "model.keras"]
    loaded = subprocess.run(
        [sys.executable, "-c", f"import keras; print(keras.saving.load_model({str(final / 'model.keras')!r}).name)"],
        capture_output=True, text=True, env=run.env, cwd=REPO, timeout=300, check=False,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    record = status_record(run.queue, NAME, run.env)
    assert (record["backend"], record["devices"]) == ("jax", 1)
    table = run_cli("status", "--queue", str(run.queue), env={**run.env, "COLUMNS": "200"})
    assert "CPU · jax" in table.stdout, table.stdout
    history = (run.job.paths.history).read_text().splitlines()
    assert len(history) == 3 and "val_accuracy" in history[0]


@only_without_tensorflow
@pytest.mark.parametrize("option", ["compiled", "uncompiled", "augmented"])
def test_kills_after_commits_on_jax_resume_bit_identical(digits: Path, tmp_path: Path, option: str) -> None:
    """Kills land in training and right after a snapshot; every resume is from the newest verified checkpoint and
    the end is the uninterrupted run's, bit for bit (variables, state, history.csv, TensorBoard, status).
    ``augmented``: the images are changed by ``dataset.augment`` in the NumPy pipeline, each by its own draws."""
    overrides: dict[str, object] = {"training": THREE_PER_CALL, "checkpoint": EVERY_CALL}
    if option != "uncompiled":
        # Compiled, the 4 epochs train in less time than two commits take: more epochs keep a session training.
        overrides |= {**WITHOUT_RANDOM_ROTATION, "training": {**THREE_PER_CALL, "epochs": 12}}
    if option == "augmented":
        overrides["dataset"] = {"augment": {"flip": "horizontal", "rotation": 0.05, "zoom": 0.1, "brightness": 0.1}}
    reference_run = new_run(tmp_path / "reference", digits, seed=0, **overrides)
    reference_run.finish()
    reference = Reference.of(reference_run.queue, NAME, reference_run.env)

    run = new_run(tmp_path / "killed", digits, seed=11, **overrides)
    run.session(Kill.at("snapshot-taken", 3))
    run.session(Kill.after_commit(2, delay_s=(0.0, 0.05)))
    result = run.finish()

    assert all(session.landed for session in run.sessions), run.summary()
    assert ("XLA off" if option == "uncompiled" else "XLA on") in engine_line(run)
    # The job's own pipeline took the changes (test_augment.py checks what they do to the images).
    augmented = "augmented (flip horizontal, rotation 0.05, zoom 0.1, brightness 0.1)"
    assert (augmented in " ".join((result.stdout + result.stderr).split())) == (option == "augmented")
    assert any(event["step"] > 0 for event in run.resumes()), run.summary()
    check_resumes(run)
    assert_same_result(run, reference)
    run.report()


@only_without_tensorflow
@pytest.mark.parametrize(("devices", "batch_size"), [(2, 8), (4, 7)])
def test_data_parallel_on_several_jax_devices_resumes_bit_identical(
    digits: Path, tmp_path: Path, devices: int, batch_size: int
) -> None:
    """``distribute: auto`` trains on every JAX device; a batch that does not split evenly (7 on 4 devices, and
    each epoch's last) runs whole on each, with a warning; kills after commits resume exactly."""
    overrides = {"dataset": {"batch_size": batch_size}, "training": THREE_PER_CALL, "checkpoint": EVERY_CALL}
    reference_run = new_run(tmp_path / "reference", digits, seed=0, devices=devices, **overrides)
    reference_run.finish()
    reference = Reference.of(reference_run.queue, NAME, reference_run.env)

    run = new_run(tmp_path / "killed", digits, seed=devices, devices=devices, **overrides)
    run.session(Kill.after_commit(2, delay_s=(0.0, 0.05)))
    result = run.finish()

    assert run.sessions[0].landed, run.summary()
    assert f"{devices} devices" in engine_line(run) and "data parallel" in engine_line(run)
    uneven = f"dataset.batch_size {batch_size} does not split evenly between {devices} devices"
    assert (uneven in result.stderr) == bool(batch_size % devices), result.stderr[-2000:]
    record = status_record(run.queue, NAME, run.env)
    assert (record["backend"], record["devices"]) == ("jax", devices)
    check_resumes(run)
    assert_same_result(run, reference)


@pytest.mark.skipif(not HAS_TENSORFLOW, reason="needs TensorFlow too, to write or read the checkpoint")
@pytest.mark.parametrize(("before", "after"), [("tensorflow", "jax"), ("jax", "tensorflow")])
def test_a_checkpoint_resumes_on_the_other_backend_with_every_variable_exact(
    digits: Path, tmp_path: Path, before: str, after: str
) -> None:
    run = new_run(tmp_path, digits, seed=4, training=THREE_PER_CALL, checkpoint=EVERY_CALL)
    run.env = jax_env(tmp_path, backend=before)
    run.session(Kill.after_commit(2, delay_s=(0.0, 0.05)))
    assert run.sessions[0].landed, run.summary()
    checkpoint = run.job.paths.checkpoints / str(run.sessions[0].must_restore)
    written = json.loads((checkpoint / "state.json").read_text())
    assert (written["backend"], written["devices"], written["precision"]) == (before, 1, "float32")

    restored = subprocess.run(
        [sys.executable, "-m", "tests.support.restore_elsewhere", str(run.job.paths.folder), str(checkpoint),
         str(tmp_path / "scratch")],
        capture_output=True, text=True, env=jax_env(tmp_path, backend=after), cwd=REPO, timeout=300, check=False,
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr[-2000:]
    compared = json.loads(restored.stdout.splitlines()[-1])
    assert compared["backend"] == after and compared["compared"] > 20
    assert compared["differ"] == [], f"restored on {after}, these arrays are not the checkpoint's"

    run.env = jax_env(tmp_path, backend=after)
    result = run.finish()
    message = f"was written by Keras' {before} backend and this session runs {after}"
    assert message in result.stderr, result.stderr[-2000:]
    (changed,) = run.events("backend-changed")
    assert (changed["before"], changed["after"]) == (before, after)
    record = status_record(run.queue, NAME, run.env)
    assert record["state"] == "done" and record["backend"] == after and message in record["trajectory_changed"]
    check_resumes(run)


@only_without_tensorflow
def test_the_jax_pipeline_gives_each_epoch_the_tensorflow_pipelines_order(digits: Path, tmp_path: Path) -> None:
    """Both pipelines take each epoch's order from (seed, epoch) alone, and a resumed epoch goes on from its
    sample: the labels of every batch, from any start, are the uninterrupted epoch's."""
    from runner.spec import DatasetSpec
    from runner.train.data.arrays import prepare_dataset
    from runner.train.data.common import epoch_order

    spec = DatasetSpec(source=str(digits), validation="validation", image_size=(16, 16), batch_size=8, label_mode="int")
    data = prepare_dataset(spec, seed=7, cache_dir=tmp_path / "cache")
    labels = data._train.labels
    for epoch in (0, 1, 5):
        whole = np.concatenate([batch[1] for batch in data.train_batches(epoch=epoch)])
        assert np.array_equal(whole, labels[epoch_order(7, epoch, data.num_train)])
        resumed = np.concatenate([batch[1] for batch in data.train_batches(epoch=epoch, start_sample=21)])
        assert np.array_equal(resumed, whole[21:])
    first = next(iter(data.train_batches(epoch=0)))
    assert first[0].dtype == np.float32 and first[0].shape == (8, 16, 16, 3) and first[0].max() > 1
    if HAS_TENSORFLOW:
        from runner.train.data.pipeline import prepare_dataset as prepare_tf

        tf_data = prepare_tf(spec, seed=7, cache_dir=tmp_path / "cache")
        tf_labels = np.concatenate([batch[1].numpy() for batch in tf_data.train_batches(epoch=1)])
        assert np.array_equal(tf_labels, np.concatenate([batch[1] for batch in data.train_batches(epoch=1)]))


@pytest.mark.skipif(HAS_TENSORFLOW, reason="Keras on JAX writes a SavedModel where TensorFlow is installed")
def test_a_saved_model_export_without_tensorflow_is_refused_in_one_line_before_training(
    digits: Path, tmp_path: Path
) -> None:
    env = jax_env(tmp_path)
    queue = tmp_path / "queue"
    submit_keras_spec(tmp_path, queue, digits, "saved", env, export={"formats": ["keras", "saved_model"]})
    result = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    assert "Traceback" not in result.stderr
    assert "job 'saved' failed: export.formats has saved_model" in result.stderr
    assert not (job_of(queue, "saved").paths.folder / "checkpoints").exists() or not any(
        (job_of(queue, "saved").paths.folder / "checkpoints").iterdir()
    ), "refused before any training"


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_a_keras_backend_the_engine_does_not_train_on_is_refused_before_any_claim(
    digits: Path, tmp_path: Path, backend: str
) -> None:
    env = jax_env(tmp_path, backend=backend)
    submit_keras_spec(tmp_path, tmp_path / "queue", digits, NAME, env)
    result = run_cli("work", "--queue", str(tmp_path / "queue"), env=env)
    assert result.returncode == 2
    refusal = (
        f"error: KERAS_BACKEND={backend}: runner's engine trains on Keras' tensorflow or jax backend: unset "
        "KERAS_BACKEND, or set it to tensorflow or jax"
    )
    assert result.stderr.strip().splitlines() == [refusal]
    assert job_of(tmp_path / "queue", NAME).read_state().status.value == "queued"


@only_without_tensorflow
def test_the_users_own_code_is_refused_on_jax_in_one_line(tmp_path: Path) -> None:
    script = (
        "import keras, runner\n"
        "model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])\n"
        "try:\n"
        "    runner.fit(model, [[0.0, 0.0]], [0.0], job='own', epochs=1)\n"
        "except runner.errors.UsageError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=jax_env(tmp_path), cwd=REPO, timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("runner.fit, runner.keras.Checkpointing and runner.data train your own code")
    assert "Keras runs on jax here: set KERAS_BACKEND=tensorflow" in done.stdout


@only_without_tensorflow
def test_deterministic_on_a_jax_gpu_without_xla_s_flag_is_warned_about_with_the_fix() -> None:
    """XLA reads its flags once per process, so runner cannot set the GPU's determinism flag for one job; it says
    when ``deterministic: true`` cannot hold. (No GPU here: the decision is checked for each platform.)"""
    from runner.train.backends.jax import GPU_DETERMINISM_FLAG, determinism_warning

    warning = determinism_warning(deterministic=True, platform="gpu", xla_flags="--xla_gpu_autotune_level=0")
    assert warning is not None and f"XLA_FLAGS={GPU_DETERMINISM_FLAG}" in warning and "\n" not in warning
    for on in (GPU_DETERMINISM_FLAG, "--xla_gpu_deterministic_ops", "--xla_gpu_deterministic_ops=True"):
        flags = f"--xla_gpu_autotune_level=0 {on}"
        assert determinism_warning(deterministic=True, platform="gpu", xla_flags=flags) is None, flags
    off = f"{GPU_DETERMINISM_FLAG} --xla_gpu_deterministic_ops=false"  # the last one counts, as in XLA
    assert determinism_warning(deterministic=True, platform="gpu", xla_flags=off) is not None
    assert determinism_warning(deterministic=True, platform="cpu", xla_flags="") is None
    assert determinism_warning(deterministic=True, platform="tpu", xla_flags="") is None
    assert determinism_warning(deterministic=False, platform="gpu", xla_flags="") is None


@only_without_tensorflow
def test_out_of_memory_on_jax_halves_the_batch_or_fails_in_one_line(digits: Path, tmp_path: Path) -> None:
    """XLA's out-of-memory error (``RESOURCE_EXHAUSTED``, from a stand-in for a small GPU's memory) is what
    ``on_oom`` acts on: ``halve_batch`` halves until a batch fits and finishes, ``fail`` says what to change."""
    env = jax_env(tmp_path)
    queue = tmp_path / "queue"
    model = {"builtin": None, "factory": "tests.support.jax_memory_limit:oom_model", "params": {"max_batch": 5}}
    for name, on_oom in (("halve", "halve_batch"), ("fail", "fail")):
        training = {"epochs": 2, "steps_per_execution": 1, "on_oom": on_oom}
        submit_keras_spec(
            tmp_path, queue, digits, name, env, dataset={"batch_size": 16}, model=model, training=training
        )
    result = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    said = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr

    ooms = [event for event in job_of(queue, "halve").events.read() if event["event"] == "oom"]
    assert [(oom["batch_size_from"], oom["batch_size_to"]) for oom in ooms] == [(16, 8), (8, 4)], said[-3000:]
    state = job_of(queue, "halve").read_state()
    assert (state.status.value, state.batch_size, state.backend) == ("done", 4, "jax")
    assert "on with batch size 4" in said
    assert len(job_of(queue, "halve").paths.history.read_text().splitlines()) == 3  # a header and 2 epochs

    line = (
        "out of memory at batch size 16 and image size 16x16: lower dataset.batch_size (to 8, say) or "
        "dataset.image_size (to [8, 8], say), or set training.on_oom: halve_batch"
    )
    assert f"job 'fail' failed: {line}" in said
    failed = job_of(queue, "fail").read_state()
    assert (failed.status.value, failed.error) == ("failed", line)
    assert "RESOURCE_EXHAUSTED" in job_of(queue, "fail").paths.log.read_text()  # the whole story in the log
