"""Timing runner the way the speed benchmarks do: a real queue and worker, each epoch's end clocked."""

from __future__ import annotations

import io
import itertools
import time

import keras
from rich.console import Console

from runner.queue import Queue
from runner.spec import JobSpec
from runner.train import trainer as trainer_module
from runner.train.trainer import KerasTrainer
from runner.worker import Worker


class EpochClock(keras.callbacks.Callback):
    """When each epoch of a ``model.fit`` ended."""

    def __init__(self) -> None:
        super().__init__()
        self.ends: list[float] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.ends.append(time.perf_counter())


def steady(started: float, ends: list[float]) -> list[float]:
    """Each epoch's seconds, from the one before's end (the first from ``started``)."""
    marks = [started, *ends]
    return [b - a for a, b in itertools.pairwise(marks)]


def time_runner(spec: JobSpec, scratch) -> tuple[float, list[float]]:
    """Submit ``spec`` to a queue in ``scratch`` and run it with a real worker: seconds end to end, per epoch."""
    queue = Queue(scratch / "queue")
    queue.submit(spec)
    ends: list[float] = []
    end_epoch = trainer_module._Session._end_epoch

    def timed(self, state, seconds):
        end_epoch(self, state, seconds)
        ends.append(time.perf_counter())

    trainer_module._Session._end_epoch = timed
    try:
        worker = Worker(queue, lambda: KerasTrainer(cache_dir=scratch / "cache"), console=Console(file=io.StringIO()))
        started = time.perf_counter()
        result = worker.run()
        elapsed = time.perf_counter() - started
    finally:
        trainer_module._Session._end_epoch = end_epoch
    assert result.done == [spec.name], result
    return elapsed, steady(started, ends)
