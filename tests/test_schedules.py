"""Learning-rate schedules, ReduceLROnPlateau and early stopping, exact across kills.

The curves are checked against their closed forms; the plateau and the early stop against Keras' own callbacks
fed the same values; and a real job that warms up, follows a cosine, lowers its rate on a plateau, stops early
and keeps its best epoch is killed at random moments after commits and must end as its uninterrupted run does:
variables bit for bit, the plateau's and the early stop's state, history.csv with its lr column, the epoch it
stopped at, and the best epoch's export.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from runner.spec import EarlyStoppingSpec, PlateauSpec
from tests.conftest import make_spec, run_cli
from tests.support.keras_jobs import job_of, keras_env, keras_spec, make_digit_folders, submit_keras_spec
from tests.support.kill_harness import (
    Kill,
    KillRun,
    Reference,
    assert_same_result,
    check_resumes,
    uninterrupted_run,
)

NAME = "scheduled"
STEPS_PER_EPOCH = 10


def rate_of(training: dict, steps: list[int], *, scale: float = 1.0) -> list[float]:
    from runner.train.engine.schedule import LearningRate  # noqa: PLC0415 (Keras only in the tests that need it)

    rate = LearningRate(make_spec("a", training={"epochs": 5, "learning_rate": 0.1, **training}), steps_per_epoch=10)
    rate.scale.assign(scale)
    return [float(rate.at(step)) for step in steps]


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ({"kind": "constant"}, lambda s: 0.1),
        ({"kind": "cosine", "alpha": 0.2}, lambda s: 0.1 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * s / 50)))),
        ({"kind": "exponential", "decay_rate": 0.5, "decay_epochs": 2}, lambda s: 0.1 * 0.5 ** (s / 20)),
        ({"kind": "step", "factor": 0.1, "decay_epochs": 2}, lambda s: 0.1 * 0.1 ** (s // 20)),
        ({"kind": "polynomial", "end_learning_rate": 0.01, "power": 2.0}, lambda s: 0.01 + 0.09 * (1 - s / 50) ** 2),
    ],
    ids=["constant", "cosine", "exponential", "step", "polynomial"],
)
def test_each_schedule_follows_its_curve_in_optimizer_steps(schedule: dict, expected) -> None:  # noqa: ANN001
    steps = [0, 1, 9, 10, 19, 20, 33, 49, 50, 60]
    got = rate_of({"lr_schedule": schedule}, steps)
    clamped = schedule["kind"] in ("cosine", "polynomial")  # they end at the last step; the others go on decaying
    assert got == pytest.approx([expected(min(step, 50) if clamped else step) for step in steps], rel=1e-5)


def test_warmup_rises_linearly_then_the_schedule_starts_from_the_top() -> None:
    got = rate_of({"lr_schedule": {"kind": "cosine", "warmup_epochs": 1}}, [0, 4, 9, 10, 30, 50])
    after = lambda s: 0.1 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 40))  # noqa: E731
    assert got == pytest.approx([0.01, 0.05, 0.1, after(10), after(30), after(50)], rel=1e-5)


def test_a_plateau_scales_the_curve_and_never_takes_it_below_min_lr() -> None:
    plateau = {"reduce_lr_on_plateau": {"factor": 0.5, "min_lr": 0.004}}
    assert rate_of(plateau, [0, 30], scale=0.5) == pytest.approx([0.05, 0.05])
    assert rate_of(plateau, [0], scale=0.01) == pytest.approx([0.004])  # floored
    falling = {**plateau, "lr_schedule": "cosine"}
    assert rate_of(falling, [50], scale=1.0) == pytest.approx([0.0], abs=1e-9)  # the schedule alone may go lower


def test_a_warmup_of_a_fraction_of_a_step_never_goes_above_the_rate() -> None:
    assert rate_of({"lr_schedule": {"kind": "constant", "warmup_epochs": 0.05}}, [0, 1]) == pytest.approx([0.1, 0.1])
    three = rate_of({"lr_schedule": {"kind": "constant", "warmup_epochs": 0.25}}, [0, 1, 2, 3])  # 2.5 steps: 3
    assert three == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1])


@pytest.mark.parametrize(
    ("monitor", "mode"),
    [
        ("val_loss", "min"), ("loss", "min"), ("val_mean_squared_error", "min"), ("accuracy", "max"),
        ("val_binary_accuracy", "max"), ("sparse_categorical_accuracy", "max"), ("val_auc", "max"),
        ("mean_iou", "max"), ("r2_score", "max"), ("val_precision", "max"), ("recall", "max"),
    ],
)  # fmt: skip
def test_auto_mode_maximises_the_metrics_keras_maximises(monitor: str, mode: str) -> None:
    from runner.spec import monitor_mode  # noqa: PLC0415

    assert monitor_mode(monitor) == mode


def test_a_changed_monitor_starts_its_watch_again() -> None:
    """`runner edit` switched val_accuracy for val_loss: the stored best (an accuracy) means nothing for a loss."""
    from runner.train.engine.watchers import early_stopping_epoch_end, plateau_epoch_end  # noqa: PLC0415

    stop = early_stopping_epoch_end(
        EarlyStoppingSpec(patience=1), "val_loss", {"best": 0.9, "best_epoch": 3, "wait": 1, "monitor": "val_accuracy",
        "mode": "max"}, 1.2, epoch=5,
    )  # fmt: skip
    assert (stop.best, stop.stop, stop.state["best"], stop.state["wait"]) == (True, False, 1.2, 0)
    lowered = plateau_epoch_end(
        PlateauSpec(patience=0), "val_loss", {"best": 0.9, "wait": 0, "cooldown": 0, "monitor": "val_accuracy",
        "mode": "max"}, 1.2, rate=0.1, scale=1.0,
    )  # fmt: skip
    assert not lowered.lowered and lowered.state["best"] == 1.2


def test_class_weight_keys_written_as_numbers_name_the_class_folders() -> None:
    spec = make_spec("a", training={"class_weight": {0: 2.0, 1: 0.5}})
    assert spec.training.class_weight == {"0": 2.0, "1": 0.5}


# --- the same decisions as Keras' callbacks --------------------------------------------------------------------

SEQUENCES = [
    [1.0, 0.9, 0.95, 0.94, 0.93, 0.96, 0.8, 0.81, 0.82, 0.83, 0.84, 0.7],
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
    [0.2, 0.3, 0.4, 0.5, 0.45, 0.44, 0.6, 0.6, 0.6],
]


def _tiny_model(rate: float):  # noqa: ANN202
    import keras  # noqa: PLC0415

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=rate), loss="mse")
    return model


@pytest.mark.parametrize("values", SEQUENCES)
@pytest.mark.parametrize(
    ("monitor", "settings"),
    [
        ("val_loss", {"factor": 0.5, "patience": 2, "min_delta": 0.001, "cooldown": 1, "min_lr": 0.02}),
        ("val_loss", {"factor": 0.1, "patience": 0, "min_delta": 0.0, "cooldown": 0, "min_lr": 0.0}),
        ("val_accuracy", {"factor": 0.5, "patience": 1, "min_delta": 0.01, "cooldown": 2, "min_lr": 0.0}),
    ],
)
def test_the_plateau_lowers_the_rate_when_keras_reduce_lr_on_plateau_does(
    values: list[float], monitor: str, settings: dict
) -> None:
    import keras  # noqa: PLC0415

    from runner.train.engine.watchers import plateau_epoch_end  # noqa: PLC0415

    model = _tiny_model(0.1)
    mode = "max" if "accuracy" in monitor else "min"  # what runner's auto decides; Keras asks a compiled metric
    callback = keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, **settings)
    callback.set_model(model)
    callback.on_train_begin()
    spec, state, scale = PlateauSpec(monitor=monitor, **settings), None, 1.0
    for epoch, value in enumerate(values):
        ours = max(0.1 * scale, settings["min_lr"]) if scale < 1 else 0.1 * scale
        callback.on_epoch_end(epoch, {monitor: value})
        step = plateau_epoch_end(spec, monitor, state, value, rate=float(np.float32(ours)), scale=scale)
        state, scale = step.state, step.scale
        ours = max(0.1 * scale, settings["min_lr"]) if scale < 1 else 0.1 * scale
        theirs = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        assert ours == pytest.approx(theirs, rel=1e-6), f"epoch {epoch}: runner {ours}, Keras {theirs}"


@pytest.mark.parametrize("values", SEQUENCES)
@pytest.mark.parametrize(
    ("monitor", "settings"),
    [
        ("val_loss", {"patience": 2, "min_delta": 0.0, "mode": "auto"}),
        ("val_loss", {"patience": 0, "min_delta": 0.05, "mode": "min"}),
        ("val_accuracy", {"patience": 1, "min_delta": 0.0, "mode": "auto"}),
        ("val_accuracy", {"patience": 3, "min_delta": 0.02, "mode": "max"}),
    ],
)
def test_the_early_stop_stops_where_keras_early_stopping_does(values: list[float], monitor: str, settings: dict) -> None:
    import keras  # noqa: PLC0415

    from runner.train.engine.watchers import early_stopping_epoch_end  # noqa: PLC0415

    model = _tiny_model(0.1)
    keras_mode = settings["mode"] if settings["mode"] != "auto" else ("max" if "accuracy" in monitor else "min")
    callback = keras.callbacks.EarlyStopping(
        monitor=monitor, patience=settings["patience"], min_delta=settings["min_delta"], mode=keras_mode
    )
    callback.set_model(model)
    callback.on_train_begin()
    spec, state = EarlyStoppingSpec(monitor=monitor, **settings), None
    theirs = ours = None
    for epoch, value in enumerate(values):
        model.stop_training = False
        callback.on_epoch_end(epoch, {monitor: value})
        step = early_stopping_epoch_end(spec, monitor, state, value, epoch=epoch)
        state = step.state
        if model.stop_training and theirs is None:
            theirs = epoch
        if step.stop and ours is None:
            ours = epoch
    assert ours == theirs
    assert state["best_epoch"] == callback.best_epoch


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("training", "said"),
    [
        ({"early_stopping": {"monitor": "val_loss"}}, "training.early_stopping.monitor 'val_loss' needs validation data"),
        ({"reduce_lr_on_plateau": {"monitor": "val_auc"}}, "training.reduce_lr_on_plateau.monitor 'val_auc' needs"),
        ({"early_stopping": {"monitor": "auc"}}, "training.early_stopping.monitor 'auc' is not a metric of this job"),
        ({"early_stopping": {"patience": -1}}, "training.early_stopping.patience: Input should be greater than or"),
        ({"lr_schedule": {"kind": "cosine", "decay_rate": 0.5}}, "decay_rate is not a parameter of the cosine"),
        ({"lr_schedule": {"kind": "cosine", "warmup_epochs": 4}}, "warmup_epochs (4) must be less than training.epochs"),
        ({"lr_schedule": {"kind": "polynomial", "end_learning_rate": 0.5}}, "end_learning_rate (0.5) must be below"),
        ({"reduce_lr_on_plateau": {"min_lr": 0.01}}, "reduce_lr_on_plateau.min_lr (0.01) must be below"),
        ({"lr_schedule": "linear"}, "training.lr_schedule.kind: Input should be 'constant', 'cosine'"),
    ],
)
def test_contradicting_settings_are_one_line_at_submit(tmp_path: Path, training: dict, said: str) -> None:
    written = keras_spec("bad", tmp_path / "data", training={"epochs": 4, **training})
    del written["dataset"]["validation"]  # no validation data
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(written))
    result = run_cli("submit", str(spec), "--queue", str(tmp_path / "queue"))

    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert said in line, line
    assert not (tmp_path / "queue" / "jobs" / "bad").exists()


def test_a_class_weight_for_a_class_the_dataset_lacks_fails_the_job_at_claim_with_one_line(tmp_path: Path) -> None:
    digits = make_digit_folders(tmp_path / "digits", train_per_class=4, val_per_class=2)
    env = keras_env(tmp_path / "cache")
    submit_keras_spec(tmp_path, tmp_path / "queue", digits, "weighted", env, training={"class_weight": {"cats": 2}})
    result = run_cli("work", "--queue", str(tmp_path / "queue"), env=env, timeout=600)

    assert result.returncode == 1
    said = " ".join((result.stdout + result.stderr).split())
    assert "training.class_weight names 'cats', not a class of the dataset (its classes: 0, 1, 2)" in said, said
    assert "Traceback" not in said
    state = job_of(tmp_path / "queue", "weighted").read_state()
    assert state.status.value == "failed" and "class_weight" in (state.error or "")


# --- exact across kills -------------------------------------------------------------------------------------

SCHEDULED = {
    "dataset": {"augment": {"flip": "horizontal", "rotation": 0.05, "brightness": 0.05}},
    "training": {
        "epochs": 10,
        "lr_schedule": {"kind": "cosine", "warmup_epochs": 1, "alpha": 0.1},
        "reduce_lr_on_plateau": {"monitor": "loss", "patience": 0, "min_delta": 0.3, "factor": 0.5},
        "early_stopping": {"monitor": "val_accuracy", "patience": 3, "restore_best": True},
        "steps_per_execution": 3,
        "class_weight": {"0": 2.0},
    },
    "export": {"best": True},
}
"""A warm-up, a cosine, a plateau that lowers the rate, an early stop with the best weights restored, the best
epoch exported, a class weighed double, and augmented images. On these digits the loss rarely falls by 0.3 in an epoch, so the plateau lowers the rate
from epoch 2 on, and val_accuracy reaches its best early and stays, so the early stop ends the run: all of it
happens, and the kills land before, between and after the lowerings."""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_digit_folders(tmp_path_factory.mktemp("digits"), train_per_class=24)


@pytest.fixture(scope="module")
def reference(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Reference, Path]:
    tmp = tmp_path_factory.mktemp("reference")
    return uninterrupted_run(tmp, digits, NAME, keras_env(tmp / "cache"), **SCHEDULED)


def _events(queue: Path, kind: str) -> list[dict]:
    return [event for event in job_of(queue, NAME).events.read() if event["event"] == kind]


def _best_weights(queue: Path) -> list[np.ndarray]:
    import keras  # noqa: PLC0415

    return keras.models.load_model(job_of(queue, NAME).paths.final / "best.keras").get_weights()


def test_the_uninterrupted_run_warms_up_lowers_its_rate_and_stops_early(reference: tuple[Reference, Path]) -> None:
    """The reference has to do what the kill test relies on: otherwise that test would pass without proof."""
    ref, queue = reference
    history = ref.history
    rates = [float(row["lr"]) for row in history]
    assert rates[0] == pytest.approx(0.01, rel=1e-5), "the warm-up's last step reaches the full rate"
    assert len(_events(queue, "lr-reduced")) >= 1, "the plateau never lowered the rate"
    [stopped] = _events(queue, "early-stopped")
    assert stopped["epoch"] == len(history) < 10, "the early stop did not end the run before its last epoch"
    assert ref.training_state["stopped_early"]["epoch"] == stopped["epoch"]
    state = job_of(queue, NAME).read_state()
    assert state.status.value == "done" and state.stopped_early and "stopped early after epoch" in state.stopped_early
    description = json.loads((job_of(queue, NAME).paths.final / "model.json").read_text())
    assert description["best"]["epoch"] == stopped["best_epoch"] < stopped["epoch"]


def test_kills_after_commits_end_as_the_uninterrupted_run(
    digits: Path, reference: tuple[Reference, Path], tmp_path: Path
) -> None:
    ref, reference_queue = reference
    env = keras_env(tmp_path / "cache")
    queue = tmp_path / "queue"
    submit_keras_spec(tmp_path, queue, digits, NAME, env, **SCHEDULED, checkpoint={"every_minutes": 0.000001})
    run = KillRun(queue, NAME, env, rng=random.Random(12), folder=tmp_path)
    for nth in (2, 3, 2, 3, 2, 3):
        run.session(Kill.after_commit(nth, delay_s=(0.0, 0.05)))
    run.finish()

    assert len(run.landed("training")) >= 4, run.summary()
    assert run.mid_epoch_resumes() >= 1, run.summary()
    lowered_after = _events(reference_queue, "lr-reduced")[0]["epoch"]
    resumed_later = [event for event in run.resumes() if event["epoch"] >= lowered_after]
    assert resumed_later, f"no resume after the first lowering (epoch {lowered_after}): {run.summary()}"
    check_resumes(run)
    assert_same_result(run, ref)  # the variables, the plateau's and the early stop's state, history.csv with lr
    assert len(_events(queue, "early-stopped")) >= 1
    assert _events(queue, "early-stopped")[-1]["epoch"] == _events(reference_queue, "early-stopped")[0]["epoch"]
    for ours, theirs in zip(_best_weights(queue), _best_weights(reference_queue), strict=True):
        assert np.array_equal(ours, theirs), "the best epoch's export differs from the uninterrupted run's"
    run.report()
