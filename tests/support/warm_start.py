"""Warm starts: each TensorFlow session of the suite a real process of its own, without its five-second import.

A `runner work` that trains the tests' tiny jobs spends most of its life importing TensorFlow and Keras (about
5 of 7 seconds on two cores), and the suite starts some 150 of them: on two cores that import alone was a third
of the suite's time. A warm starter is a process that has imported Keras (and with it TensorFlow, or JAX) and
nothing of runner. For each session it forks a child, which becomes a process group of its own, takes the
session's pipes, environment, working directory and arguments, and runs ``python -m <module>`` as the interpreter
does: Python's own top level prints an uncaught exception and exits 1, joins threads and runs ``atexit``
handlers. So the session is a real process still: the test reads its output, SIGKILLs its group and sees it die
of SIGKILL, as with :class:`subprocess.Popen`. runner is imported in the child, so all it reads from the
environment when imported (kill points, the quiet window, the trainer) comes from the session's environment.

What a child shares is what the starter imported, under the starter's environment. So a starter serves only
sessions whose environment equals its own but for variables that runner alone reads (``RUNNER_*``) and pytest's
bookkeeping; it imports Keras as ``runner.train`` does (``TF_CPP_MIN_LOG_LEVEL`` defaulting to 2, file
descriptor 2 silenced); and sessions that change how TensorFlow starts run cold, in a new interpreter: those that
ask for its start-up messages (``--verbose``, ``$RUNNER_TF_VERBOSE``), split the CPU (``$RUNNER_LOGICAL_CPUS``,
which sets oneDNN's switch before TensorFlow is imported), or use the counting trainer (no TensorFlow to save).
A child reseeds Python's and NumPy's global generators, as a new interpreter would; the hash seed is the
starter's, which is why the uninterrupted runs the kill tests compare with start cold. ``TESTS_COLD_START=1``
turns warm starts off (CI's Colab leg runs so); the demo, the notebook and the start-up chatter tests always
start cold.
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

COLD_START_ENV = "TESTS_COLD_START"
"""Set to 1 in the suite's environment to start every session in a new interpreter, or in a session's to start
that one so (the start-up chatter tests, the uninterrupted runs that the kill tests compare with)."""

WARM_MODULES = {"runner": ("work", "predict"), "tests.support.own_code_job": (), "tests.support.colab_cli": ()}
"""The modules a warm starter runs (with, for runner, the commands that load the trainer)."""

MAX_STARTERS = 3
"""Starters kept per test process (each holds TensorFlow in memory); the least recently used goes first."""

_OWN_VARIABLES = ("PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_TESTRUNUID", "PYTEST_XDIST_WORKER_COUNT")


def warm_startable(args: tuple[str, ...], env: dict[str, str]) -> bool:
    """Whether ``python ARGS`` under ``env`` may start warm (see the module's docstring)."""
    cold = "1" in (os.environ.get(COLD_START_ENV), env.get(COLD_START_ENV))
    if cold or len(args) < 2 or args[0] != "-m" or args[1] not in WARM_MODULES:
        return False
    commands = WARM_MODULES[args[1]]
    if commands and (len(args) < 3 or args[2] not in commands):
        return False
    if "--verbose" in args or env.get("RUNNER_TF_VERBOSE") or env.get("RUNNER_TRAINER"):
        return False
    return env.get("RUNNER_LOGICAL_CPUS", "").strip() in ("", "1")


def _starter_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("RUNNER_") and k not in _OWN_VARIABLES}


class WarmProcess:
    """A forked session, with the parts of :class:`subprocess.Popen` the tests use."""

    def __init__(self, args: list[str], pid: int, status: socket.socket, stdout: int, stderr: int) -> None:
        self.args, self.pid, self.returncode = args, pid, None
        self.stdin = None
        encoding = locale.getpreferredencoding(False)
        self.stdout, self.stderr = open(stdout, encoding=encoding), open(stderr, encoding=encoding)  # noqa: SIM115
        """As text-mode pipes: for a test that closes them or reads lines (then not :meth:`communicate` too)."""
        self._status = status
        self._read: dict[Any, bytearray] = {self.stdout: bytearray(), self.stderr: bytearray()}

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._status], [], [], 0)[0]:
            self._read_status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._status], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            self._read_status()
        assert self.returncode is not None
        return self.returncode

    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str, str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while open_pipes := [pipe for pipe in self._read if not pipe.closed]:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = select.select(open_pipes, [], [], left)[0]
            if not ready:
                so_far = _text(self._read[self.stdout]), _text(self._read[self.stderr])
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0, *so_far)
            for pipe in ready:
                chunk = os.read(pipe.fileno(), 65536)
                if chunk:
                    self._read[pipe] += chunk
                else:
                    pipe.close()
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return _text(self._read[self.stdout]), _text(self._read[self.stderr])

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass  # as Popen: it ended meanwhile

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def _read_status(self) -> None:
        line = _read_line(self._status)
        # Nothing: the starter died, and the kernel SIGKILLed its children (PR_SET_PDEATHSIG).
        self.returncode = int(line) if line else -signal.SIGKILL
        self._status.close()  # the starter reaps the child now: until then it stays a zombie, as under Popen


def _text(data: bytes) -> str:
    """As :class:`subprocess.Popen` decodes a text-mode pipe."""
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_line(sock: socket.socket) -> str:
    """One line, byte by byte: nothing after it is taken from the socket."""
    data = bytearray()
    while not data.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        data += byte
    return data.decode().strip()


class WarmStarter:
    """A process that has imported Keras under one environment and forks sessions from it."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.warm_start", str(theirs.fileno())],
            env=env,
            cwd=cwd,
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # it says why it could not start on the socket; a full pipe would stall it
        )
        theirs.close()
        said = _read_line(self.control)
        if said != "ready":
            self.close()
            raise RuntimeError(f"the warm starter did not start: {said or 'it ended'}")

    def start(self, args: tuple[str, ...], env: dict[str, str], cwd: Path) -> WarmProcess:
        """``python -m MODULE ARGV`` (``args``) forked under ``env`` in ``cwd``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            try:
                socket.send_fds(self.control, [b"S"], [theirs.fileno(), out_write, err_write])
                request = {"module": args[1], "argv": list(args[2:]), "env": env, "cwd": str(cwd)}
                ours.sendall(json.dumps(request).encode() + b"\n")
            finally:
                theirs.close()
                os.close(out_write)
                os.close(err_write)
            pid = _read_line(ours)
            if not pid:
                raise RuntimeError("the warm starter went away")
            return WarmProcess([sys.executable, *args], int(pid), ours, out_read, err_read)
        except BaseException:
            ours.close()
            os.close(out_read)
            os.close(err_read)
            raise

    def close(self) -> None:
        """Let the starter go: it ends once the sessions it started have ended and been reaped."""
        self.control.close()


_starters: dict[tuple[tuple[str, str], ...], WarmStarter] = {}


def start(args: tuple[str, ...], env: dict[str, str], cwd: Path) -> WarmProcess:
    """``python ARGS`` under ``env`` in ``cwd``, forked from a warm starter (started on first need)."""
    starter_env = _starter_environment(env)
    key = tuple(sorted(starter_env.items()))
    starter = _starters.pop(key, None)
    if starter is None or starter.process.poll() is not None:
        while len(_starters) >= MAX_STARTERS:
            _starters.pop(next(iter(_starters))).close()
        starter = WarmStarter(starter_env, cwd)
    _starters[key] = starter  # most recently used last
    return starter.start(args, env, cwd)


@atexit.register
def _close_all() -> None:
    while _starters:
        _starters.popitem()[1].close()


# --- the starter process --------------------------------------------------------------------------------------


class _Session:
    def __init__(self, request: dict[str, Any], stdout: int, stderr: int, imported_env: dict[str, str]) -> None:
        self.request, self.stdout, self.stderr, self.imported_env = request, stdout, stderr, imported_env

    def become(self) -> None:
        """In the forked child: turn into ``python -m <module> <argv>`` under the session's environment."""
        starter = os.getppid()
        os.setsid()
        _die_with_parent()
        if os.getppid() != starter:  # the starter died before the line above: so do we
            os._exit(1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(self.stdout, 1)
        os.dup2(self.stderr, 2)
        for fd in (devnull, self.stdout, self.stderr):
            os.close(fd)
        os.chdir(self.request["cwd"])
        os.environ.clear()
        os.environ.update(self.request["env"])
        for name, value in self.imported_env.items():  # what importing TensorFlow set (TF2_BEHAVIOR...)
            os.environ.setdefault(name, value)
        import random

        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        sys.argv = [self.request["module"], *self.request["argv"]]

    def run(self) -> None:
        import runpy

        runpy.run_module(self.request["module"], run_name="__main__", alter_sys=True)


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the starter dies (Linux's PR_SET_PDEATHSIG): a starter that
    crashed reports no exit code, and the test then takes the session for SIGKILLed, which it must be."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _import_keras() -> dict[str, str]:
    """Import Keras as ``runner.train`` does (TensorFlow's C++ start-up chatter to /dev/null); the environment
    variables the import set."""
    before = dict(os.environ)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return {name: value for name, value in os.environ.items() if before.get(name) != value}


def _exit_code(pid: int) -> int | None:
    """The exit code (as Popen gives it) of a child that has ended, without reaping it; ``None`` if it runs."""
    ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if ended is None or ended.si_pid == 0:
        return None
    return ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status


def _serve(control: socket.socket, imported_env: dict[str, str]) -> _Session | None:
    """Fork a child per request; in a child, return its session. Each child's exit code goes to the test on its
    status socket; the child is reaped only when the test closes that socket, so that until the test has seen it
    end it stays a zombie whose process group can still be signalled, as with Popen. Once the test process has
    gone away, serve the children left until they end, then return."""
    running: dict[int, socket.socket] = {}
    reported: dict[socket.socket, int] = {}
    accepting = True
    while accepting or running or reported:
        waiting_on = ([control] if accepting else []) + list(reported)
        for ready in select.select(waiting_on, [], [], 0.02)[0]:
            if ready is not control:
                os.waitpid(reported.pop(ready), 0)  # the test has read the exit code
                ready.close()
                continue
            message, fds, _, _ = socket.recv_fds(control, 1, 3)
            if not message:
                accepting = False
                continue
            status = socket.socket(fileno=fds[0])
            request = json.loads(_read_line(status))
            pid = os.fork()
            if pid == 0:
                control.close()
                for other in (status, *running.values(), *reported):
                    other.close()
                return _Session(request, fds[1], fds[2], imported_env)
            os.close(fds[1])
            os.close(fds[2])
            status.sendall(f"{pid}\n".encode())
            running[pid] = status
        for pid, status in list(running.items()):
            if (code := _exit_code(pid)) is not None:
                del running[pid]
                try:
                    status.sendall(f"{code}\n".encode())
                    reported[status] = pid
                except OSError:  # the test stopped listening
                    os.waitpid(pid, 0)
                    status.close()
    return None


if __name__ == "__main__":
    _control = socket.socket(fileno=int(sys.argv[1]))
    try:
        _imported_env = _import_keras()
    except BaseException as error:  # noqa: BLE001 - said to the test, which starts cold instead
        _control.sendall(f"{type(error).__name__}: {error}\n".encode())
        raise SystemExit(1) from None
    _control.sendall(b"ready\n")
    _session = _serve(_control, _imported_env)
    if _session is not None:
        _session.become()
        del _control
        _session.run()
