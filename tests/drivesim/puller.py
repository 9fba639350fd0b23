"""Pull: changes that reach the remote ("Drive") from elsewhere show up in this VM's view after a propagation lag.

With write-back alone a mount serves the copy of Drive it took when it was mounted, so two mounts of one remote
never see each other. The puller makes them two VMs on one Drive: it scans the remote, and a file or folder
that differs from what this VM last took from it (new, changed or gone) is brought into the local view once the
difference is ``lag_s`` old, whole (Drive swaps in a new version of a file, never part of one). A path this VM
has changed itself and not yet uploaded (an entry pending in the journal) is left alone until the upload is
done: the local version wins until then, and whichever version reaches Drive last wins after (as on Drive).
Locks are not shared: an exclusive create on one VM knows nothing of the other's.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

from tests.drivesim.journal import UPLOAD_PREFIX, Journal

log = logging.getLogger(__name__)

Signature = tuple[bool, int, int, int]
"""(is a folder, size, mtime in ns, inode) of a remote entry: what changes when Drive gets a new version."""

SCAN_INTERVAL_S = 0.05


def scan(root: Path) -> dict[str, Signature]:
    """Every entry under ``root`` by relative path (upload leftovers skipped)."""
    found: dict[str, Signature] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            if name.startswith(UPLOAD_PREFIX):
                continue
            path = os.path.join(folder, name)
            try:
                stat = os.lstat(path)
            except FileNotFoundError:
                continue
            is_dir = os.path.isdir(path) and not os.path.islink(path)
            found[os.path.relpath(path, root)] = (is_dir, 0 if is_dir else stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return found


class Puller:
    """Brings remote changes into ``local`` ``lag_s`` after they appear, unless this VM has the path pending."""

    def __init__(
        self, remote: Path, local: Path, journal: Journal, lag_s: float, *, scratch: Path, every_s: float = 0.0
    ) -> None:
        self.remote, self.local, self.journal, self.lag_s = remote, local, journal, lag_s
        self.every_s = every_s  # > 0: the view is brought up to date in bursts this far apart (a stalling client)
        self.scratch = scratch  # beside the local copy (one file system), outside what the mount shows
        scratch.mkdir(parents=True, exist_ok=True)
        self.known = scan(remote)  # the VM's copy was taken from this
        self.seen_at: dict[str, float] = {}
        self.pulled = 0
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="drivesim-puller", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        next_burst = time.monotonic()
        while not self._stop.wait(SCAN_INTERVAL_S):
            now = time.monotonic()
            burst = now >= next_burst
            if burst:
                next_burst = now + self.every_s
            try:
                self._step(now, apply=burst)
            except OSError as error:  # the remote is changing under the scan: look again next time
                log.debug("drivesim: pull scan: %s", error)

    def _step(self, now: float, *, apply: bool = True) -> None:
        current = scan(self.remote)
        for rel in set(current) | set(self.known):
            if current.get(rel) != self.known.get(rel):
                self.seen_at.setdefault(rel, now)
            else:
                self.seen_at.pop(rel, None)
        if not apply:
            return
        # Parents before children when they appear, children before parents when they go.
        due = sorted((rel for rel, at in self.seen_at.items() if now - at >= self.lag_s), key=lambda r: r.count(os.sep))
        for rel in due + [rel for rel in reversed(due) if rel not in current]:
            if rel in self.seen_at and self._apply(rel, current.get(rel)):
                self.seen_at.pop(rel, None)

    def _apply(self, rel: str, signature: Signature | None) -> bool:
        """Make the local view's ``rel`` what the remote holds; ``False`` to try again later."""
        with self.journal.lock:
            if self.journal.touches(rel):
                return False
            local = self.local / rel
            try:
                if signature is None:
                    if local.is_dir() and not local.is_symlink():
                        if any(local.iterdir()):
                            return False  # children first
                        local.rmdir()
                    else:
                        local.unlink(missing_ok=True)
                    self.known.pop(rel, None)
                elif signature[0]:
                    local.mkdir(parents=True, exist_ok=True)
                    self.known[rel] = signature
                else:
                    local.parent.mkdir(parents=True, exist_ok=True)
                    incoming = self.scratch / f"pull-{self.pulled}"
                    shutil.copy2(self.remote / rel, incoming)
                    if local.is_dir() and not local.is_symlink():
                        shutil.rmtree(local)
                    os.replace(incoming, local)
                    self.known[rel] = signature
            except FileNotFoundError:
                return False  # changed again while copying: the next scan sees its newest version
            self.pulled += 1
            return True
