"""``runner work`` that freezes itself (SIGSTOP) once, inside a fenced state write: a VM frozen at that instant.

usage: hosts_freeze.py N RUNNER-ARGS...   -- run by tests/test_many_hosts.py (inside ``unshare --uts``).

Queue.claim, Claim.update and Claim.finish replace state.json with generation=None right after their checks. A Colab VM can freeze
between any two instructions; this one freezes between those two, at its N-th such write (each checkpoint's
``record_checkpoint`` makes one), so that the test can let another host take the job over and then resume it.
Nothing else is changed: the write itself, once resumed, is the runner's own.
"""

from __future__ import annotations

import os
import signal
import sys

from runner import job as job_module
from runner.cli import main


def freeze_at(writes: int) -> None:
    """Patch Job.write_state so that the process stops itself right before its ``writes``-th fenced write."""
    original = job_module.Job.write_state
    seen = 0

    def write_state(self: job_module.Job, state: job_module.JobState, *, generation: int | None) -> None:
        nonlocal seen
        if generation is None:  # the caller (Claim.update / Claim.finish) has just checked the generation
            seen += 1
            if seen == writes:
                os.kill(os.getpid(), signal.SIGSTOP)
        original(self, state, generation=generation)

    job_module.Job.write_state = write_state  # type: ignore[method-assign]


if __name__ == "__main__":
    freeze_at(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
