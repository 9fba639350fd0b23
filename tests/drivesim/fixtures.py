"""pytest glue: the ``requires_fuse`` mark and :class:`SimFactory`, which a ``drive_sim`` fixture wraps.

With ``DRIVESIM_REQUIRED=1`` in the environment (CI sets it where it installs FUSE), a missing FUSE is a failure,
not a skip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.drivesim.sim import DriveSim, available

FUSE_AVAILABLE, FUSE_REASON = available()

requires_fuse = pytest.mark.skipif(
    not FUSE_AVAILABLE and not os.environ.get("DRIVESIM_REQUIRED"), reason=f"needs FUSE: {FUSE_REASON}"
)
"""Skip a test only where FUSE cannot work here, with the reason."""


class SimFactory:
    """Mounts :class:`DriveSim` instances under one folder and takes every one down on exit.

    In a test module::

        @pytest.fixture
        def drive_sim(tmp_path: Path) -> Iterator[SimFactory]:
            with SimFactory(tmp_path) as factory:
                yield factory

    ``drive_sim(remote=None, mountpoint=None, **options)`` then mounts one: by default ``tmp_path / "drive"`` as
    the remote and a fresh ``tmp_path / "mnt<n>"`` as the mount point.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sims: list[DriveSim] = []

    def __call__(self, remote: Path | None = None, mountpoint: Path | None = None, **options: Any) -> DriveSim:
        sim = DriveSim(remote or self.folder / "drive", mountpoint or self.folder / f"mnt{len(self.sims)}", **options)
        self.sims.append(sim)
        sim.mount()
        return sim

    def __enter__(self) -> SimFactory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sim in self.sims:
            sim.close()
