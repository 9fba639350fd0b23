"""Write-back: the VM's mutations, in order, waiting to become durable on the remote ("Drive").

The mount serves a local copy (the VM's disk) where every operation applies at once, and appends each mutation
here under one lock, so the journal's order is the order the VM saw. A syncer thread applies entries older than
the durability lag to the remote, strictly in order: the remote is always the VM's state after some prefix of
its history (a rename never lands before the content written ahead of it). When the VM dies, the journal lives
only in the killed server's memory and its blobs in a throw-away folder: what was not applied is gone.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

UPLOAD_PREFIX = ".drivesim-upload-"
"""Name prefix of a file being uploaded into the remote; a leftover one (VM killed mid-upload) is deleted on mount."""


@dataclass(frozen=True)
class Entry:
    """One mutation: ``kind`` and its arguments (paths relative to the root, without a leading slash)."""

    seq: int
    at: float
    kind: str
    args: tuple[Any, ...]


class Journal:
    """Ordered mutations of the VM, applied to ``remote`` once older than ``lag_s`` (or on :meth:`sync_now`)."""

    def __init__(self, remote: Path, blobs: Path, lag_s: float) -> None:
        self.remote, self.blobs, self.lag_s = remote, blobs, lag_s
        self.lock = threading.RLock()
        """Held by the file system around a local mutation and its record, so both happen in one order."""
        self._entries: deque[Entry] = deque()
        self._apply_lock = threading.Lock()
        self._seq = 0
        self.applied = 0
        self._stop = threading.Event()
        self.blobs.mkdir(parents=True, exist_ok=True)

    def record(self, kind: str, *args: Any) -> None:
        """Append a mutation (caller holds :attr:`lock`)."""
        self._seq += 1
        self._entries.append(Entry(self._seq, time.monotonic(), kind, args))

    def record_content(self, rel: str, source: str, mode: int) -> None:
        """Append 'the file at ``rel`` now holds what ``source`` holds' (copied now: later writes don't leak in)."""
        blob = self.blobs / str(self._seq + 1)
        shutil.copyfile(source, blob)
        self.record("content", rel, str(blob), mode)

    def touches(self, rel: str) -> bool:
        """Whether a pending entry concerns ``rel``, something inside it, or a folder it is in (caller holds the lock)."""
        for entry in self._entries:
            for arg in entry.args:
                if isinstance(arg, str) and (arg == rel or arg.startswith(rel + "/") or rel.startswith(arg + "/")):
                    return True
        return False

    def pending(self) -> int:
        """Entries not yet durable."""
        return len(self._entries)

    def start(self) -> None:
        """Run the syncer thread (applies entries once older than the lag)."""
        threading.Thread(target=self._run, name="drivesim-syncer", daemon=True).start()

    def stop(self) -> None:
        """Stop the syncer thread after its current entry."""
        self._stop.set()

    def discard(self) -> int:
        """Drop every pending entry (as if the VM died); return how many."""
        with self._apply_lock, self.lock:
            dropped = len(self._entries)
            self._entries.clear()
            return dropped

    def sync_now(self, entries: int | None = None) -> int:
        """Apply the oldest ``entries`` pending entries (all when ``None``) regardless of age; return how many."""
        done = 0
        with self._apply_lock:
            while entries is None or done < entries:
                entry = self._pop(due_before=None)
                if entry is None:
                    break
                self._apply(entry)
                done += 1
        return done

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with self._apply_lock:
                while (entry := self._pop(due_before=time.monotonic() - self.lag_s)) is not None:
                    self._apply(entry)

    def _pop(self, *, due_before: float | None) -> Entry | None:
        with self.lock:
            if not self._entries or (due_before is not None and self._entries[0].at > due_before):
                return None
            return self._entries.popleft()

    def _apply(self, entry: Entry) -> None:
        try:
            getattr(self, f"_apply_{entry.kind}")(*entry.args)
        except OSError as error:
            # The remote is a plain folder only the syncer writes: an error here means an entry that could not
            # apply in order (e.g. a rename of a path the remote never had); log it and keep going like Drive.
            log.warning("drivesim: could not apply %s %s: %s", entry.kind, entry.args, error)
        self.applied += 1

    def _remote(self, rel: str) -> Path:
        return self.remote / rel

    def _apply_content(self, rel: str, blob: str, mode: int) -> None:
        target = self._remote(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        upload = target.with_name(f"{UPLOAD_PREFIX}{os.getpid()}-{Path(blob).name}")
        shutil.move(blob, upload)  # blobs may sit on another file system than the remote
        os.chmod(upload, mode)
        os.replace(upload, target)  # Drive swaps in a new version whole, never a half-uploaded file

    def _apply_mkdir(self, rel: str, mode: int) -> None:
        self._remote(rel).mkdir(mode=mode, parents=True, exist_ok=True)

    def _apply_rmdir(self, rel: str) -> None:
        os.rmdir(self._remote(rel))

    def _apply_unlink(self, rel: str) -> None:
        self._remote(rel).unlink(missing_ok=True)

    def _apply_rename(self, old: str, new: str) -> None:
        os.rename(self._remote(old), self._remote(new))

    def _apply_link(self, new: str, existing: str) -> None:
        os.link(self._remote(existing), self._remote(new))

    def _apply_symlink(self, rel: str, target: str) -> None:
        os.symlink(target, self._remote(rel))

    def _apply_chmod(self, rel: str, mode: int) -> None:
        os.chmod(self._remote(rel), mode)

    def _apply_utime(self, rel: str, times: list[int] | None) -> None:
        if times:
            os.utime(self._remote(rel), ns=(times[0], times[1]))
        else:
            os.utime(self._remote(rel))


def clear_uploads(remote: Path) -> None:
    """Delete upload leftovers (files named :data:`UPLOAD_PREFIX`...) anywhere under ``remote``."""
    for folder, _dirs, files in os.walk(remote):
        for name in files:
            if name.startswith(UPLOAD_PREFIX):
                os.unlink(os.path.join(folder, name))
