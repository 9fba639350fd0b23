"""A worker's lease on a job folder: ``filelock.SoftFileLease`` plus what status and waiting need to know.

The lease is a marker file refreshed by a heartbeat thread. A holder on this host whose process is dead is
taken over at once; a silent holder elsewhere once its marker has stayed unchanged for ``lease_duration`` on the
contender's own clock. Exclusivity on a network drive is only likely, not certain: the claim generation in
state.json (see :mod:`runner.queue`) fences out a holder that lost the lease without noticing.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from filelock import LeaseCompromise, LeaseSettingsMismatch, SoftFileLease, Timeout

from runner import defaults, storage
from runner.errors import UsageError
from runner.paths import JobPaths, on_drive
from runner.settings import seconds_from_environment

_PID_NAMESPACE_MARK = "?pidns-"
"""filelock appends this and the PID namespace's inode (hex) to the host of a marker written inside a container."""

_INITIAL_PID_NAMESPACE = 0xEFFFFFFC
"""Inode Linux reserves for the host's own PID namespace, for which filelock adds no mark."""

_RELEASE_RETRY_BUDGET_S = 10.0
"""Seconds a release retries removing its marker: long enough for a blip, short enough not to hold up an exit."""

log = logging.getLogger(__name__)


def _this_pid_namespace() -> str:
    """filelock's tag for this process's PID namespace: empty for the host's own."""
    try:
        inode = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return "" if inode == _INITIAL_PID_NAMESPACE else f"{inode:x}"


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a job's lease, as written in its marker."""

    host: str
    pid: int
    heartbeat_at: float
    """Wall-clock time of the marker's last refresh (its mtime)."""
    marker_key: tuple[float, int, int]
    """What changes at each heartbeat: mtime, inode, ctime."""
    pid_namespace: str = ""
    """filelock's tag for the holder's PID namespace (empty for the host's own): pids compare only within one."""

    def describe(self) -> str:
        """``host:pid``."""
        return f"{self.host}:{self.pid}"

    def heartbeat_age(self, now: float) -> float:
        """Seconds since the last heartbeat, by this machine's wall clock (another host's clock may differ)."""
        return max(0.0, now - self.heartbeat_at)

    def dead_on_this_host(self) -> bool:
        """Whether the holder ran on this machine and its process is gone."""
        return self._on_this_host() and not process_exists(self.pid)

    def alive_on_this_host(self) -> bool:
        """Whether the holder runs on this machine and its process still exists."""
        return self._on_this_host() and process_exists(self.pid)

    def _on_this_host(self) -> bool:
        same_namespace = self.pid_namespace == _this_pid_namespace()
        return self.host == socket.gethostname() and same_namespace and self.pid > 0


def process_exists(pid: int) -> bool:
    """Whether a process of this pid exists on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but it exists
    return True


def read_holder(paths: JobPaths) -> LeaseHolder | None:
    """The current holder of a job's lease, or ``None`` when nobody holds it.

    The marker is filelock's ``key=value`` text; one being written (or of an unknown format) reads as an
    unknown holder, pid -1.
    """
    try:
        return _read_marker(paths.lease)
    except OSError:
        return None


def _read_marker(path: Path) -> LeaseHolder | None:
    """:func:`read_holder` that lets the mount's errors through: ``None`` only when there is no marker."""
    try:
        marker = os.stat(path)
        with open(path, encoding="utf-8", errors="replace") as handle:
            content = handle.read(4096)
    except FileNotFoundError:
        return None
    fields = dict(line.partition("=")[::2] for line in content.splitlines() if "=" in line)
    try:
        pid = int(fields.get("pid", "-1"))
    except ValueError:
        pid = -1
    # Containers (Colab's runtime is one) get a PID-namespace tag after the host name.
    host, _, namespace = fields.get("host", "unknown").partition(_PID_NAMESPACE_MARK)
    return LeaseHolder(
        host=host,
        pid=pid,
        heartbeat_at=marker.st_mtime,
        marker_key=(marker.st_mtime, marker.st_ino, marker.st_ctime_ns),
        pid_namespace=namespace,
    )


def lease_duration_from(environ: Mapping[str, str] = os.environ, *, queue_root: Path | None = None) -> float:
    """The lease duration: ``$RUNNER_LEASE_DURATION`` seconds, or the default (a longer one for a queue on Drive)."""
    default = defaults.LEASE_DURATION_DRIVE_S if queue_root and on_drive(queue_root) else defaults.LEASE_DURATION_S
    return seconds_from_environment(defaults.LEASE_DURATION_ENV, default, allow_zero=False, environ=environ)


class JobLease:
    """This worker's lease on one job."""

    def __init__(
        self,
        paths: JobPaths,
        *,
        duration: float = defaults.LEASE_DURATION_S,
        on_lost: Callable[[LeaseCompromise], None] | None = None,
    ) -> None:
        if not (math.isfinite(duration) and duration > 0):
            raise ValueError(f"lease duration must be positive, got {duration!r}")
        self.paths, self.duration = paths, duration
        self.found_free = False
        """Whether the last :meth:`try_acquire` found no marker at all: its holder released it, rather than dying."""
        self._lease = SoftFileLease(
            str(paths.lease), lease_duration=duration, on_compromise=on_lost, thread_local=False
        )

    @property
    def held(self) -> bool:
        """Whether this worker holds the lease now."""
        return self._lease.is_locked and self.lost is None

    @property
    def lost(self) -> LeaseCompromise | None:
        """Why the lease was lost while held (marker gone, taken over, refresh failing), or ``None``."""
        return self._lease.compromise

    def try_acquire(self) -> bool:
        """Take the lease if it is free, or its holder is dead on this host, or silent for the lease duration."""
        if self.lost is not None:
            self.release()  # filelock refuses to re-acquire a lost claim that was not released
        # Seen before taking it: a marker that was not there was released on purpose (a dead worker leaves its own).
        self.found_free = read_holder(self.paths) is None
        try:
            return self._acquire_or_take_over()
        except LeaseSettingsMismatch:
            raise UsageError(
                f"the lease on {self.paths.folder} was taken with another lease duration than this process's "
                f"{self.duration:g}s: every worker of a queue must use the same ${defaults.LEASE_DURATION_ENV}"
            ) from None

    @storage.retry_io
    def _acquire_or_take_over(self) -> bool:
        # Under the storage retry policy: a mount that answers errno 107 while the marker is made is retried like
        # any other operation, and what is left is one line with the path and the fix. (filelock removes a marker
        # it made before failing by an atomic exchange, which FUSE refuses: such an empty marker is then taken over
        # by the wait for a silent lease.) Timeout is an OSError too, but means "held": it must not reach the policy.
        try:
            try:
                self._lease.acquire(timeout=0)
            except Timeout:
                holder = read_holder(self.paths)
                if holder is None or not holder.dead_on_this_host() or not self._break_marker(holder.marker_key):
                    return False
                self._lease.acquire(timeout=0)
        except Timeout:
            return False
        return True

    def wait_for_takeover(
        self,
        *,
        report: Callable[[LeaseHolder | None, float], None],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_s: float = 1.0,
    ) -> bool:
        """Wait while the holder stays silent, reporting the seconds left; ``False`` as soon as it heartbeats.

        ``report(holder, seconds_left)`` is called about every ``poll_s`` so the wait is a visible countdown.
        """
        first = read_holder(self.paths)
        started = clock()
        # Slack for the contender's first observation of the marker and for the poll interval.
        deadline = started + self.duration + 2 * poll_s + 5.0
        while clock() < deadline:
            if self.try_acquire():
                return True
            current = read_holder(self.paths)
            if first is not None and current is not None and current.marker_key != first.marker_key:
                return False  # the holder heartbeat: it is alive
            first = first or current
            report(current, max(0.0, self.duration - (clock() - started)))
            sleep(poll_s)
        if self.try_acquire():
            return True
        # The holder stayed silent for the whole lease duration (else we returned above).
        return first is not None and self._break_marker(first.marker_key) and self.try_acquire()

    def _break_marker(self, expected: tuple[float, int, int]) -> bool:
        """Remove a stale marker that is still the one observed (``expected``); whether it was removed.

        filelock takes a stale marker over by an atomic exchange (renameat2 RENAME_EXCHANGE on Linux), which FUSE
        mounts such as Drive's refuse with EINVAL: there it never takes over. Removing the marker lets the next
        acquire create a fresh one; the claim generation fences out anyone who raced us.
        """
        current = read_holder(self.paths)
        if current is None or current.marker_key != expected:
            return False
        try:
            os.unlink(self.paths.lease)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True

    def release(self) -> None:
        """Give the lease up (a no-op when not held); never raises for a failing job folder.

        filelock stops the heartbeat before it removes the marker and tries the removal once. A failed removal is
        retried for a few seconds (a marker left naming this live process keeps every worker on this host from the
        job for as long as the process lives); when that fails too (Drive down), the marker stays without
        heartbeats and the next worker takes it over as a dead or silent worker's.
        """
        if self._lease.is_locked or self.lost is not None:
            try:
                self._lease.release(force=True)
            except OSError as error:
                budget_s = min(_RELEASE_RETRY_BUDGET_S, storage.retry_budget())
                try:
                    storage.retrying(budget_s=budget_s)(self._remove_own_marker)()
                except OSError:
                    log.warning(
                        "could not remove the lease marker %s (%s): it goes stale instead", self.paths.lease, error
                    )

    def _remove_own_marker(self) -> None:
        """Delete the marker if it still names this process; filelock has already let go of it, so nobody else
        can have made it since (its create is exclusive)."""
        holder = _read_marker(self.paths.lease)
        if holder is not None and holder.pid == os.getpid() and holder.alive_on_this_host():
            Path(self.paths.lease).unlink(missing_ok=True)
