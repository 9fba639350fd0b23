"""The test-side handle: :class:`DriveSim` starts, steers and stops one simulated Drive mount in its own process."""

from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.drivesim.faults import FaultPlan
from tests.drivesim.journal import clear_uploads
from tests.drivesim.link import DEFAULT_LATENCY_OPS
from tests.drivesim.mounts import detach, is_mounted, unmount

_REPO = Path(__file__).resolve().parents[2]
_LIVE: set[DriveSim] = set()
MOUNT_TIMEOUT_S = 20.0
"""Seconds :meth:`DriveSim.mount` waits for the server to bring the mount up."""


class DriveSimError(RuntimeError):
    """The simulator itself failed (not a fault it injected): the server died, refused a request, or hung."""


class DriveSim:
    """A Drive-like FUSE mount of ``remote`` on ``mountpoint``, served by a separate process.

    ``latency_s`` is paid by every call of ``latency_ops``; ``bandwidth_bps`` caps reads and writes (bytes per
    second, each direction). ``faults`` injects transient errors. With ``durability_lag_s`` set, the mount serves
    a fresh local copy of ``remote`` (the VM's view) and its changes reach ``remote`` in order, each that many
    seconds after it was made (file content: after close or fsync); :meth:`vm_dies` loses what has not. Without
    it, the mount is a passthrough to ``remote``. ``cache_s`` is how long the kernel caches names and attributes.
    ``pull_lag_s`` (with write-back only) makes other VMs' changes to ``remote`` show up in this mount that many
    seconds after they reach it (tests/drivesim/puller.py): two such mounts of one remote are two VMs on one Drive.
    ``pull_every_s`` makes that view stall: it is brought up to date only in bursts this many seconds apart.
    """

    def __init__(
        self,
        remote: Path,
        mountpoint: Path,
        *,
        latency_s: float = 0.0,
        bandwidth_bps: float | None = None,
        faults: FaultPlan | None = None,
        durability_lag_s: float | None = None,
        latency_ops: tuple[str, ...] = DEFAULT_LATENCY_OPS,
        cache_s: float = 1.0,
        pull_lag_s: float | None = None,
        pull_every_s: float = 0.0,
    ) -> None:
        _check_link(latency_s, bandwidth_bps)
        if durability_lag_s is not None and durability_lag_s < 0:
            raise ValueError(f"durability_lag_s must be >= 0 or None, got {durability_lag_s!r}")
        if cache_s < 0:
            raise ValueError(f"cache_s must be >= 0, got {cache_s!r}")
        if pull_lag_s is not None and (durability_lag_s is None or pull_lag_s < 0):
            raise ValueError(f"pull_lag_s needs a durability_lag_s and must be >= 0, got {pull_lag_s!r}")
        self.pull_lag_s, self.pull_every_s = pull_lag_s, pull_every_s
        self.remote, self.mountpoint = Path(remote).resolve(), Path(mountpoint).resolve()
        self.latency_s, self.bandwidth_bps, self.latency_ops = latency_s, bandwidth_bps, tuple(latency_ops)
        self.faults = faults or FaultPlan()
        self.durability_lag_s, self.cache_s = durability_lag_s, cache_s
        self._proc: subprocess.Popen[str] | None = None
        self._state: Path | None = None
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def mount(self) -> Path:
        """Start the server and wait until the mount is live; return the mount point."""
        if self._proc is not None:
            raise DriveSimError(f"{self.mountpoint}: already mounted by this DriveSim")
        self.remote.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mountpoint) and not detach(self.mountpoint, lazy=True):
            raise DriveSimError(f"{self.mountpoint}: something is mounted there and will not unmount")
        self._state = Path(tempfile.mkdtemp(prefix="drivesim-"))
        root = self.remote
        if self.durability_lag_s is not None:
            clear_uploads(self.remote)  # a previous VM killed mid-upload
            root = self._state / "local"
            shutil.copytree(self.remote, root, symlinks=True)  # a new VM sees Drive as it is now
        self._start(root)
        _LIVE.add(self)
        self._wait_mounted()
        self._request("arm")
        return self.mountpoint

    def _start(self, root: Path) -> None:
        assert self._state is not None
        config = {
            "root": str(root), "remote": str(self.remote), "mountpoint": str(self.mountpoint),
            "state": str(self._state), "latency_s": self.latency_s, "bandwidth_bps": self.bandwidth_bps,
            "latency_ops": list(self.latency_ops), "faults": self.faults.to_dict(),
            "durability_lag_s": self.durability_lag_s, "cache_s": self.cache_s, "pull_lag_s": self.pull_lag_s,
            "pull_every_s": self.pull_every_s,
        }  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH", "")]))
        with open(self._state / "server.log", "w") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.drivesim.server"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                cwd=_REPO,
                start_new_session=True,  # a test's killpg of its workers must not take the "Drive" down with them
            )
        self._stdin.write(json.dumps(config) + "\n")
        self._stdin.flush()

    def _wait_mounted(self) -> None:
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not os.path.ismount(self.mountpoint):
            if self._proc is None or self._proc.poll() is not None or time.monotonic() > deadline:
                log = self.server_log()
                self.close()
                raise DriveSimError(f"{self.mountpoint}: the mount did not come up; server log:\n{log}")
            time.sleep(0.02)

    def unmount(self, *, flush: bool = True) -> None:
        """Stop cleanly: pending writes are uploaded first (unless ``flush=False``: they are dropped)."""
        if self._proc is None:
            return
        if self._proc.poll() is None and not flush:
            self._request("discard")
        gone = unmount(self.mountpoint)
        try:
            self._proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            detach(self.mountpoint, lazy=True)
            gone = False  # the server hung: report it even though the mount is gone now
        self._forget()
        if not gone:
            raise DriveSimError(f"{self.mountpoint}: could not unmount cleanly (detached lazily)")

    def vm_dies(self, workers: Iterable[subprocess.Popen[Any]] = ()) -> None:
        """The VM vanishes: the server is SIGKILLed, what is not durable yet is lost, the mount goes away.

        ``workers`` (processes running "on the VM") are SIGKILLed too, with their process groups, after the server
        and before the mount point is detached: they never reach the remote again, nor write into the empty
        folder under the mount point. A process not named here sees ENOTCONN, then that folder.
        """
        if self._proc is None:
            raise DriveSimError(f"{self.mountpoint}: not mounted")
        self._proc.send_signal(signal.SIGKILL)
        self._proc.wait()
        for worker in workers:
            _kill_group(worker.pid)
            worker.wait()
        detach(self.mountpoint, lazy=True)
        self._forget()

    def close(self) -> None:
        """Best-effort clean-up that never raises: unmount if possible, else kill and detach."""
        if self._proc is None:
            return
        try:
            self.unmount()
        except Exception:  # noqa: BLE001  (clean-up must go on: kill and detach instead)
            if self._proc is not None:
                self._proc.kill()
                self._proc.wait()
            detach(self.mountpoint, lazy=True)
            self._forget()

    def _forget(self) -> None:
        for stream in (self._proc.stdin, self._proc.stdout) if self._proc else ():
            if stream is not None:
                stream.close()
        self._proc = None
        _LIVE.discard(self)
        if self._state is not None:
            shutil.rmtree(self._state, ignore_errors=True)
            self._state = None

    def __enter__(self) -> DriveSim:
        self.mount()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def mounted(self) -> bool:
        """Whether this simulator's server is running (the mount is live)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id (None when not mounted)."""
        return self._proc.pid if self._proc is not None else None

    def server_log(self) -> str:
        """What the server wrote to stderr so far (empty once unmounted)."""
        try:
            return (self._state / "server.log").read_text() if self._state else ""
        except OSError:
            return ""

    # -- steering -----------------------------------------------------------------------------------------------

    def set_faults(self, plan: FaultPlan | None = None, **changes: Any) -> FaultPlan:
        """Inject from now on ``plan`` (or the current plan with ``changes``); counters carry on. Returns it."""
        self.faults = (plan or self.faults).replace(**changes) if changes else (plan or self.faults)
        self._request("set_faults", plan=self.faults.to_dict())
        return self.faults

    def set_link(
        self, *, latency_s: float | None = None, bandwidth_bps: float | None | str = "keep",
        latency_ops: tuple[str, ...] | None = None,
    ) -> None:  # fmt: skip
        """Change latency, bandwidth (``None`` lifts the cap) or the ops that pay latency, from now on."""
        latency = self.latency_s if latency_s is None else latency_s
        bandwidth = self.bandwidth_bps if bandwidth_bps == "keep" else bandwidth_bps
        _check_link(latency, bandwidth)  # type: ignore[arg-type]
        self.latency_s, self.bandwidth_bps = latency, bandwidth  # type: ignore[assignment]
        self.latency_ops = tuple(latency_ops) if latency_ops is not None else self.latency_ops
        self._request("set_link", latency_s=latency, bandwidth_bps=bandwidth, latency_ops=list(self.latency_ops))

    def outage(self, seconds: float, *, code: int = errno.ENOTCONN) -> None:
        """From now on, for ``seconds``, every operation that reaches the mount fails with ``code``."""
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        self._request("outage", seconds=seconds, errno=code)

    def sync_now(self, entries: int | None = None) -> int:
        """Make the oldest ``entries`` pending changes durable now (all when ``None``); return how many applied."""
        return int(self._request("sync_now", entries=entries))

    def pending(self) -> int:
        """Changes made on the mount that are not durable on ``remote`` yet (0 without write-back)."""
        return int(self.stats()["pending"])

    def stats(self) -> dict[str, Any]:
        """Counters: ``calls`` and ``outage`` (op → n), ``faults`` (op → errno name → n), ``pending``, ``applied``.

        ``pending`` and ``applied`` count write-back journal entries (0 without write-back).
        """
        return dict(self._request("stats"))

    def _request(self, cmd: str, **args: Any) -> Any:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                raise DriveSimError(f"{self.mountpoint}: the simulator is not running")
            try:
                self._stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
                self._stdin.flush()
                line = self._stdout.readline()
            except (BrokenPipeError, ValueError) as error:
                raise DriveSimError(f"{self.mountpoint}: lost the simulator ({error})") from None
        if not line:
            raise DriveSimError(f"{self.mountpoint}: the simulator died; log:\n{self.server_log()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise DriveSimError(f"{cmd}: {reply['error']}")
        return reply["result"]

    @property
    def _stdin(self) -> IO[str]:
        assert self._proc is not None and self._proc.stdin is not None
        return self._proc.stdin

    @property
    def _stdout(self) -> IO[str]:
        assert self._proc is not None and self._proc.stdout is not None
        return self._proc.stdout


def _kill_group(pid: int) -> None:
    """SIGKILL ``pid`` with its process group, unless that group is ours (then only ``pid``)."""
    try:
        group = os.getpgid(pid)
        if group != os.getpgrp():
            os.killpg(group, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _check_link(latency_s: float, bandwidth_bps: float | None) -> None:
    if latency_s < 0:
        raise ValueError(f"latency_s must be >= 0, got {latency_s!r}")
    if bandwidth_bps is not None and bandwidth_bps <= 0:
        raise ValueError(f"bandwidth_bps must be positive or None, got {bandwidth_bps!r}")


def available() -> tuple[bool, str]:
    """Whether a DriveSim can mount here, and if not, why (for ``pytest.mark.skipif``)."""
    if not sys.platform.startswith("linux"):
        return False, f"FUSE simulation needs Linux, this is {sys.platform}"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as error:
        return False, f"/dev/fuse is not usable ({error.strerror}); run with a FUSE device (docker --device /dev/fuse)"
    os.close(fd)
    try:
        import fuse  # noqa: F401  (fusepy loads libfuse at import)
    except (ImportError, OSError) as error:
        return False, f"fusepy or libfuse missing ({error}); install libfuse2 and fusepy as .ci/run does"
    if os.geteuid() != 0 and not shutil.which("fusermount"):
        return False, "not root and no fusermount: cannot mount FUSE file systems"
    return True, "FUSE available"


@atexit.register
def _close_all() -> None:
    for sim in list(_LIVE):
        sim.close()
