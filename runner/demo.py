"""``runner demo``: train the bundled digits job, kill the worker mid-training, and watch it resume.

It does what a Colab disconnect does to a notebook, on real data, in under two minutes on a laptop CPU: a
worker process is killed with SIGKILL (no warning, no cleanup), and a new ``runner work`` continues from the
newest checkpoint at the right epoch and step.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from runner.console import render_status
from runner.history import read_history
from runner.job import JobStatus
from runner.queue import Queue
from runner.spec import JobSpec, load_spec
from runner.words import counted

KILL_AFTER_EPOCHS = 3
"""The worker is killed once this many epochs are done and a checkpoint past them is committed."""

_POLL_S = 0.25


def demo_spec() -> JobSpec:
    """The bundled digits job, with its archive path resolved inside the installed package."""
    with resources.as_file(resources.files("runner") / "datasets" / "digits.yaml") as path:
        return load_spec(path)


def run_demo(queue_dir: Path | None, console: Console) -> int:
    """The whole demo; returns the exit code of the final ``runner work``, non-zero unless the job ended done."""
    root = queue_dir or Path(tempfile.mkdtemp(prefix="runner-demo-"))
    queue = Queue(root)
    spec = demo_spec()
    job, _ = queue.submit(spec)
    console.print(Rule("runner demo"))
    console.print(f"queue: {root}\njob:   {spec.name} ({spec.training.epochs} epochs of handwritten digits)\n")

    console.print(Rule("session 1"))
    worker = _start_worker(root)
    killed_at = _kill_after_checkpoint(queue, spec.name, worker)
    if killed_at is None:
        console.print("the first session ended before the simulated disconnect; nothing to resume")
    else:
        console.print(
            f"\n[bold red]simulating a Colab disconnect:[/] SIGKILL to the worker (pid {worker.pid}) "
            f"with {counted(killed_at[0], 'epoch')} done, at step {killed_at[1]} of epoch {killed_at[0] + 1}\n"
        )
        console.print(render_status(queue, width=console.width))

    console.print(Rule("session 2: the same one line, `runner work`"))
    code = subprocess.call([sys.executable, "-m", "runner", "work", "--queue", str(root)])
    history = read_history(job.paths.history)
    if history and "val_accuracy" in history[-1]:
        accuracy = float(history[-1]["val_accuracy"])
        console.print(f"\n[bold]validation accuracy after {counted(len(history), 'epoch')}: {accuracy:.1%}[/]")
    console.print(f"events of the job: {job.paths.events}")
    status = job.read_state().status
    if status is not JobStatus.DONE:
        console.print(
            f"[bold red]the demo job ended {status.value}, not done[/]: see `runner logs {spec.name} --queue {root}`"
        )
        return code or 1
    return code


def _start_worker(root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "runner", "work", "--queue", str(root)])


def _kill_after_checkpoint(queue: Queue, name: str, worker: subprocess.Popen[bytes]) -> tuple[int, int] | None:
    """SIGKILL the worker once a checkpoint past epoch KILL_AFTER_EPOCHS is committed; (epoch, step) of the newest.

    Driven by what the job folder shows, not by a delay: the first checkpoint past that epoch, mid-epoch where an
    epoch outlasts the job's mid-epoch cadence (0.6 s), else at the next epoch's end. The worker goes on training
    while it is signalled, as a session does when Colab drops it."""
    job = queue.job(name)
    while worker.poll() is None:
        state = job.read_state()
        if (state.epoch, state.step) > (KILL_AFTER_EPOCHS, 0):
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            state = job.read_state()
            return state.epoch, state.step
        time.sleep(_POLL_S)
    return None
