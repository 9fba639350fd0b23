"""A trainer whose every run fails: stands in for a job that breaks, where a test needs one without TensorFlow."""

from __future__ import annotations

from runner.training import Outcome, RunContext


class FailingTrainer:
    """Fails every job it is given."""

    def train(self, context: RunContext) -> Outcome:
        raise RuntimeError(f"injected failure of {context.job.name!r}")
