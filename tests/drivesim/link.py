"""The network between the VM and Drive: a fixed latency per operation and a bandwidth cap per direction."""

from __future__ import annotations

import threading
import time

from tests.drivesim.faults import ALL_OPS

DEFAULT_LATENCY_OPS = tuple(op for op in ALL_OPS if op not in ("read", "write", "release"))
"""Operations that pay the latency: metadata and open/close/fsync, not each data chunk (those pay bandwidth)."""


class _Pipe:
    """One direction of the link: transfers queue behind each other, so the cap holds across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_at = 0.0

    def transfer(self, nbytes: int, bps: float | None) -> None:
        if not bps or nbytes <= 0:
            return
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = end = start + nbytes / bps
        pause = end - time.monotonic()
        if pause > 0:
            time.sleep(pause)


class Link:
    """Latency and bandwidth of the simulated connection; changeable while the mount is live."""

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        bandwidth_bps: float | None = None,
        latency_ops: tuple[str, ...] = DEFAULT_LATENCY_OPS,
    ) -> None:
        self._up, self._down = _Pipe(), _Pipe()
        self.configure(latency_s=latency_s, bandwidth_bps=bandwidth_bps, latency_ops=latency_ops)

    def configure(
        self, *, latency_s: float, bandwidth_bps: float | None, latency_ops: tuple[str, ...] = DEFAULT_LATENCY_OPS
    ) -> None:
        """Set all three at once (each FUSE call reads them without a lock; a torn read is harmless)."""
        self.latency_s = float(latency_s)
        self.bandwidth_bps = float(bandwidth_bps) if bandwidth_bps else None
        self.latency_ops = frozenset(latency_ops)

    def wait(self, op: str) -> None:
        """Sleep the per-operation latency when ``op`` pays it."""
        if self.latency_s and op in self.latency_ops:
            time.sleep(self.latency_s)

    def upload(self, nbytes: int) -> None:
        """Sleep as long as sending ``nbytes`` takes under the cap."""
        self._up.transfer(nbytes, self.bandwidth_bps)

    def download(self, nbytes: int) -> None:
        """Sleep as long as receiving ``nbytes`` takes under the cap."""
        self._down.transfer(nbytes, self.bandwidth_bps)
