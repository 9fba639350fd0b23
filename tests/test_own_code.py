"""``runner.fit``, ``runner.keras.Checkpointing`` and ``runner.data.image_folder`` in this process (runner.train):
what is refused (another model, another optimizer, a spec job's name, BackupAndRestore), a done job, the users'
own callbacks, the dataset's order, and how status and `runner work` treat such a job. The kill tests are in
tests/test_own_code_kills.py."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

import runner
import runner.data
import runner.keras
from runner.errors import UsageError
from runner.train.data.pipeline import epoch_order
from tests.conftest import run_cli, runner_env
from tests.support.keras_jobs import make_digit_folders, submit_keras_spec


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_digit_folders(tmp_path_factory.mktemp("digits"), classes=3, train_per_class=6, val_per_class=2)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's scratch and kept snapshots in its own cache: the job names repeat across parallel tests."""
    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def folder(digits: Path, tmp_path: Path) -> runner.data.ImageFolder:
    return runner.data.image_folder(
        digits,
        image_size=(8, 8),
        batch_size=4,
        validation="validation",
        label_mode="int",
        color_mode="grayscale",
        cache_dir=tmp_path / "cache",
    )


def _model(units: int = 3, optimizer: str = "adam") -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(units)])
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def test_a_done_job_gives_the_model_its_final_weights_and_the_whole_history(folder, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    trained = _model()
    first = runner.fit(trained, folder, epochs=2, job="mine", queue=queue, verbose=0)
    assert first.epoch == [0, 1] and len(first.history["loss"]) == 2
    fresh = _model()
    fresh.layers[-1].kernel.assign(np.zeros_like(fresh.layers[-1].kernel.numpy()))
    again = runner.fit(fresh, folder, epochs=2, job="mine", queue=queue, verbose=0)
    for mine, theirs in zip(fresh.weights, trained.weights, strict=True):
        assert np.array_equal(mine.numpy(), theirs.numpy())
    assert again.history["loss"] == first.history["loss"]
    assert fresh._initial_epoch is None  # a later plain fit starts at 0


class _Crash(keras.callbacks.Callback):
    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.model.optimizer.iterations.numpy() > 6:
            raise RuntimeError("the session died")


def test_a_failed_fit_lets_the_job_go_and_the_next_call_continues_it(folder, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    with pytest.raises(RuntimeError, match="the session died"):
        runner.fit(_model(), folder, epochs=3, job="mine", queue=queue, callbacks=[_Crash()], verbose=0)
    assert runner.status(queue=queue)[0]["state"] == "interrupted"
    runner.fit(_model(), folder, epochs=3, job="mine", queue=queue, verbose=0)
    (record,) = runner.status(queue=queue)
    assert (record["state"], record["epoch"], record["epochs"], record["trained_by"]) == ("done", 3, 3, "runner.fit")
    assert len((queue / "jobs" / "mine" / "history.csv").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    ("changed", "words"),
    [
        (lambda: _model(units=4), "variable 1 of its checkpoints is kernel (64, 3), the model's is kernel (64, 4)"),
        (lambda: _model(optimizer="sgd"), "its checkpoints hold a Adam optimizer, the model is compiled with SGD"),
    ],
)
def test_another_model_or_optimizer_is_refused_in_one_line_and_nothing_is_loaded(
    folder, tmp_path: Path, changed, words: str
) -> None:
    queue = tmp_path / "queue"
    runner.fit(_model(), folder, epochs=1, job="mine", queue=queue, verbose=0)
    (queue / "jobs" / "mine" / "state.json").write_text(
        json.dumps(json.loads((queue / "jobs" / "mine" / "state.json").read_text()) | {"status": "running"})
    )
    model = changed()
    before = [weight.numpy().copy() for weight in model.weights]
    with pytest.raises(UsageError) as raised:
        runner.fit(model, folder, epochs=2, job="mine", queue=queue, verbose=0)
    assert words in str(raised.value) and "\n" not in str(raised.value)
    assert "give the changed model a new job name" in str(raised.value)
    assert all(np.array_equal(weight.numpy(), old) for weight, old in zip(model.weights, before, strict=True))


def test_a_spec_jobs_name_is_refused(folder, digits: Path, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    submit_keras_spec(tmp_path, queue, digits, "taken", runner_env(RUNNER_CACHE=str(tmp_path / "cache")))
    with pytest.raises(UsageError, match="has a spec: `runner work` trains it, not your code"):
        runner.fit(_model(), folder, epochs=1, job="taken", queue=queue, verbose=0)


def test_backup_and_restore_beside_runner_is_refused(folder, tmp_path: Path) -> None:
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(UsageError, match="BackupAndRestore restores the model too"):
        runner.fit(_model(), folder, epochs=1, job="mine", queue=tmp_path / "q", callbacks=[backup], verbose=0)


class _Counter(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.epochs_seen = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epochs_seen += 1


class _KeptCounter(_Counter):
    def get_state(self) -> dict:
        return {"epochs_seen": self.epochs_seen}

    def set_state(self, state: dict) -> None:
        self.epochs_seen = state["epochs_seen"]


def test_a_custom_callbacks_state_is_kept_through_get_state_or_warned_about_once(
    folder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = tmp_path / "queue"
    with pytest.raises(RuntimeError):  # in epoch 2: one epoch is checkpointed
        runner.fit(
            _model(),
            folder,
            epochs=3,
            job="mine",
            queue=queue,
            callbacks=[_Counter(), _KeptCounter(), _Crash()],
            verbose=0,
        )
    kept, plain = _KeptCounter(), _Counter()
    runner.fit(_model(), folder, epochs=3, job="mine", queue=queue, callbacks=[plain, kept], verbose=0)
    assert kept.epochs_seen == 3  # 1 before the resume, given back, and 2 after
    assert plain.epochs_seen == 2
    err = capsys.readouterr().err
    assert err.count("callback _Counter keeps its state where runner cannot see it") == 1
    assert "_KeptCounter keeps" not in err


def test_the_callback_in_a_users_own_fit_resumes_at_the_epoch_of_its_checkpoint(folder, tmp_path: Path) -> None:
    queue = str(tmp_path / "queue")
    with pytest.raises(RuntimeError):  # in its second epoch
        _model().fit(
            folder.train, epochs=4, callbacks=[_Crash(), runner.keras.Checkpointing(job="own", queue=queue)], verbose=0
        )
    again = _model()
    history = again.fit(
        folder.train, epochs=4, callbacks=[runner.keras.Checkpointing(job="own", queue=queue)], verbose=0
    )
    assert history.epoch == [1, 2, 3]
    assert int(again.optimizer.iterations.numpy()) == 4 * folder.steps_per_epoch


def test_image_folders_epochs_come_in_the_order_of_seed_and_epoch(folder) -> None:
    def labels_of(dataset: object) -> list[int]:
        return [int(label) for _, labels in dataset for label in labels.numpy()]

    first, second = labels_of(folder.train), labels_of(folder.train)  # each iterator is the next epoch
    train_labels = np.repeat(np.arange(3), 6)  # the class folders' images, in order
    assert first == list(train_labels[epoch_order(0, 0, 18)])
    assert second == list(train_labels[epoch_order(0, 1, 18)])
    folder.position.set(5, 8)
    assert labels_of(folder.train) == list(train_labels[epoch_order(0, 5, 18)][8:])


def test_runner_work_leaves_a_job_of_own_code_and_says_why(folder, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    runner.fit(_model(), folder, epochs=1, job="mine", queue=queue, verbose=0)
    state = queue / "jobs" / "mine" / "state.json"
    state.write_text(json.dumps(json.loads(state.read_text()) | {"status": "running"}))
    env = runner_env()
    result = run_cli("work", "--queue", str(queue), "--job", "mine", env=env)
    assert result.returncode == 2 and "trained by the user's own code (runner.fit)" in result.stderr
    shown = run_cli("status", "--queue", str(queue), env=env)
    assert "run that code again (the same job name) to resume it" in " ".join(shown.stdout.split())
