"""`runner plot`: learning curves drawn from real job folders (history.csv and events.jsonl written through the
runner API), real pictures read back, the CLI through real processes, and a real kill in the middle of a write.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest

from runner.curves import DPI, SUBPLOT_SIZE_IN, figure_for_job, figure_for_queue, plot_job, plot_queue
from runner.errors import JobNotFound, NoHistory, UsageError
from runner.history import write_history
from runner.job import Job
from runner.queue import Queue
from tests.conftest import REPO, make_spec, run_cli, runner_env
from tests.support.keras_jobs import keras_env, make_digit_folders, write_keras_spec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

LOSS = [1.0, 0.6, 0.45, 0.3, 0.25, 0.2, 0.15]
VAL_LOSS = [1.1, 0.7, 0.5, 0.32, 0.4, 0.45, 0.5]
"""Validation loss is lowest at the 4th epoch (0-based row 3), then overfits."""


def history_rows(losses: Sequence[float], val_losses: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Rows as the Keras trainer stores them: 0-based epoch, loss, accuracy, and the validation twins."""
    rows = []
    for epoch, loss in enumerate(losses):
        row: dict[str, Any] = {"epoch": epoch, "loss": loss, "accuracy": 1.0 - loss / 2}
        if val_losses is not None:
            row |= {"val_loss": val_losses[epoch], "val_accuracy": 1.0 - val_losses[epoch] / 2}
        rows.append(row)
    return rows


def make_job(queue: Queue, name: str, rows: list[dict[str, Any]] | None = None, resumes: Sequence[dict] = ()) -> Job:
    """A submitted job with ``rows`` in history.csv and one ``resumed`` event per item of ``resumes``."""
    job, _ = queue.submit(make_spec(name))
    if rows is not None:
        write_history(job.paths.history, rows)
    for fields in resumes:
        job.events.append("resumed", **fields)
    return job


def line_labels(axes: Any) -> list[str]:
    return [line.get_label() for line in axes.get_lines()]


def line_by_label(axes: Any, label: str) -> Any:
    (line,) = [line for line in axes.get_lines() if line.get_label() == label]
    return line


def texts_of(axes: Any) -> dict[str, float]:
    """Each text drawn on the axes, with its x position."""
    return {text.get_text(): text.get_position()[0] for text in axes.texts}


# --- one job --------------------------------------------------------------------------------------------------


def test_a_job_png_is_a_whole_picture_with_a_subplot_for_the_loss_and_each_metric(queue: Queue, tmp_path: Path) -> None:
    make_job(queue, "job-a", history_rows(LOSS, VAL_LOSS))

    written = plot_job(queue, "job-a", tmp_path / "job-a.png")

    assert written == tmp_path / "job-a.png"
    assert written.read_bytes().startswith(PNG_SIGNATURE)
    pixels = matplotlib.image.imread(written)
    width, height = SUBPLOT_SIZE_IN
    assert pixels.shape[:2] == (round(height * DPI), round(2 * width * DPI))  # two subplots side by side
    figure = figure_for_job(queue, "job-a")
    assert [axes.get_title() for axes in figure.axes] == ["loss", "accuracy"]
    loss_axes, accuracy_axes = figure.axes
    assert line_labels(accuracy_axes) == ["train", "validation"]
    assert [entry.get_text() for entry in loss_axes.get_legend().get_texts()] == [
        "train",
        "validation",
        "best: epoch 4 (val_loss 0.32)",
    ]


def test_curves_are_drawn_against_epochs_counted_from_1(queue: Queue) -> None:
    make_job(queue, "job-a", history_rows(LOSS, VAL_LOSS))

    loss_axes, accuracy_axes = figure_for_job(queue, "job-a").axes

    train, validation = line_by_label(loss_axes, "train"), line_by_label(loss_axes, "validation")
    assert list(train.get_xdata()) == [1, 2, 3, 4, 5, 6, 7]
    assert list(train.get_ydata()) == LOSS
    assert list(validation.get_ydata()) == VAL_LOSS
    assert list(line_by_label(accuracy_axes, "validation").get_ydata()) == [1.0 - v / 2 for v in VAL_LOSS]


def test_each_resume_is_a_dashed_line_at_its_place_labelled_with_its_restart_number(queue: Queue) -> None:
    resumes = [
        # 3 epochs done, step 0: right on the 3rd point, before the 4th epoch's.
        {"generation": 2, "checkpoint": "g2-e3-s0", "epoch": 3, "step": 0, "steps_per_epoch": 10},
        # 4 epochs done and 5 of 10 batches of the 5th: halfway between the points at 4 and 5.
        {"generation": 3, "checkpoint": "g3-e4-s5", "epoch": 4, "step": 5, "steps_per_epoch": 10},
        # An older folder without steps_per_epoch: the start of the interrupted epoch.
        {"generation": 4, "checkpoint": "g4-e5-s2", "epoch": 5, "step": 2},
    ]
    make_job(queue, "job-a", history_rows(LOSS, VAL_LOSS), resumes)

    figure = figure_for_job(queue, "job-a")

    expected = {"restart 1": 3.0, "restart 2": 4.5, "restart 3": 5.0}
    assert len(figure.axes) == 2
    for axes in figure.axes:  # every subplot shows the restarts
        for label, x in expected.items():
            line = line_by_label(axes, label)
            assert list(line.get_xdata()) == [x, x]
            assert line.get_linestyle() == "--"
        assert texts_of(axes) == expected
        assert not any(text.get_text().startswith("restart") for text in axes.get_legend().get_texts())
    assert figure.get_suptitle() == "job-a: 7 epochs, 3 restarts"


def test_resumes_from_one_checkpoint_share_one_place_and_one_text(queue: Queue) -> None:
    same = {"checkpoint": "g2-e2-s0", "epoch": 2, "step": 0, "steps_per_epoch": 4}
    make_job(queue, "job-a", history_rows(LOSS), [{**same, "generation": 2}, {**same, "generation": 3}])

    loss_axes = figure_for_job(queue, "job-a").axes[0]

    assert [list(line_by_label(loss_axes, f"restart {n}").get_xdata()) for n in (1, 2)] == [[2.0, 2.0]] * 2
    assert texts_of(loss_axes) == {"restart 1, 2": 2.0}


def test_the_best_epoch_is_the_lowest_validation_loss(queue: Queue) -> None:
    make_job(queue, "job-a", history_rows(LOSS, VAL_LOSS))

    loss_axes, accuracy_axes = figure_for_job(queue, "job-a").axes

    best = line_by_label(loss_axes, "best: epoch 4 (val_loss 0.32)")
    assert (list(best.get_xdata()), list(best.get_ydata())) == ([4], [0.32])
    assert not any(label.startswith("best") for label in line_labels(accuracy_axes))


def test_without_validation_the_best_epoch_is_the_lowest_training_loss(queue: Queue) -> None:
    losses = [0.9, 0.5, 0.4, 0.45]
    make_job(queue, "job-a", history_rows(losses))

    loss_axes, _ = figure_for_job(queue, "job-a").axes

    assert line_labels(loss_axes) == ["train", "best: epoch 3 (loss 0.4)"]
    best = line_by_label(loss_axes, "best: epoch 3 (loss 0.4)")
    assert (list(best.get_xdata()), list(best.get_ydata())) == ([3], [0.4])


def test_a_job_before_its_first_epoch_has_nothing_to_plot(queue: Queue, tmp_path: Path) -> None:
    make_job(queue, "fresh")
    make_job(queue, "header-only", [])  # written at a restore before any epoch completed: a header, no rows
    make_job(queue, "no-numbers", [{"epoch": 0, "loss": None}])

    for name in ("fresh", "header-only", "no-numbers"):
        with pytest.raises(NoHistory, match=f"job '{name}' has no completed epoch yet: run `runner work`"):
            plot_job(queue, name, tmp_path / "out.png")
    with pytest.raises(JobNotFound):
        plot_job(queue, "nope", tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


# --- the whole queue ------------------------------------------------------------------------------------------


def test_the_queue_figure_has_one_colour_per_job_with_history_and_names_the_others(queue: Queue) -> None:
    make_job(queue, "job-a", history_rows(LOSS, VAL_LOSS))
    make_job(queue, "job-b", history_rows([2.0, 1.0, 0.5]))  # no validation
    make_job(queue, "job-c")  # no history yet

    figure = figure_for_queue(queue)

    loss_axes, accuracy_axes = figure.axes
    assert loss_axes.get_title().startswith("loss") and accuracy_axes.get_title().startswith("accuracy")
    for axes in figure.axes:
        assert line_labels(axes) == ["job-a", "job-a val", "job-b"]
        assert line_by_label(axes, "job-a val").get_linestyle() == "--"
        assert line_by_label(axes, "job-a").get_linestyle() == "-"
        assert line_by_label(axes, "job-a").get_color() == line_by_label(axes, "job-a val").get_color()
        assert line_by_label(axes, "job-a").get_color() != line_by_label(axes, "job-b").get_color()
        assert [entry.get_text() for entry in axes.get_legend().get_texts()] == ["job-a", "job-b"]
    assert list(line_by_label(loss_axes, "job-b").get_xdata()) == [1, 2, 3]
    assert any(text.get_text() == "no history yet: job-c" for text in figure.texts)


def test_the_queue_figure_compares_only_the_loss_when_no_metric_is_shared(queue: Queue) -> None:
    make_job(queue, "job-a", history_rows(LOSS))
    make_job(queue, "job-b", [{"epoch": 0, "loss": 0.7, "auc": 0.6}, {"epoch": 1, "loss": 0.5, "auc": 0.8}])

    figure = figure_for_queue(queue)

    assert [axes.get_title().split()[0] for axes in figure.axes] == ["loss"]
    assert line_labels(figure.axes[0]) == ["job-a", "job-b"]
    assert not figure.texts or all("no history" not in text.get_text() for text in figure.texts)


def test_a_queue_with_no_history_at_all_is_one_line_saying_what_to_do(queue: Queue, tmp_path: Path) -> None:
    with pytest.raises(NoHistory, match="no job in queue .* has a completed epoch yet: submit a job and run"):
        plot_queue(queue, tmp_path / "queue.png")  # no jobs at all
    make_job(queue, "job-a")
    with pytest.raises(NoHistory) as raised:
        plot_queue(queue, tmp_path / "queue.png")
    assert "\n" not in str(raised.value) and raised.value.exit_code == 1
    assert not (tmp_path / "queue.png").exists()


# --- output ---------------------------------------------------------------------------------------------------


def test_the_default_output_is_the_job_name_or_queue_png_in_the_current_folder(
    queue: Queue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_job(queue, "job-a", history_rows(LOSS))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)

    assert plot_job(queue, "job-a") == here / "job-a.png"
    assert plot_queue(queue) == here / "queue.png"
    assert sorted(os.listdir(here)) == ["job-a.png", "queue.png"]  # no temporary file left behind


@pytest.mark.parametrize(("suffix", "signature"), [(".pdf", b"%PDF"), (".svg", b"<?xml"), (".PNG", PNG_SIGNATURE)])
def test_the_format_follows_the_suffix_and_missing_folders_are_created(
    queue: Queue, tmp_path: Path, suffix: str, signature: bytes
) -> None:
    make_job(queue, "job-a", history_rows(LOSS, VAL_LOSS))
    target = tmp_path / "new" / "deeper" / f"curves{suffix}"

    written = plot_job(queue, "job-a", target)

    assert written == target and target.read_bytes().startswith(signature)
    if suffix == ".svg":
        assert b"<svg" in target.read_bytes()


@pytest.mark.parametrize("name", ["curves.jpeg", "curves", "curves.png.txt"])
def test_an_unknown_suffix_is_refused_before_anything_is_read_or_written(
    queue: Queue, tmp_path: Path, name: str
) -> None:
    with pytest.raises(UsageError, match="unknown picture format .*; name the file .png, .pdf or .svg") as raised:
        plot_job(queue, "not-even-a-job", tmp_path / "out" / name)  # the suffix is checked first
    assert "\n" not in str(raised.value)
    with pytest.raises(UsageError):
        plot_queue(queue, tmp_path / "out" / name)
    assert not (tmp_path / "out").exists()


# A kill in the middle of a write, for real: the file-size limit makes the kernel send SIGXFSZ (default action:
# terminate) as soon as a write would pass `LIMIT` bytes. Python ignores SIGXFSZ at start-up; the probe restores
# the default, so the write is killed, not failed with an error.
KILL_PROBE = """
import resource, signal, sys
from pathlib import Path
from runner.curves import figure_for_job, save_figure
from runner.queue import Queue

queue, target, limit, how = Queue(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
figure = figure_for_job(queue, "job-a")
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if how == "runner":
    save_figure(figure, target)
else:
    figure.savefig(target, format="png")  # the naive way: straight into the target
print("not killed")
"""
LIMIT = 4096


def _write_killed(queue: Queue, target: Path, how: str) -> subprocess.CompletedProcess[str]:
    env = runner_env(PYTHONDONTWRITEBYTECODE="1")  # so that no cache file written on import meets the limit
    return subprocess.run(
        [sys.executable, "-c", KILL_PROBE, str(queue.root), str(target), str(LIMIT), how],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE and SIGXFSZ (POSIX)")
def test_a_kill_in_the_middle_of_writing_leaves_the_previous_picture_whole(queue: Queue, tmp_path: Path) -> None:
    job = make_job(queue, "job-a", history_rows(LOSS[:2]))
    target = tmp_path / "pictures" / "job-a.png"
    plot_job(queue, "job-a", target)
    before = target.read_bytes()
    assert len(before) > LIMIT
    write_history(job.paths.history, history_rows(LOSS, VAL_LOSS))  # the next picture differs

    killed = _write_killed(queue, target, "runner")

    assert killed.returncode == -signal.SIGXFSZ, killed.stdout + killed.stderr
    assert target.read_bytes() == before
    assert matplotlib.image.imread(target).shape[0] > 0
    # The kill did land in the middle of the write: of the temporary file beside the target, never the target.
    leftovers = [path for path in target.parent.iterdir() if path != target]
    assert [path.name.startswith(".tmp-job-a.png-") for path in leftovers] == [True]
    assert leftovers[0].stat().st_size == LIMIT

    # The same kill against a plain savefig leaves half a PNG at the target: the probe does reach the write.
    naive = _write_killed(queue, target, "naive")
    assert naive.returncode == -signal.SIGXFSZ, naive.stdout + naive.stderr
    assert target.stat().st_size == LIMIT


# --- the command ----------------------------------------------------------------------------------------------


def _error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_runner_plot_writes_the_picture_and_prints_its_path(queue: Queue, tmp_path: Path) -> None:
    make_job(queue, "job-a", history_rows(LOSS, VAL_LOSS))
    make_job(queue, "job-b", history_rows([0.8, 0.4]))
    one, every = tmp_path / "out" / "job-a.png", tmp_path / "out" / "all.pdf"

    job = run_cli("plot", "job-a", "--queue", str(queue.root), "--output", str(one))
    both = run_cli("plot", "--queue", str(queue.root), "-o", str(every))

    assert (job.returncode, _error_lines(job)) == (0, [f"wrote {one}"]), job.stderr
    assert (both.returncode, _error_lines(both)) == (0, [f"wrote {every}"]), both.stderr
    assert one.read_bytes().startswith(PNG_SIGNATURE) and every.read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["plot", "nope"], 2, "error: no job named 'nope' in queue "),
        (["plot", "fresh"], 1, "error: job 'fresh' has no completed epoch yet: run `runner work`"),
        (["plot", "job-a", "--output", "curves.gif"], 2, "error: cannot write "),
    ],
    ids=["unknown-job", "no-epoch-yet", "unknown-suffix"],
)
def test_runner_plot_errors_are_one_line_and_an_exit_code(
    queue: Queue, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    make_job(queue, "job-a", history_rows(LOSS))
    make_job(queue, "fresh")

    result = run_cli(*args, "--queue", str(queue.root))

    lines = _error_lines(result)
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(REPO.glob("*.gif")) and not (REPO / "nope.png").exists()


def test_runner_plot_of_an_empty_queue_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("plot", "--queue", str(tmp_path / "empty"), "--output", str(tmp_path / "queue.png"))

    assert result.returncode == 1
    expected = (
        f"error: no job in queue {tmp_path / 'empty'} has a completed epoch yet: "
        "submit a job and run `runner work`, then plot"
    )
    assert _error_lines(result) == [expected]
    assert not (tmp_path / "queue.png").exists()


def test_nan_cells_do_not_break_a_plot(queue: Queue, tmp_path: Path) -> None:
    """A metric missing from some epochs (a column added later) is a gap, not an error."""
    rows = history_rows(LOSS[:3])
    rows[0].pop("accuracy")
    make_job(queue, "job-a", rows)

    _, accuracy_axes = figure_for_job(queue, "job-a").axes

    values = list(line_by_label(accuracy_axes, "train").get_ydata())
    assert math.isnan(values[0]) and values[1:] == [1.0 - LOSS[1] / 2, 1.0 - LOSS[2] / 2]
    assert plot_job(queue, "job-a", tmp_path / "gap.png").read_bytes().startswith(PNG_SIGNATURE)


# --- a real Keras job ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_keras_job_stopped_and_resumed_plots_its_curves_and_its_restart(tmp_path: Path) -> None:
    env, queue_dir = keras_env(tmp_path / "cache"), tmp_path / "queue"
    data = make_digit_folders(tmp_path / "digits", classes=2, train_per_class=8, val_per_class=2)
    epochs = 30  # about 0.1 s each here: seconds of margin for the SIGTERM to land before the end
    spec = write_keras_spec(tmp_path, "digits", data, training={"epochs": epochs})
    assert run_cli("submit", str(spec), "--queue", str(queue_dir), env=env).returncode == 0
    queue = Queue(queue_dir)
    job = queue.job("digits")

    # A session stopped by SIGTERM after its first checkpoint saves one more; the next one resumes from it.
    worker = subprocess.Popen(
        [sys.executable, "-m", "runner", "work", "--queue", str(queue_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        while worker.poll() is None and job.read_state().checkpoint is None:
            assert time.monotonic() < deadline, "no checkpoint was published"
            time.sleep(0.05)
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    finished = run_cli("work", "--queue", str(queue_dir), env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]

    figure = figure_for_job(queue, "digits")

    assert [axes.get_title() for axes in figure.axes] == ["loss", "accuracy"]
    loss_axes = figure.axes[0]
    assert list(line_by_label(loss_axes, "validation").get_xdata()) == list(range(1, epochs + 1))
    resumed = [event for event in job.events.read() if event["event"] == "resumed"]
    assert len(resumed) == 1, json.dumps(resumed)
    event = resumed[0]
    x = event["epoch"] + event["step"] / event["steps_per_epoch"]
    assert list(line_by_label(loss_axes, "restart 1").get_xdata()) == [x, x]
    assert texts_of(loss_axes) == {"restart 1": x}
    assert any(label.startswith("best: epoch ") for label in line_labels(loss_axes))
    written = run_cli("plot", "digits", "--queue", str(queue_dir), "--output", str(tmp_path / "digits.svg"))
    assert written.returncode == 0 and (tmp_path / "digits.svg").read_bytes().startswith(b"<?xml")


# --- the notebook API ------------------------------------------------------------------------------------------


def test_runner_plot_in_a_notebook_is_a_png_picture_and_can_be_called_again(queue: Queue, tmp_path: Path) -> None:
    # runner.plot is a function; a module of the same name would replace it on the package after the first call.
    import runner

    make_job(queue, "job-a", history_rows(LOSS, VAL_LOSS))
    make_job(queue, "job-b", history_rows(LOSS[:3]))

    first = runner.plot("job-a", queue=queue.root)
    again = runner.plot(queue=queue.root)

    assert callable(runner.plot)
    assert first._repr_png_().startswith(PNG_SIGNATURE)
    assert len(first.figure.axes) == 2 and len(again.figure.axes) >= 1
    saved = first.save(tmp_path / "curves.svg")
    assert saved.read_text().lstrip().startswith("<?xml")


def test_a_moving_learning_rate_gets_its_own_subplot_and_an_early_stop_its_line(queue: Queue) -> None:
    rows = history_rows(LOSS, VAL_LOSS)
    rates = [0.001, 0.002, 0.002, 0.001, 0.0005, 0.0005, 0.00025]
    for row, rate in zip(rows, rates, strict=True):
        row["lr"] = rate
    job = make_job(queue, "job-a", rows)
    job.events.append("lr-reduced", epoch=4, monitor="val_loss", lr=0.0005, scale=0.5)
    job.events.append("early-stopped", epoch=7, monitor="val_loss", best=0.32, best_epoch=4, patience=3)

    figure = figure_for_job(queue, "job-a")

    loss_axes, accuracy_axes, rate_axes = figure.axes
    assert rate_axes.get_title() == "learning rate" and rate_axes.get_yscale() == "log"
    assert list(line_by_label(rate_axes, "rate of the epoch's last step").get_ydata()) == rates
    assert "lr" not in [axes.get_title() for axes in figure.axes[:2]], "the rate is not drawn as a metric"
    dotted = [line for line in rate_axes.get_lines() if line.get_linestyle() == ":" and len(line.get_xdata())]
    assert [list(line.get_xdata()) for line in dotted] == [[4, 4]]
    for axes in figure.axes:
        assert list(line_by_label(axes, "stopped early after epoch 7").get_xdata()) == [7, 7]
    assert figure.get_suptitle() == "job-a: 7 epochs, stopped early"


def test_a_constant_learning_rate_is_not_drawn(queue: Queue) -> None:
    rows = history_rows(LOSS, VAL_LOSS)
    for row in rows:
        row["lr"] = 0.001
    make_job(queue, "job-a", rows)

    assert [axes.get_title() for axes in figure_for_job(queue, "job-a").axes] == ["loss", "accuracy"]


def test_the_start_of_fine_tuning_is_a_line_between_its_epochs_on_every_subplot(queue: Queue) -> None:
    rows = history_rows(LOSS, VAL_LOSS)
    for row, rate in zip(rows, [0.001] * 3 + [0.0001] * 4, strict=True):
        row["lr"] = rate
    job = make_job(queue, "job-a", rows)
    fields = {"epoch": 4, "layers": 36, "learning_rate": 0.0001}
    job.events.append("fine-tuning", **fields)
    job.events.append("fine-tuning", **fields)  # a session killed after the switch switched again: one mark

    figure = figure_for_job(queue, "job-a")

    assert len(figure.axes) == 3
    for axes in figure.axes:
        marks = [line for line in axes.get_lines() if line.get_label() == "fine-tuning from epoch 4"]
        assert [list(line.get_xdata()) for line in marks] == [[3.5, 3.5]], "not between epochs 3 and 4, once"
    assert figure.get_suptitle() == "job-a: 7 epochs, fine-tuned from epoch 4"
