"""A Drive-like FUSE file system for tests: latency, bandwidth, transient errors, write-back and VM death.

Colab's DriveFS is simulated by a real FUSE mount (fusepy over libfuse 2) served from its own process:

    from tests.drivesim import DriveSim, FaultPlan

    with DriveSim(remote, mountpoint, latency_s=0.03, bandwidth_bps=20e6,
                  faults=FaultPlan(rate=0.05, ops=("fsync", "rename")), durability_lag_s=2.0) as drive:
        ...                      # run workers on `mountpoint`
        drive.outage(5.0)        # errno 107 on everything for 5 s
        drive.vm_dies(workers=[worker])  # SIGKILL all; what was not durable on `remote` is gone

Tests that need it are marked with :data:`tests.drivesim.fixtures.requires_fuse` and mount through a
:class:`tests.drivesim.fixtures.SimFactory`, which never leaves a mount behind.
"""

from tests.drivesim.faults import ALL_OPS, DEFAULT_ERRNOS, DEFAULT_FAULT_OPS, FaultPlan
from tests.drivesim.link import DEFAULT_LATENCY_OPS
from tests.drivesim.sim import DriveSim, DriveSimError, available

__all__ = [
    "ALL_OPS",
    "DEFAULT_ERRNOS",
    "DEFAULT_FAULT_OPS",
    "DEFAULT_LATENCY_OPS",
    "DriveSim",
    "DriveSimError",
    "FaultPlan",
    "available",
]
