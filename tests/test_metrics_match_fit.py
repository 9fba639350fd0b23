"""Epoch metrics are the ones `model.fit` gives for the same batches, on every supported Keras 3.

Up to Keras 3.14 `train_on_batch` accumulates metrics across calls until they are reset (3.15 resets them in
each call), and `evaluate` resets them at its start, not its end: a loop that averages what `train_on_batch`
returns reports running means of running means, and validation leaks into the next epoch. runner reads Keras'
own metric state instead and resets it where `fit` does. Here a real `runner work` trains a job (several steps
per compiled call, a mid-epoch checkpoint cadence) and the same network, built and seeded the same way, is
trained by `model.fit` on the same batches, epoch by epoch; every metric of every epoch must agree, and so must
the final weights. CI runs this on the newest releases and on Colab's pins (tests/constraints/colab.txt).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from runner.spec import load_spec  # noqa: E402
from runner.train.backends.tensorflow import configure_determinism  # noqa: E402
from runner.train.data.pipeline import prepare_dataset  # noqa: E402
from runner.train.engine.loop import build_metrics  # noqa: E402
from runner.train.models.build import build_model, compile_model  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from tests.support.keras_jobs import (  # noqa: E402
    job_of,
    keras_env,
    make_digit_folders,
    submit_keras_spec,
    write_keras_spec,
)
from tests.support.kill_harness import newest_training_state, newest_variables  # noqa: E402

pytestmark = pytest.mark.slow


def fit_history(
    spec_path: Path, cache: Path, class_weight: dict[int, float] | None = None
) -> tuple[list[dict[str, float]], list[np.ndarray]]:
    """``model.fit``, one epoch per call on that epoch's batches (runner's data order), as an idiomatic script."""
    spec = load_spec(spec_path)
    data = prepare_dataset(spec.dataset, seed=spec.training.seed, cache_dir=cache)
    configure_determinism(spec)
    model = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes)
    compile_model(model, spec)
    history = []
    for epoch in range(spec.training.epochs):
        logs = model.fit(
            data.train_batches(epoch=epoch),
            validation_data=data.validation_batches(),
            shuffle=False,
            verbose=0,
            class_weight=class_weight,
        )
        rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))  # runner's lr column
        history.append({"epoch": epoch, **{name: values[-1] for name, values in logs.history.items()}, "lr": rate})
    return history, [np.asarray(variable.numpy()) for variable in model.variables]


def test_epoch_metrics_and_weights_equal_model_fit_on_the_same_batches(tmp_path: Path) -> None:
    digits = make_digit_folders(tmp_path / "digits", train_per_class=20)  # 60 images: 8 batches, the last of 4
    env = keras_env(tmp_path / "cache")
    overrides = {"training": {"epochs": 3, "steps_per_execution": 3}, "checkpoint": {"every_minutes": 0.000001}}
    submit_keras_spec(tmp_path, tmp_path / "queue", digits, "fit", env, **overrides)
    result = run_cli("work", "--queue", str(tmp_path / "queue"), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    expected, weights = fit_history(write_keras_spec(tmp_path, "fit", digits, **overrides), tmp_path / "fit-cache")
    job = job_of(tmp_path / "queue", "fit")
    got = newest_training_state(job)["history"]
    assert [set(row) for row in got] == [set(row) for row in expected]
    for ours, theirs in zip(got, expected):
        for name, value in theirs.items():
            assert ours[name] == pytest.approx(value, rel=1e-6, abs=1e-7), (ours["epoch"], name, ours, theirs)
    variables = newest_variables(job)
    ours_model = [variables[name] for name in sorted(variables) if name.startswith("model/")]
    assert len(ours_model) == len(weights)
    assert all(np.array_equal(a, b) for a, b in zip(ours_model, weights)), "runner's weights differ from fit's"


def test_class_weights_train_as_fit_with_class_weight(tmp_path: Path) -> None:
    """`training.class_weight` weighs the loss as ``fit(class_weight=...)`` does: the same weights, bit for bit."""
    digits = make_digit_folders(tmp_path / "digits", train_per_class=16)
    env = keras_env(tmp_path / "cache")
    weighted = {"0": 3.0, "2": 0.25}  # class "1" is left out: it weighs 1
    overrides = {"training": {"epochs": 2, "class_weight": weighted}}
    submit_keras_spec(tmp_path, tmp_path / "queue", digits, "weighted", env, **overrides)
    result = run_cli("work", "--queue", str(tmp_path / "queue"), env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class weights: 0 3, 1 1, 2 0.25" in result.stdout + result.stderr

    spec_path = write_keras_spec(tmp_path, "weighted", digits, **overrides)
    expected, weights = fit_history(spec_path, tmp_path / "fit-cache", class_weight={0: 3.0, 1: 1.0, 2: 0.25})
    unweighted, _ = fit_history(write_keras_spec(tmp_path, "plain", digits, training={"epochs": 2}), tmp_path / "c2")
    job = job_of(tmp_path / "queue", "weighted")
    got = newest_training_state(job)["history"]
    assert got[0]["loss"] == pytest.approx(expected[0]["loss"], rel=1e-6)
    assert got[0]["loss"] != pytest.approx(unweighted[0]["loss"], rel=1e-3), "the weights changed nothing"
    variables = newest_variables(job)
    ours_model = [variables[name] for name in sorted(variables) if name.startswith("model/")]
    assert all(np.array_equal(a, b) for a, b in zip(ours_model, weights, strict=True)), "weights differ from fit's"


def test_keras_own_metric_state_is_built_before_the_first_step(tmp_path: Path) -> None:
    """A snapshot taken before any step (the initial weights) and its restore need the metrics' variables."""
    digits = make_digit_folders(tmp_path / "digits", train_per_class=4)
    spec = load_spec(write_keras_spec(tmp_path, "early", digits))
    data = prepare_dataset(spec.dataset, seed=spec.training.seed, cache_dir=tmp_path / "cache")
    model = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes)
    compile_model(model, spec)
    build_metrics(model, data.train_batches(epoch=0).element_spec)
    names = [variable.path for metric in model.metrics for variable in metric.variables]
    assert any("loss" in name for name in names) and any("accuracy" in name for name in names), names
