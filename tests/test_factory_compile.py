"""A factory's own compile is kept (and said), and a factory model fed raw pixels without rescaling is warned
about: real `runner work` processes, real TensorFlow, tiny real images."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import h5py
import pytest

from tests.conftest import run_cli
from tests.support.keras_jobs import job_of, keras_env, make_digit_folders, submit_keras_spec

pytestmark = pytest.mark.slow

FACTORIES = "tests.support.keras_jobs_factories"


def _events(queue: Path, name: str, kind: str) -> list[dict]:
    lines = job_of(queue, name).paths.events.read_text().splitlines()
    return [event for event in map(json.loads, lines) if event["event"] == kind]


def _exported_compile(queue: Path, name: str) -> dict:
    with zipfile.ZipFile(job_of(queue, name).paths.final / "model.keras") as archive:
        return json.loads(archive.read("config.json"))["compile_config"]


def test_a_factorys_own_compile_is_kept_and_said_and_one_without_rescaling_is_warned_about(tmp_path: Path) -> None:
    data = make_digit_folders(tmp_path / "digits")
    env = keras_env(tmp_path / "cache")
    queue = tmp_path / "queue"
    model = {"builtin": None, "factory": f"{FACTORIES}:compiled_with_rmsprop", "params": {}}
    submit_keras_spec(tmp_path, queue, data, "own", env, model=model, training={"epochs": 1}, export={"optimizer": True})
    submit_keras_spec(
        tmp_path, queue, data, "spec", env, training={"epochs": 1},
        model={"builtin": None, "factory": f"{FACTORIES}:without_rescaling", "params": {}},
    )  # fmt: skip

    result = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    said = result.stdout + result.stderr

    assert result.returncode == 0, said[-3000:]
    assert "model: compiled by its factory (RMSprop, learning rate 0.0001, loss sparse_categorical_crossentropy)" in said
    [own] = _events(queue, "own", "compiled")
    assert (own["by"], own["optimizer"], own["loss"]) == ("factory", "RMSprop", "sparse_categorical_crossentropy")
    assert own["learning_rate"] == pytest.approx(1e-4)
    assert _exported_compile(queue, "own")["optimizer"]["class_name"] == "RMSprop"  # what really trained
    with zipfile.ZipFile(job_of(queue, "own").paths.final / "model.keras") as archive:
        with h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
            assert "optimizer" in weights, "export.optimizer: true keeps the optimizer's state"
    [spec] = _events(queue, "spec", "compiled")  # not compiled by its factory: the spec's Adam 0.01
    assert (spec["by"], spec["optimizer"], spec["learning_rate"]) == ("spec", "adam", 0.01)
    assert _exported_compile(queue, "spec") == {}, "exported for predictions: without the optimizer by default"
    # The uncompiled factory has no Rescaling layer: one warning, for it only, also in its log.
    warning = f"warning: model: the factory '{FACTORIES}:without_rescaling' has no Rescaling or Normalization layer"
    assert said.count(warning) == 1 and "keras.layers.Rescaling(1 / 255)" in said, said
    assert f"'{FACTORIES}:compiled_with_rmsprop' has no Rescaling" not in said
    assert "has no Rescaling" in job_of(queue, "spec").paths.log.read_text()
