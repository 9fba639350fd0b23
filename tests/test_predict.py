"""`runner predict` and `runner.predict`: a finished job's model on images prepared as the job's own were.

One real job (digits, real TensorFlow, a real `runner work`) is trained once for the module; its export is then
used as a user would, by a real `runner predict` process and from Python.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import runner
from runner.errors import NoExport
from runner.history import read_history
from tests.conftest import run_cli
from tests.support.keras_jobs import job_of, keras_env, make_digit_folders, submit_keras_spec

pytestmark = pytest.mark.slow

JOB = "digits-predict"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """A done job (queue, its data folder, the environment), trained by a real `runner work`."""
    folder = tmp_path_factory.mktemp("predict")
    data = make_digit_folders(folder / "digits", train_per_class=16, val_per_class=6)
    env = keras_env(folder / "cache")
    queue = folder / "queue"
    submit_keras_spec(folder, queue, data, JOB, env, training={"epochs": 2})
    worked = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    assert worked.returncode == 0, worked.stderr[-3000:]
    return queue, data, env


def test_the_export_describes_its_input_and_classes(finished: tuple[Path, Path, dict[str, str]]) -> None:
    queue, _, _ = finished
    description = json.loads((job_of(queue, JOB).paths.final / "model.json").read_text())

    assert description["classes"] == ["0", "1", "2"] and description["label_mode"] == "int"
    assert {key: description["input"][key] for key in ("height", "width", "channels", "color_mode")} == {
        "height": 16, "width": 16, "channels": 1, "color_mode": "grayscale",
    }  # fmt: skip
    assert "do not divide by 255" in description["input"]["pixels"]
    assert description["epochs"] == 2 and "val_accuracy" in description["metrics"]


def test_the_export_leaves_the_optimizer_to_the_checkpoints(finished: tuple[Path, Path, dict[str, str]]) -> None:
    """Adam's two slots per weight are two thirds of an export that keeps them; predictions need none of it. The
    file loads as an uncompiled model, with no warning about skipped optimizer variables."""
    import warnings  # noqa: PLC0415

    import h5py  # noqa: PLC0415
    import keras  # noqa: PLC0415 (TensorFlow in this test process only here)

    queue, _, _ = finished
    exported = job_of(queue, JOB).paths.final / "model.keras"
    with zipfile.ZipFile(exported) as archive:
        assert json.loads(archive.read("config.json"))["compile_config"] == {}
        with h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
            assert "optimizer" not in weights, list(weights)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        model = keras.models.load_model(exported)
    assert not model.compiled and [str(warning.message) for warning in said] == []
    assert json.loads((exported.parent / "model.json").read_text())["optimizer"] is False


def test_predictions_on_the_validation_folder_score_the_jobs_own_validation_accuracy(
    finished: tuple[Path, Path, dict[str, str]],
) -> None:
    """Same images, same decoding, same weights: the accuracy of `runner predict` is the job's last val_accuracy."""
    queue, data, env = finished
    result = run_cli("predict", JOB, str(data / "validation"), "--json", "--queue", str(queue), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = json.loads(result.stdout)

    assert len(predictions) == 18  # 6 per class, every image of the folder once
    for prediction in predictions:
        assert set(prediction["probabilities"]) == {"0", "1", "2"}
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert prediction["class"] == max(prediction["probabilities"], key=prediction["probabilities"].get)
    correct = sum(Path(p["image"]).parent.name == p["class"] for p in predictions)
    last = read_history(job_of(queue, JOB).paths.history)[-1]
    assert correct / len(predictions) == pytest.approx(float(last["val_accuracy"]), abs=1e-6)


def test_the_table_names_each_image_with_its_class(finished: tuple[Path, Path, dict[str, str]]) -> None:
    queue, data, env = finished
    image = sorted((data / "validation" / "1").iterdir())[0]
    result = run_cli("predict", JOB, str(image), "--queue", str(queue), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = result.stdout.splitlines()
    assert line.startswith(f"{image}: ") and "%" in line


def test_the_python_api_gives_the_same_records(
    finished: tuple[Path, Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue, data, env = finished
    monkeypatch.setenv("RUNNER_CACHE", env["RUNNER_CACHE"])
    images = sorted((data / "validation" / "2").iterdir())[:2]
    records = runner.predict(JOB, images, queue=queue)
    command = run_cli("predict", JOB, *map(str, images), "--json", "--queue", str(queue), env=env)

    assert [r["image"] for r in records] == [str(image) for image in images]
    assert records == json.loads(command.stdout)


def test_bad_input_is_one_line(finished: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    queue, _, env = finished
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    missing = run_cli("predict", JOB, str(tmp_path / "nowhere.png"), "--queue", str(queue), env=env)
    broken = run_cli("predict", JOB, str(not_an_image), "--queue", str(queue), env=env)
    no_job = run_cli("predict", "no-such-job", str(not_an_image), "--queue", str(queue), env=env)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.png").write_text("not a picture either")
    in_a_folder = run_cli("predict", JOB, str(folder), "--queue", str(queue), env=env)

    for result, code, said in (
        (missing, 2, f"no such image or folder: {tmp_path / 'nowhere.png'}"),
        (broken, 2, f"{not_an_image} is not a JPEG, PNG, GIF or BMP image (it begins with b'not '): pass image files"),
        (no_job, 2, "no job named 'no-such-job'"),
        (in_a_folder, 2, f"{folder / 'notes.png'} is not a JPEG, PNG, GIF or BMP image: pass image files"),
    ):
        assert result.returncode == code, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("error: ") and said in line, line
        assert result.stdout == ""


def test_the_best_epochs_export_is_used_when_there_is_one(finished: tuple[Path, Path, dict[str, str]]) -> None:
    """A ``final/best.keras`` beside ``model.keras`` answers by default, and says so; ``--last`` takes the last
    epoch's. The planted best model always says class "2", so either answer is told from the other."""
    import keras  # noqa: PLC0415 (TensorFlow in this test process only here)

    queue, data, env = finished
    final = job_of(queue, JOB).paths.final
    model = keras.models.load_model(final / "model.keras", compile=False)
    head = model.layers[-1]
    head.set_weights([np.zeros_like(head.get_weights()[0]), np.array([0.0, 0.0, 9.0], dtype="float32")])
    model.save(final / "best.keras")
    try:
        images = sorted((data / "validation" / "0").iterdir())[:3]
        best = run_cli("predict", JOB, *map(str, images), "--json", "--queue", str(queue), env=env)
        last = run_cli("predict", JOB, *map(str, images), "--json", "--last", "--queue", str(queue), env=env)
        from_python = runner.predict(JOB, images, queue=queue)
    finally:
        (final / "best.keras").unlink()

    assert best.returncode == 0 and last.returncode == 0, best.stderr[-3000:] + last.stderr[-3000:]
    assert [(p["class"], p["model"]) for p in json.loads(best.stdout)] == [("2", "best")] * 3
    assert best.stderr.strip() == "(the best epoch's model, final/best.keras; --last uses the last epoch's)"
    assert {p["model"] for p in json.loads(last.stdout)} == {"last"} and last.stderr == ""
    assert [p["class"] for p in json.loads(last.stdout)] != ["2"] * 3, "the trained model tells zeros from twos"
    assert from_python == json.loads(best.stdout)


def test_logits_are_told_from_probabilities_by_the_model_not_by_the_values() -> None:
    """A factory's model trained from_logits ends linear: its outputs are made into probabilities, whatever range
    a batch's values happen to fall in; a model ending in sigmoid or softmax is taken as it is."""
    import keras  # noqa: PLC0415 (TensorFlow in this test process only here)

    from runner.train.outputs.predict import _gives_logits, _probabilities  # noqa: PLC0415

    def ending(activation: str | None) -> keras.Model:
        inputs = keras.Input((2,))
        return keras.Model(inputs, keras.layers.Dense(1, activation=activation)(inputs))

    assert [_gives_logits(ending(a)) for a in ("sigmoid", "softmax", None)] == [False, False, True]
    in_range = np.array([[0.2], [0.9]])  # logits that look like probabilities
    as_logits = _probabilities(in_range, "binary", 2, logits=True)
    assert as_logits[:, 1] == pytest.approx(1 / (1 + np.exp(-in_range[:, 0])))
    assert _probabilities(in_range, "binary", 2, logits=False)[:, 1] == pytest.approx(in_range[:, 0])


def test_a_job_that_is_not_done_has_nothing_to_predict_with(tmp_path: Path) -> None:
    data = make_digit_folders(tmp_path / "digits")
    env = keras_env(tmp_path / "cache")
    submit_keras_spec(tmp_path, tmp_path / "queue", data, "waiting", env)
    result = run_cli("predict", "waiting", str(data / "validation"), "--queue", str(tmp_path / "queue"), env=env)

    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("error: job 'waiting' has no exported model to predict with (it is queued, 0 epochs done)")
    with pytest.raises(NoExport):
        runner.predict("waiting", data / "validation", queue=tmp_path / "queue")
