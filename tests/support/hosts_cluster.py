"""Workers that look like separate machines: each ``runner work`` runs in a UTS namespace of its own, with its
own hostname (``unshare --uts``), so the lease cannot use its "same host, dead pid" rule between them.

Used by tests/test_many_hosts.py. All hosts share the PID namespace and the file system of the test (as Colab
VMs share one Drive folder): a holder on another "host" is only ever taken over after the lease duration, while
a restarted worker on the same "host" takes over its own dead predecessor at once.

Every run's output (stdout and stderr together) goes to a file, never to a pipe, so a worker that nobody reads
never blocks; every run is reaped, so a killed worker is not left as a zombie that still answers ``kill(pid, 0)``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO


def uts_namespaces_work() -> bool:
    """Whether ``unshare --uts`` is permitted here and gives the child the hostname it sets."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None or shutil.which("hostname") is None:
        return False
    try:
        probe = subprocess.run(
            ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$1" -c "import socket; print(socket.gethostname())"',
             "probe-host", sys.executable],
            check=False, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0 and probe.stdout.strip() == "probe-host"


def host_of(worker: str | None) -> str:
    """The host part of a ``host:pid`` worker identity."""
    return (worker or "").rpartition(":")[0]


def pid_of(worker: str | None) -> int:
    """The pid part of a ``host:pid`` worker identity (-1 when unreadable)."""
    try:
        return int((worker or "").rpartition(":")[2])
    except ValueError:
        return -1


@dataclass
class Run:
    """One ``runner work`` process on one host."""

    host: str
    number: int
    process: subprocess.Popen[bytes]
    log: Path
    started_at: float
    ended_at: float | None = None
    returncode: int | None = None
    killed_at: float | None = None
    """Wall-clock time of the SIGKILL the supervisor sent, if it sent one."""
    stopped_at: list[float] = field(default_factory=list)
    continued_at: list[float] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The worker's pid: ``unshare`` and ``sh`` exec into Python, so it is the pid Popen saw."""
        return self.process.pid

    @property
    def identity(self) -> str:
        """``host:pid``, as the worker names itself in state.json and in its claimed events."""
        return f"{self.host}:{self.pid}"

    def output(self) -> str:
        """What the run printed so far (stdout and stderr)."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class Host:
    """A named "machine" that runs ``runner work`` on one queue, one process at a time."""

    def __init__(self, name: str, queue_root: Path, env: dict[str, str], logs: Path) -> None:
        self.name, self.queue_root, self.env, self.logs = name, Path(queue_root), env, Path(logs)
        self.runs: list[Run] = []
        self.logs.mkdir(parents=True, exist_ok=True)

    @property
    def current(self) -> Run | None:
        """The newest run, finished or not."""
        return self.runs[-1] if self.runs else None

    @property
    def running(self) -> bool:
        """Whether the newest run's process is still alive (reaping it if it has ended)."""
        run = self.current
        return run is not None and self._poll(run) is None

    def start(self, program: tuple[str, ...] = ("-m", "runner")) -> Run:
        """Start ``runner work`` as a new process in a new UTS namespace whose hostname is this host's name.

        ``program``: what Python runs, given ``work --queue QUEUE`` (a wrapper script and its own arguments).
        """
        assert not self.running, f"{self.name} already runs a worker"
        number = len(self.runs)
        log = self.logs / f"{self.name}-{number:02d}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                ["unshare", "--uts", "sh", "-c", f'hostname {self.name} && exec "$0" "$@"',
                 sys.executable, *program, "work", "--queue", str(self.queue_root)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, cwd=REPO, start_new_session=True,
            )  # fmt: skip
        run = Run(self.name, number, process, log, started_at=time.time())
        self.runs.append(run)
        return run

    def kill(self) -> Run:
        """SIGKILL the running worker (as a vanished VM) and reap it."""
        run = self.current
        assert run is not None and self._poll(run) is None, f"{self.name} runs no worker"
        run.killed_at = time.time()
        _signal_group(run, signal.SIGKILL)
        self.wait(timeout=30)
        return run

    def stop(self) -> float:
        """SIGSTOP the running worker (a frozen VM); returns when."""
        run = self.current
        assert run is not None and self._poll(run) is None, f"{self.name} runs no worker"
        _signal_group(run, signal.SIGSTOP)
        run.stopped_at.append(time.time())
        return run.stopped_at[-1]

    def frozen(self) -> bool:
        """Whether the running worker is stopped (by a signal it sent itself, say)."""
        run = self.current
        if run is None or self._poll(run) is not None:
            return False
        try:
            stat = Path(f"/proc/{run.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] in {"T", "t"}

    def cont(self) -> float:
        """SIGCONT the stopped worker; returns when."""
        run = self.current
        assert run is not None
        _signal_group(run, signal.SIGCONT)
        run.continued_at.append(time.time())
        return run.continued_at[-1]

    def wait(self, timeout: float) -> int:
        """Wait for the newest run to end; its exit status (negative: killed by that signal)."""
        run = self.current
        assert run is not None
        run.process.wait(timeout=timeout)
        self._poll(run)
        assert run.returncode is not None
        return run.returncode

    def cleanup(self) -> None:
        """Continue and then kill whatever still runs, and reap it. Safe to call more than once."""
        for run in self.runs:
            if run.process.poll() is None:
                for signum in (signal.SIGCONT, signal.SIGKILL):
                    _signal_group(run, signum)
                try:
                    run.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            self._poll(run)

    @staticmethod
    def _poll(run: Run) -> int | None:
        code = run.process.poll()
        if code is not None and run.returncode is None:
            run.returncode, run.ended_at = code, time.time()
        return code


def _signal_group(run: Run, signum: int) -> None:
    try:
        os.killpg(run.pid, signum)  # start_new_session: the group is the worker's own
    except ProcessLookupError:
        pass
