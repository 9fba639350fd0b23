"""The simulator's own process: ``python -m tests.drivesim.server``, its configuration as the first stdin line.

The FUSE loop runs in the main thread (libfuse starts worker threads as needed). A control thread answers one
JSON line on stdout for each JSON request line on stdin. End of stdin means the controller is gone (a test
process killed): the server then detaches its mount lazily and exits, so no stale mount outlives its owner.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import IO, Any

from fuse import FUSE

from tests.drivesim.faults import FaultInjector, FaultPlan
from tests.drivesim.filesystem import DriveFS
from tests.drivesim.journal import Journal
from tests.drivesim.link import Link
from tests.drivesim.mounts import detach
from tests.drivesim.puller import Puller

log = logging.getLogger("drivesim")

MAX_IO = 128 * 1024
"""Bytes per FUSE read/write request (the most libfuse 2 takes): fewer, larger calls keep the passthrough fast."""


class Control:
    """Answers the controller's requests; each handler returns a JSON-ready result."""

    def __init__(self, config: dict[str, Any], link: Link, injector: FaultInjector, journal: Journal | None) -> None:
        self.config, self.link, self.injector, self.journal = config, link, injector, journal
        self.orphaned = False

    def serve(self, requests: IO[str], replies: IO[str]) -> None:
        for line in requests:
            request = json.loads(line)
            try:
                reply = {"ok": True, "result": getattr(self, f"do_{request.pop('cmd')}")(**request)}
            except Exception as error:  # noqa: BLE001  (reported to the controller, which raises it there)
                reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
        self._orphan()

    def _orphan(self) -> None:
        self.orphaned = True
        if self.journal is not None:
            self.journal.discard()
        log.warning("drivesim: controller gone, detaching %s", self.config["mountpoint"])
        detach(Path(self.config["mountpoint"]), lazy=True)
        threading.Timer(10.0, os._exit, args=(0,)).start()  # in case the FUSE loop does not return

    def do_ping(self) -> str:
        return "pong"

    def do_arm(self) -> None:
        self.injector.armed = True

    def do_set_faults(self, plan: dict[str, Any]) -> None:
        self.injector.set_plan(FaultPlan.from_dict(plan))

    def do_set_link(self, latency_s: float, bandwidth_bps: float | None, latency_ops: list[str]) -> None:
        self.link.configure(latency_s=latency_s, bandwidth_bps=bandwidth_bps, latency_ops=tuple(latency_ops))

    def do_outage(self, seconds: float, errno: int) -> None:
        self.injector.outage(seconds, errno)

    def do_sync_now(self, entries: int | None) -> int:
        return self.journal.sync_now(entries) if self.journal is not None else 0

    def do_discard(self) -> int:
        return self.journal.discard() if self.journal is not None else 0

    def do_stats(self) -> dict[str, Any]:
        stats = self.injector.stats()
        stats["pending"] = self.journal.pending() if self.journal is not None else 0
        stats["applied"] = self.journal.applied if self.journal is not None else 0
        return stats


def main() -> None:
    """Serve one mount until it is unmounted (or this process is killed: the VM died)."""
    config = json.loads(sys.stdin.readline())
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints must never land in the reply channel
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")

    injector = FaultInjector(FaultPlan.from_dict(config["faults"]))
    link = Link(
        latency_s=config["latency_s"], bandwidth_bps=config["bandwidth_bps"], latency_ops=tuple(config["latency_ops"])
    )
    journal = None
    if config["durability_lag_s"] is not None:
        journal = Journal(Path(config["remote"]), Path(config["state"]) / "blobs", config["durability_lag_s"])
        journal.start()
    puller = None
    if journal is not None and config.get("pull_lag_s") is not None:
        puller = Puller(
            Path(config["remote"]), Path(config["root"]), journal, config["pull_lag_s"],
            scratch=Path(config["state"]) / "pull", every_s=config.get("pull_every_s") or 0.0,
        )  # fmt: skip
        puller.start()
    control = Control(config, link, injector, journal)
    threading.Thread(target=control.serve, args=(sys.stdin, replies), name="drivesim-control", daemon=True).start()

    FUSE(
        DriveFS(config["root"], link=link, injector=injector, journal=journal),
        config["mountpoint"],
        foreground=True,
        nothreads=False,
        raw_fi=True,
        fsname="drivesim",
        hard_remove=True,  # no .fuse_hidden files: they would be journaled and uploaded like real ones
        big_writes=True,
        max_write=MAX_IO,
        max_read=MAX_IO,
        attr_timeout=config["cache_s"],
        entry_timeout=config["cache_s"],
    )
    # Unmounted cleanly: a clean shutdown uploads what is still pending, as Colab's flush_and_unmount does.
    if puller is not None:
        puller.stop()
    if journal is not None:
        journal.stop()
        journal.sync_now()
    if control.orphaned:
        shutil.rmtree(config["state"], ignore_errors=True)
    replies.close()


if __name__ == "__main__":
    main()
