"""The epoch progress display: how often it speaks where nothing can be redrawn, and what its line says.

The notebook display is exercised for real by tests/test_notebook.py (a Jupyter kernel running the quick-start).
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

pytest.importorskip("tensorflow")  # runner.train imports it

from runner.train.outputs import progress as progress_module  # noqa: E402
from runner.train.outputs.progress import EpochProgress, display_mode, progress_line  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, force_jupyter=False, width=200), out


def test_a_log_file_gets_a_line_at_most_every_interval_not_one_per_step() -> None:
    console, out = plain_console()
    clock = Clock()
    display = EpochProgress(console, job="digits", epochs=10, mode="plain", clock=clock)
    display.start(2, total=1000, completed=0)
    for _ in range(1000):  # 1,000 steps of 0.1 s: 100 s in all
        clock.now += 0.1
        display.advance(1, lambda: {"loss": 0.5})
    display.stop()
    lines = out.getvalue().splitlines()
    expected = int(100 // progress_module.PLAIN_PROGRESS_INTERVAL_S)
    assert len(lines) == expected
    assert lines[0].startswith("digits epoch 3/10 ")
    assert "loss=0.5000" in lines[0] and "10.0 it/s" in lines[0]


def test_a_short_epoch_prints_only_its_summary() -> None:
    console, out = plain_console()
    clock = Clock()
    display = EpochProgress(console, job="digits", epochs=2, mode="plain", clock=clock)
    display.start(0, total=20, completed=0)
    for _ in range(20):
        clock.now += 0.1
        display.advance(1, lambda: {"loss": 0.25})
    display.stop()
    display.summary(0, {"loss": 0.25, "accuracy": 0.9}, 2.0)
    assert out.getvalue().splitlines() == ["digits epoch 1/2 loss=0.2500 accuracy=0.9000 (2.0s)"]


@pytest.mark.parametrize("mode", ["terminal", "notebook", "plain"])
def test_the_live_metrics_are_read_from_the_device_at_most_once_a_second(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    console = Console(file=io.StringIO(), force_terminal=mode == "terminal", force_jupyter=False, width=200)
    shown: list[str] = []
    monkeypatch.setattr(EpochProgress, "_show_in_notebook", lambda self, line: shown.append(line))
    clock = Clock()
    reads = 0

    def read_metrics() -> dict[str, float]:
        nonlocal reads
        reads += 1
        return {"loss": 0.5}

    display = EpochProgress(console, job="digits", epochs=1, mode=mode, clock=clock)
    display.start(0, total=4000, completed=0)
    for _ in range(1000):  # 1,000 calls of 4 steps, 0.02 s each: 20 s in all
        clock.now += 0.02
        display.advance(4, read_metrics)
    display.stop()
    assert reads <= 20
    if mode != "plain":
        assert reads >= 19  # and the display does show them that often
    assert display._completed == 4000


def test_the_line_counts_steps_from_the_resume_point_and_estimates_what_is_left() -> None:
    line = progress_line("job epoch 2/5", completed=30, total=40, rate=5.0, metrics={"loss": 1.0}, bar=True)
    assert "30/40" in line
    assert "eta 0:00:02" in line  # 10 steps at 5 per second
    assert "[" + "#" * 18 + "-" * 6 + "]" in line


def test_output_that_cannot_redraw_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    piped = Console(file=io.StringIO(), force_terminal=False, force_jupyter=False)
    terminal = Console(file=io.StringIO(), force_terminal=True, force_jupyter=False)
    assert display_mode(piped) == "plain"
    assert display_mode(terminal) == "terminal"
    # Colab's `!runner work` cell shows a terminal that does not redraw in place.
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    assert display_mode(terminal) == "plain"
