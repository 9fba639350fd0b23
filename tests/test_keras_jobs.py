"""Real Keras jobs through `runner work`, end to end: the tutorial's job against a flaky local server, bad input
found at run time (each failing its own job with one line, the queue going on), and a failed job that keeps its
checkpoints and resumes from them after `runner retry`.

Every run is a real `runner work` process with the default Keras trainer on tiny real data; the only server is
an `http.server` on 127.0.0.1. TensorFlow takes seconds to start, so several jobs share one queue and one run.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import shutil
import signal
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.checkpoints import CheckpointStore
from runner.history import read_history
from runner.job import Job, JobStatus
from runner.spec import parse_spec
from tests.conftest import REPO, run_cli, start_cli
from tests.support.data_server import serve
from tests.support.keras_jobs import job_of, keras_env, keras_spec, make_digit_folders
from tests.support.keras_jobs_archives import (
    TUTORIAL_ROOT,
    sha256_of,
    tutorial_lookalike_zip,
    write_image_folders,
    zip_of_folder,
)

pytestmark = pytest.mark.slow

TUTORIAL_SPEC = REPO / "jobs" / "cats_vs_dogs.yaml"
AUGMENTED_SPEC = REPO / "jobs" / "cats_vs_dogs_augmented.yaml"
MOBILENET_SPEC = REPO / "jobs" / "cats_vs_dogs_mobilenet.yaml"
TUTORIAL_EPOCHS = 2
ARCHIVE_PATH = f"/{TUTORIAL_ROOT}.zip"
SIMPLE_CNN_150_PARAMS = (3 * 3 * 3 * 32 + 32) + (74 * 74 * 32 * 512 + 512) + (512 + 1)
"""Conv2D(32, 3) on 150x150x3, MaxPool 2 -> 74x74x32, Flatten, Dense 512, Dense 1: the design's 89.7 M."""


# --- helpers --------------------------------------------------------------------------------------------------




def event_names(job: Job) -> list[str]:
    return [event["event"] for event in job.events.read()]


def events_of(job: Job, kind: str) -> list[dict[str, Any]]:
    return [event for event in job.events.read() if event["event"] == kind]


def submit(queue: Path, env: dict[str, str], folder: Path, *specs: dict[str, Any]) -> None:
    paths = []
    for spec in specs:
        path = folder / f"{spec['name']}.yaml"
        path.write_text(yaml.safe_dump(spec))
        paths.append(str(path))
    result = run_cli("submit", *paths, "--queue", str(queue), env=env)
    assert result.returncode == 0, result.stderr


def work(queue: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli("work", "--queue", str(queue), env=env, timeout=600)


def console_of(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def status_json(queue: Path, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    result = run_cli("status", "--json", "--queue", str(queue), env=env)
    assert result.returncode == 0, result.stderr
    return {record["name"]: record for record in json.loads(result.stdout)}


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> sha256)."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, emptied afterwards: the tutorial model's checkpoints and exports are gigabytes."""
    yield tmp_path
    for child in tmp_path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def tutorial_spec(source: str, sha256: str) -> dict[str, Any]:
    """The tutorial's spec, as shipped, with only the source, the checksum and the epochs changed."""
    spec = yaml.safe_load(TUTORIAL_SPEC.read_text())
    changed = copy.deepcopy(spec)
    changed["dataset"]["source"] = source
    changed["dataset"]["sha256"] = sha256
    changed["training"]["epochs"] = TUTORIAL_EPOCHS
    return changed


def assert_only_changes(original: dict[str, Any], submitted: dict[str, Any], allowed: set[str]) -> None:
    """``submitted`` (a validated spec's dump) differs from ``original`` only at the dotted paths ``allowed``."""

    def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict) and key != "params":
                out |= flat(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
        return out

    before, after = flat(original), flat(submitted)
    assert before.keys() == after.keys()
    assert {key for key in before if before[key] != after[key]} == allowed


# --- 1. the tutorial's job ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tutorial_zip() -> bytes:
    """A zip laid out like cats_and_dogs_filtered.zip: 30 training and 10 validation JPEGs of 40x30."""
    return tutorial_lookalike_zip(train_per_class=15, validation_per_class=5)


def test_tutorial_job_runs_end_to_end_from_a_flaky_server(scratch: Path, tutorial_zip: bytes) -> None:
    import keras  # noqa: PLC0415 (TensorFlow only where a test needs it)
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    env, queue = keras_env(scratch / "cache"), scratch / "queue"
    with serve({ARCHIVE_PATH: tutorial_zip}, faults=["503", "503"]) as served:
        spec = tutorial_spec(served.url(ARCHIVE_PATH), sha256_of(tutorial_zip))
        submit(queue, env, scratch, spec)
        result = work(queue, env)
        requests = list(served.requests)
    console = console_of(result)
    assert result.returncode == 0, console[-4000:]
    assert "Traceback" not in console

    job = job_of(queue, "cats-vs-dogs")
    original = parse_spec(yaml.safe_load(TUTORIAL_SPEC.read_text())).model_dump()
    assert_only_changes(
        original, job.read_spec().model_dump(), {"dataset.source", "dataset.sha256", "training.epochs"}
    )
    state = job.read_state()
    assert state.status is JobStatus.DONE, state.error
    assert state.error is None and state.epoch == TUTORIAL_EPOCHS and state.checkpoint is not None

    # The server failed twice with 503, then served the archive: the download retried, and only as needed.
    assert requests == [ARCHIVE_PATH] * 3, "two 503s, then one download: retried, and only as often as needed"

    names = event_names(job)
    for kind in ("started", "checkpoint", "exported", "done"):
        assert kind in names, f"no {kind!r} event in {names}"
    order = [names.index("started"), names.index("checkpoint"), names.index("exported"), names.index("done")]
    assert order == sorted(order) and names[-1] == "done"
    assert "failed" not in names and "resumed" not in names
    assert len(events_of(job, "checkpoint")) == TUTORIAL_EPOCHS, "every_epochs: 1 checkpoints each epoch"

    rows = read_history(job.paths.history)
    assert [row["epoch"] for row in rows] == [str(epoch) for epoch in range(TUTORIAL_EPOCHS)]
    assert set(rows[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    for row in rows:
        for column in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert math.isfinite(float(row[column])), f"{column} in {row}"
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and 0.0 <= float(row["val_accuracy"]) <= 1.0

    model_file = job.paths.final / "model.keras"
    assert model_file.is_file()
    model = keras.models.load_model(model_file)
    assert model.count_params() == SIMPLE_CNN_150_PARAMS
    assert round(model.count_params() / 1e6, 1) == 89.7
    with zipfile.ZipFile(io.BytesIO(tutorial_zip)) as archive:
        jpegs = [name for name in archive.namelist() if name.startswith(f"{TUTORIAL_ROOT}/validation/")]
        jpegs = [name for name in jpegs if name.endswith(".jpg")][:3]
        images = [tf.image.resize(tf.io.decode_jpeg(archive.read(name), channels=3), (150, 150)) for name in jpegs]
    predictions = model.predict(tf.stack(images), verbose=0)
    assert predictions.shape == (3, 1)
    assert np.all((predictions >= 0) & (predictions <= 1)), "the head is one sigmoid unit"


def test_the_augmented_tutorial_job_runs_end_to_end(scratch: Path, tutorial_zip: bytes) -> None:
    """jobs/cats_vs_dogs_augmented.yaml as shipped, on the look-alike archive, with only the source, the checksum
    and the epochs changed: augmentation, dropout, a warm-up and cosine, the early stop's watch and the best
    epoch's export all run on the tutorial's 89.7-million-parameter network."""
    import keras  # noqa: PLC0415 (TensorFlow only where a test needs it)

    shipped = yaml.safe_load(AUGMENTED_SPEC.read_text())
    env, queue = keras_env(scratch / "cache"), scratch / "queue"
    with serve({ARCHIVE_PATH: tutorial_zip}) as served:
        spec = copy.deepcopy(shipped)
        spec["dataset"]["source"], spec["dataset"]["sha256"] = served.url(ARCHIVE_PATH), sha256_of(tutorial_zip)
        spec["training"]["epochs"] = 3
        submit(queue, env, scratch, spec)
        result = work(queue, env)
    console = console_of(result)
    assert result.returncode == 0, console[-4000:]
    assert "Traceback" not in console
    assert "augmented (flip horizontal, rotation 0.1, zoom 0.1)" in " ".join(console.split()), console[-4000:]

    job = job_of(queue, "cats-vs-dogs-augmented")
    assert_only_changes(
        parse_spec(shipped).model_dump(), job.read_spec().model_dump(),
        {"dataset.source", "dataset.sha256", "training.epochs"},
    )  # fmt: skip
    state = job.read_state()
    assert state.status is JobStatus.DONE, state.error
    rows = read_history(job.paths.history)
    rates = [float(row["lr"]) for row in rows]
    assert rates[0] == pytest.approx(0.001, rel=1e-5), "the warm-up ends at the full rate"
    assert rates[0] > rates[1] > rates[2] >= 0.001 * 0.05, rates
    assert {path.name for path in job.paths.final.iterdir()} == {"model.keras", "best.keras", "model.json"}
    description = json.loads((job.paths.final / "model.json").read_text())
    assert description["best"]["monitor"] == "val_accuracy" and 1 <= description["best"]["epoch"] <= len(rows)
    best = keras.models.load_model(job.paths.final / "best.keras")
    assert best.count_params() == SIMPLE_CNN_150_PARAMS


def test_the_transfer_learning_tutorial_job_runs_end_to_end(scratch: Path, tutorial_zip: bytes) -> None:
    """jobs/cats_vs_dogs_mobilenet.yaml as shipped, on the look-alike archive and with look-alike ImageNet weights
    served from 127.0.0.1 (``$RUNNER_WEIGHTS_URL``); only the source, the checksum, the epochs and the fine-tune's
    epoch changed: the weights are downloaded and checked, the head learns alone, then the top 54 layers of
    MobileNetV2 are unfrozen at a tenth of the rate, and both exports are written."""
    import keras  # noqa: PLC0415 (TensorFlow only where a test needs it)

    from runner.networks import imagenet_weights  # noqa: PLC0415
    from tests.support.imagenet_weights import sums_of, write_lookalike  # noqa: PLC0415

    shipped = yaml.safe_load(MOBILENET_SPEC.read_text())
    weights = write_lookalike(scratch / "weights", "mobilenet_v2", alpha=1.0, image_size=(160, 160))
    assert weights.name == imagenet_weights("mobilenet_v2", alpha=1.0, image_size=(160, 160)).file
    files = {ARCHIVE_PATH: tutorial_zip, f"/{weights.name}": weights.read_bytes()}
    files["/SHA256SUMS"] = sums_of({f"/{weights.name}": files[f"/{weights.name}"]})
    env, queue = keras_env(scratch / "cache"), scratch / "queue"
    with serve(files) as served:
        env["RUNNER_WEIGHTS_URL"] = served.base_url
        spec = copy.deepcopy(shipped)
        spec["dataset"]["source"], spec["dataset"]["sha256"] = served.url(ARCHIVE_PATH), sha256_of(tutorial_zip)
        spec["training"]["epochs"] = 3
        spec["model"]["params"]["fine_tune"]["at_epoch"] = 1
        submit(queue, env, scratch, spec)
        result = work(queue, env)
    console = console_of(result)
    assert result.returncode == 0, console[-4000:]
    assert "Traceback" not in console
    assert f"weights:downloading{served.base_url}/{weights.name}" in "".join(console.split())  # wrapped anywhere

    job = job_of(queue, "cats-vs-dogs-mobilenet")
    assert_only_changes(
        parse_spec(shipped).model_dump(), job.read_spec().model_dump(),
        {"dataset.source", "dataset.sha256", "training.epochs", "model.params"},
    )  # fmt: skip
    fine_tune = {**shipped["model"]["params"]["fine_tune"], "at_epoch": 1}
    assert job.read_spec().model.params == {**shipped["model"]["params"], "fine_tune": fine_tune}
    state = job.read_state()
    assert state.status is JobStatus.DONE, state.error
    [tuned] = events_of(job, "fine-tuning")
    assert (tuned["epoch"], tuned["layers"]) == (2, 54 - 18), "the top 54 layers hold 18 BatchNormalization ones"
    rates = [float(row["lr"]) for row in read_history(job.paths.history)]
    assert rates == [pytest.approx(0.0001), pytest.approx(0.00001), pytest.approx(0.00001)]
    assert {path.name for path in job.paths.final.iterdir()} == {"model.keras", "best.keras", "model.json"}
    model = keras.models.load_model(job.paths.final / "model.keras")
    assert model.name == "mobilenet_v2" and model.input_shape == (None, 160, 160, 3)


def test_tutorial_job_with_a_wrong_sha256_fails_with_one_line(scratch: Path, tutorial_zip: bytes) -> None:
    env, queue = keras_env(scratch / "cache"), scratch / "queue"
    wrong = "0123456789abcdef" * 4
    with serve({ARCHIVE_PATH: tutorial_zip}) as served:
        submit(queue, env, scratch, tutorial_spec(served.url(ARCHIVE_PATH), wrong))
        result = work(queue, env)
        requests = list(served.requests)
    console = console_of(result)
    assert result.returncode == 1, console[-4000:]
    assert "Traceback" not in console

    job = job_of(queue, "cats-vs-dogs")
    state = job.read_state()
    assert state.status is JobStatus.FAILED
    assert state.error is not None and "\n" not in state.error
    assert "sha256" in state.error and wrong in state.error and sha256_of(tutorial_zip) in state.error
    assert requests == [ARCHIVE_PATH], "a checksum mismatch is not a network error: no retry"
    assert "Traceback" in job.paths.log.read_text()
    assert not (job.paths.final / "model.keras").exists()
    assert CheckpointStore(job, keep=2).committed() == []
    # The bad download is not kept: the next run fetches it again rather than trusting it.
    assert list((scratch / "cache" / "datasets").glob("*/archive")) == []
    assert list((scratch / "cache" / "datasets").glob("*/data")) == []
    assert status_json(queue, env)["cats-vs-dogs"]["error"] == state.error


# --- 2. bad input at run time ---------------------------------------------------------------------------------


def small_spec(name: str, source: Path | str, **sections: Any) -> dict[str, Any]:
    """A tiny binary job on ``source``; each section given updates the default one's keys (``model`` replaces it)."""
    spec = keras_spec(
        name,
        Path(source),
        dataset={"label_mode": "binary", "validation": None},
        training={"epochs": 1, "loss": "binary_crossentropy"},
    )
    for section, values in sections.items():
        if section == "model":
            spec["model"] = values
        elif isinstance(values, dict):
            spec[section] = {**spec[section], **values}
        else:
            spec[section] = values
    return spec


def bad_inputs(tmp: Path) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """Job name -> (spec, words its one-line error must hold)."""
    good = write_image_folders(tmp / "good", {"a": 3, "b": 3})
    (tmp / "empty").mkdir()
    (tmp / "no-classes" / "train").mkdir(parents=True)
    one_class = write_image_folders(tmp / "one-class", {"only": 4})

    garbage = write_image_folders(tmp / "garbage", {"a": 3, "b": 3})
    (garbage / "train" / "b" / "broken.png").write_bytes(b"\x00\n\x01\rnot an image\n" * 8)
    damaged = write_image_folders(tmp / "damaged", {"a": 3, "b": 3})
    (damaged / "train" / "a" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\xde\xad" * 40)

    checksum_zip = zip_of_folder(good, tmp / "checksum.zip")
    (tmp / "slip").mkdir()
    slip_zip = zip_of_folder(good, tmp / "slip" / "slip.zip", extra={"../escape.txt": b"escaped"})
    wrong_sha = "f" * 64

    return {
        "missing-folder": (
            small_spec("missing-folder", tmp / "no-such-folder"),
            ["does not exist", str(tmp / "no-such-folder")],
        ),
        "empty-folder": (small_spec("empty-folder", tmp / "empty"), ["'train'", "is empty"]),
        "no-classes": (small_spec("no-classes", tmp / "no-classes"), ["no class subfolders"]),
        "one-class": (
            small_spec(
                "one-class",
                one_class,
                dataset={"label_mode": "categorical"},
                training={"loss": "categorical_crossentropy"},
            ),
            ["one class", "only", "at least 2"],
        ),
        "garbage-image": (small_spec("garbage-image", garbage), ["train/b/broken.png"]),
        "damaged-image": (small_spec("damaged-image", damaged), ["train/a/cut.png"]),
        "checksum-zip": (
            small_spec("checksum-zip", checksum_zip, dataset={"sha256": wrong_sha}),
            ["sha256", wrong_sha, sha256_of(checksum_zip.read_bytes())],
        ),
        "zip-slip": (small_spec("zip-slip", slip_zip), ["outside", "../escape.txt"]),
        "no-factory": (
            small_spec("no-factory", good, model={"factory": "nosuchmodule:build", "params": {}}),
            ["nosuchmodule:build", "No module named 'nosuchmodule'"],
        ),
        "factory-not-a-model": (
            small_spec(
                "factory-not-a-model",
                good,
                model={"factory": "tests.support.keras_jobs_factories:not_a_model", "params": {}},
            ),
            ["keras_jobs_factories:not_a_model", "int", "not a keras.Model"],
        ),
    }


def test_bad_inputs_each_fail_their_own_job_with_one_line_and_the_queue_goes_on(tmp_path: Path) -> None:
    env, queue = keras_env(tmp_path / "cache"), tmp_path / "queue"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases = bad_inputs(inputs)
    checksum_zip = inputs / "checksum.zip"
    checksum_zip_before = checksum_zip.read_bytes()
    digits = make_digit_folders(tmp_path / "digits", classes=2, train_per_class=4, val_per_class=2)
    good = keras_spec("good", digits, priority=-1, training={"epochs": 1})
    submit(queue, env, tmp_path, *(spec for spec, _ in cases.values()), good)

    result = work(queue, env)
    console = console_of(result)
    assert result.returncode == 1, console[-4000:]
    assert "Traceback" not in console, console[-4000:]

    statuses = status_json(queue, env)
    problems = []
    for name, (_, words) in cases.items():
        job = job_of(queue, name)
        state = job.read_state()
        if state.status is not JobStatus.FAILED:
            problems.append(f"{name}: {state.status.value}, not failed")
            continue
        error = state.error or ""
        if "\n" in error or "\r" in error or not error:
            problems.append(f"{name}: error is not one line: {error!r}")
        missing = [word for word in words if word not in error]
        if missing:
            problems.append(f"{name}: error {error!r} does not name {missing}")
        log = job.paths.log.read_text()
        if log.count("Traceback") != 1 or error not in log:
            problems.append(f"{name}: runner.log does not hold its traceback and error once")
        if CheckpointStore(job, keep=2).committed() or (job.paths.final / "model.keras").exists():
            problems.append(f"{name}: a checkpoint or an export appeared")
        if f"job '{name}' failed" not in console:
            problems.append(f"{name}: the console does not say it failed")
        record = statuses.get(name, {})
        if record.get("state") != "failed" or record.get("error") != state.error:
            problems.append(f"{name}: status --json shows {record.get('state')!r} / {record.get('error')!r}")
    assert not problems, "\n".join(problems)

    # The good job ran last (lowest priority), after every failure, and finished.
    good_job = job_of(queue, "good")
    assert good_job.read_state().status is JobStatus.DONE, good_job.read_state().error
    assert "Traceback" not in good_job.paths.log.read_text()
    assert (good_job.paths.final / "model.keras").is_file()
    assert statuses["good"]["state"] == "done" and statuses["good"]["error"] is None
    good_claimed = events_of(good_job, "claimed")[0]["time"]
    last_failure = max(events_of(job_of(queue, name), "failed")[0]["time"] for name in cases)
    assert good_claimed >= last_failure

    # Zip slip: nothing was written outside, and nothing of that archive was unpacked at all.
    assert [path for path in tmp_path.rglob("escape.txt")] == []
    slip_entries = [entry for entry in (tmp_path / "cache" / "datasets").glob("slip.zip-*") if entry.is_dir()]
    assert slip_entries and all(not (entry / "data").exists() for entry in slip_entries)
    # A local archive with the wrong checksum is the user's file: reported, never removed or changed.
    assert checksum_zip.read_bytes() == checksum_zip_before


# --- 3. a failed job keeps its checkpoints --------------------------------------------------------------------


def wait_for_checkpoint(job: Job, worker: subprocess.Popen[str], deadline_s: float = 240) -> None:
    deadline = time.monotonic() + deadline_s
    while worker.poll() is None:
        try:
            if job.read_state().checkpoint is not None:
                return
        except Exception:  # not submitted-and-written yet, or being replaced
            pass
        assert time.monotonic() < deadline, "no checkpoint was published"
        time.sleep(0.05)
    raise AssertionError(f"`runner work` ended before its first checkpoint: {worker.communicate()}")


def test_a_failed_job_keeps_its_checkpoints_and_resumes_from_them_after_retry(tmp_path: Path) -> None:
    env, queue = keras_env(tmp_path / "cache"), tmp_path / "queue"
    data = make_digit_folders(tmp_path / "digits", classes=3, train_per_class=8, val_per_class=2)
    backup = shutil.copytree(data, tmp_path / "digits-backup")
    epochs = 25
    submit(queue, env, tmp_path, keras_spec("keeper", data, training={"epochs": epochs}))
    job = job_of(queue, "keeper")

    # A session ends on SIGTERM after at least one checkpoint: it saves one more and exits 128 + 15.
    worker = start_cli("work", "--queue", str(queue), env=env)
    try:
        wait_for_checkpoint(job, worker)
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 128 + signal.SIGTERM, (out + err)[-4000:]
    assert "Traceback" not in out + err
    assert events_of(job, "interrupted"), "a stop on SIGTERM is recorded"
    interrupted = job.read_state()
    assert interrupted.status is JobStatus.RUNNING and 1 <= interrupted.epoch < epochs
    store = CheckpointStore(job, keep=2)
    committed = store.committed()
    assert committed and committed[0].id == interrupted.checkpoint
    before = {info.id: tree_digest(info.path) for info in committed}
    assert status_json(queue, env)["keeper"]["state"] == "interrupted"

    # The data folder goes away: the resumed run fails with one line, and the checkpoints stay as they were.
    shutil.rmtree(data)
    failed_run = work(queue, env)
    assert failed_run.returncode == 1, console_of(failed_run)[-4000:]
    assert "Traceback" not in console_of(failed_run)
    failed = job.read_state()
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None and "\n" not in failed.error
    assert "does not exist" in failed.error and str(data) in failed.error
    assert "Traceback" in job.paths.log.read_text()
    assert failed.checkpoint == interrupted.checkpoint and failed.epoch == interrupted.epoch
    after = store.committed()
    assert [info.id for info in after] == [info.id for info in committed]
    for info in after:
        store.verify(info)
        assert tree_digest(info.path) == before[info.id], f"checkpoint {info.id} changed"
    assert status_json(queue, env)["keeper"]["error"] == failed.error

    # The folder is back; `runner retry` queues the job and `runner work` resumes it from its newest checkpoint.
    shutil.copytree(backup, data)
    retried = run_cli("retry", "keeper", "--queue", str(queue), env=env)
    assert retried.returncode == 0, retried.stderr
    assert job.read_state().status is JobStatus.QUEUED and job.read_state().error is None
    final = work(queue, env)
    assert final.returncode == 0, console_of(final)[-4000:]
    done = job.read_state()
    assert done.status is JobStatus.DONE and done.epoch == epochs and done.error is None
    resumed = events_of(job, "resumed")
    assert len(resumed) == 1
    assert resumed[0]["checkpoint"] == committed[0].id and resumed[0]["epoch"] == interrupted.epoch
    assert len(events_of(job, "started")) == 1, "the retried job resumed; it did not start over"
    rows = read_history(job.paths.history)
    assert [row["epoch"] for row in rows] == [str(epoch) for epoch in range(epochs)]
    assert (job.paths.final / "model.keras").is_file()
