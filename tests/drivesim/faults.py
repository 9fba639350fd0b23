"""What goes wrong on the simulated Drive: the fault plan (declared by a test) and the injector (run in the server).

A :class:`FaultPlan` is plain data that crosses the process boundary as JSON. The :class:`FaultInjector` draws
from a seeded RNG on every FUSE call of a chosen operation, and counts every call and every fault it injected so a
test can read back what really happened.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

ALL_OPS = (
    "getattr", "readdir", "open", "create", "read", "write", "flush", "release", "fsync", "fsyncdir",
    "mkdir", "rmdir", "unlink", "rename", "link", "symlink", "readlink", "chmod", "chown", "truncate",
    "utimens", "statfs",
)  # fmt: skip
"""Every FUSE operation the simulator serves (fusepy's names); faults and latency are chosen among these."""

DEFAULT_FAULT_OPS = (
    "getattr", "readdir", "open", "create", "read", "write", "flush", "fsync",
    "mkdir", "rmdir", "unlink", "rename", "truncate", "utimens",
)  # fmt: skip
"""Operations a plan faults when it names none: all that report errors to the caller (not ``release``)."""

DEFAULT_ERRNOS = (errno.EIO, errno.ENOTCONN)
"""What DriveFS returns when it struggles: EIO (also on quota) and 107 'Transport endpoint is not connected'."""


@dataclass(frozen=True)
class FaultPlan:
    """Transient errors to inject: each call of an op in ``ops`` fails with probability ``rate``.

    ``errnos`` are drawn uniformly. ``after`` is the fraction of faults injected *after* the operation took effect
    (an ambiguous failure: the rename happened, yet the caller sees EIO). ``seed`` makes the draws repeatable
    (within the limits of thread scheduling); ``None`` draws fresh randomness.
    """

    rate: float = 0.0
    errnos: tuple[int, ...] = DEFAULT_ERRNOS
    ops: tuple[str, ...] = DEFAULT_FAULT_OPS
    seed: int | None = 0
    after: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.ops, str):
            object.__setattr__(self, "ops", (self.ops,))
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "errnos", tuple(int(code) for code in self.errnos))
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {self.rate!r}")
        if not 0.0 <= self.after <= 1.0:
            raise ValueError(f"after must be within [0, 1], got {self.after!r}")
        unknown_errnos = [code for code in self.errnos if code not in errno.errorcode]
        if unknown_errnos:
            raise ValueError(f"unknown errnos {unknown_errnos!r}")
        if self.rate and not self.errnos:
            raise ValueError("errnos must name at least one errno when rate > 0")
        unknown = sorted(set(self.ops) - set(ALL_OPS))
        if unknown:
            raise ValueError(f"unknown ops {unknown!r}; choose among {ALL_OPS!r}")

    def replace(self, **changes: Any) -> FaultPlan:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the control channel."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultPlan:
        """The inverse of :meth:`to_dict`."""
        return cls(**data)


class FaultInjector:
    """Decides, per FUSE call, whether to fail it; counts calls and injected faults (thread-safe)."""

    def __init__(self, plan: FaultPlan) -> None:
        self._lock = threading.Lock()
        self._outage_until = 0.0
        self._outage_errno = errno.ENOTCONN
        self.armed = False
        self.calls: dict[str, int] = {}
        self.faults: dict[str, dict[str, int]] = {}
        self.outage_faults: dict[str, int] = {}
        self.set_plan(plan)

    def set_plan(self, plan: FaultPlan) -> None:
        """Use ``plan`` from now on, with a fresh RNG from its seed; counters carry on."""
        with self._lock:
            self._plan = plan
            self._ops = frozenset(plan.ops)
            self._rng = random.Random(plan.seed)

    def outage(self, seconds: float, code: int = errno.ENOTCONN) -> None:
        """Fail every call with ``code`` for ``seconds`` from now (a drop longer than any retry budget)."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds
            self._outage_errno = code

    def decide(self, op: str) -> tuple[int, bool] | None:
        """``(errno, after)`` when this call of ``op`` must fail, else ``None``; counts the call."""
        with self._lock:
            self.calls[op] = self.calls.get(op, 0) + 1
            if not self.armed:
                return None
            if time.monotonic() < self._outage_until:
                self.outage_faults[op] = self.outage_faults.get(op, 0) + 1
                return self._outage_errno, False
            plan = self._plan
            if op not in self._ops or not plan.rate or self._rng.random() >= plan.rate:
                return None
            code = self._rng.choice(plan.errnos)
            after = bool(plan.after) and self._rng.random() < plan.after
            per_op = self.faults.setdefault(op, {})
            name = errno.errorcode.get(code, str(code))
            per_op[name] = per_op.get(name, 0) + 1
            return code, after

    def stats(self) -> dict[str, Any]:
        """Copies of the counters: ``calls``, ``faults`` (op → errno name → n) and ``outage`` (op → n)."""
        with self._lock:
            return {
                "calls": dict(self.calls),
                "faults": {op: dict(per) for op, per in self.faults.items()},
                "outage": dict(self.outage_faults),
            }
