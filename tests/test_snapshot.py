"""A snapshot taken in memory holds the training state of the moment it was taken, whatever training does
before it is written: the publisher's thread writes it while the next steps run (runner.train.snapshots)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from runner.checkpoints import CheckpointStore
from runner.queue import Queue
from runner.train.snapshots.snapshot import TrainingState, capture_snapshot, load_snapshot
from tests.conftest import make_spec


OTHER_BACKEND = "jax" if keras.backend.backend() == "tensorflow" else "tensorflow"


def tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape=(4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


def values(model: keras.Model) -> list[np.ndarray]:
    variables = [*model.variables, *model.optimizer.variables]
    return [np.array(variable.numpy(), copy=True) for variable in variables]


def test_a_captured_snapshot_keeps_the_state_of_its_moment_while_training_goes_on(tmp_path: Path) -> None:
    x, y = np.random.default_rng(0).normal(size=(32, 4)), np.random.default_rng(1).normal(size=(32, 1))
    model = tiny_model()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    at_capture = values(model)
    captured = capture_snapshot(model, TrainingState(epoch=1, step=4, global_step=4, seen=32))

    model.fit(x, y, batch_size=8, epochs=2, verbose=0)  # the optimizer updates every variable in place
    assert any(not np.array_equal(a, b) for a, b in zip(at_capture, values(model))), "training changed nothing"
    assert captured.held
    captured.write(tmp_path / "snapshot")
    assert not captured.held

    restored = tiny_model()
    restored.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)  # builds its optimizer and metrics; all replaced
    state = load_snapshot(restored, tmp_path / "snapshot", checkpoint="test")
    assert (state.epoch, state.step, state.global_step, state.seen) == (1, 4, 4, 32)
    for expected, actual in zip(at_capture, values(restored), strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_writing_twice_writes_once(tmp_path: Path) -> None:
    captured = capture_snapshot(tiny_model(), TrainingState())
    captured.write(tmp_path / "first")
    captured.write(tmp_path / "second")  # the publisher's thread and the trainer may both try

    assert (tmp_path / "first" / "variables.npz").is_file() and not (tmp_path / "second").exists()


def test_a_snapshot_committed_from_memory_restores_the_values_of_its_moment(tmp_path: Path, queue: Queue) -> None:
    """The publisher commits a captured snapshot straight from memory (a zip written without seeking back); what
    the store restores from the job folder loads into a model as the values of the moment it was taken."""
    model = tiny_model()
    x, y = np.random.default_rng(0).normal(size=(16, 4)), np.random.default_rng(1).normal(size=(16, 1))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    at_capture = values(model)
    captured = capture_snapshot(model, TrainingState(epoch=1, global_step=2))
    job, _ = queue.submit(make_spec("job-a"))
    store = CheckpointStore(job, keep=2)

    store.commit(captured.files, generation=1, epoch=1, step=0)
    info = store.restore(tmp_path / "restored")

    assert info is not None and not store.fallbacks
    restored = tiny_model()
    restored.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)
    state = load_snapshot(restored, tmp_path / "restored", checkpoint=info.id)
    assert (state.epoch, state.global_step) == (1, 2)
    for expected, actual in zip(at_capture, values(restored), strict=True):
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize(
    ("written_on", "said"),
    [
        (
            {"backend": OTHER_BACKEND, "precision": "mixed_float16"},
            f"checkpoint c1 was trained on Keras' {OTHER_BACKEND} backend under the mixed_float16 policy, whose "
            "optimizer has",
        ),
        (
            {"backend": keras.backend.backend(), "precision": "mixed_float16"},
            f"runs {keras.backend.backend()} under float32, whose optimizer has",
        ),
    ],
    ids=["other-backend", "other-policy"],
)
def test_a_snapshot_of_another_mixed_precision_is_refused_in_one_line_naming_both(
    tmp_path: Path, written_on: dict[str, str], said: str
) -> None:
    """float16 keeps a loss scale in the optimizer and a TPU's bfloat16 none: a snapshot whose optimizer differs
    for that reason is refused naming both sides, not called corrupt (which would pass over a sound checkpoint)."""
    from runner.errors import CheckpointCorrupt, TrainerError

    x, y = np.random.default_rng(0).normal(size=(16, 4)), np.random.default_rng(1).normal(size=(16, 1))
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = tiny_model()
        mixed.fit(x, y, batch_size=8, epochs=1, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    capture_snapshot(mixed, TrainingState(epoch=1, **written_on)).write(tmp_path / "snapshot")
    plain = tiny_model()
    plain.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)

    with pytest.raises(TrainerError) as refused:
        load_snapshot(plain, tmp_path / "snapshot", checkpoint="c1")
    assert not isinstance(refused.value, CheckpointCorrupt)
    [line] = str(refused.value).splitlines()
    assert said in line and "float16 keeps a loss scale" in line, line
    assert f"KERAS_BACKEND={written_on['backend']}" in line

    same = {"backend": keras.backend.backend(), "precision": None}  # written before the policy was recorded
    capture_snapshot(mixed, TrainingState(epoch=1, **same)).write(tmp_path / "older")
    with pytest.raises(CheckpointCorrupt, match="optimizer variables but the model has"):
        load_snapshot(plain, tmp_path / "older", checkpoint="c0")


def test_a_snapshot_of_a_newer_format_is_refused_in_one_line_not_taken_for_damaged(tmp_path: Path) -> None:
    import json

    from runner.errors import CheckpointCorrupt, TrainerError
    from runner.train.snapshots.snapshot import SNAPSHOT_FORMAT, STATE_FILE

    model = tiny_model()
    capture_snapshot(model, TrainingState(epoch=1)).write(tmp_path / "snapshot")
    state_file = tmp_path / "snapshot" / STATE_FILE
    document = json.loads(state_file.read_text())
    assert document["format"] == SNAPSHOT_FORMAT
    state_file.write_text(json.dumps({**document, "format": SNAPSHOT_FORMAT + 1, "a_later_field": 1}))

    with pytest.raises(TrainerError) as refused:
        load_snapshot(model, tmp_path / "snapshot", checkpoint="c9")
    assert not isinstance(refused.value, CheckpointCorrupt)
    assert f"checkpoint c9 was written by a newer runner (snapshot format {SNAPSHOT_FORMAT + 1}" in str(refused.value)


@pytest.mark.parametrize(
    "value",
    [
        np.zeros((3, 4), "float32"),
        np.array(7, "int64"),  # an optimizer's step counter: 0-d, and it must stay 0-d
        np.arange(10, dtype="float16")[::2],  # not contiguous
        np.zeros((0, 3)),
        np.array([True, False]),
        np.array([1, 2], dtype=">i4"),
    ],
    ids=["float32", "0-d", "strided", "empty", "bool", "big-endian"],
)
def test_each_array_is_stored_as_np_save_stores_it(value: np.ndarray) -> None:
    import io

    from runner.train.snapshots.snapshot import _write_npy

    ours, numpys = io.BytesIO(), io.BytesIO()
    _write_npy(ours, value)
    np.save(numpys, value)

    assert ours.getvalue() == numpys.getvalue()
