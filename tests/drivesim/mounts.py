"""Asking the kernel about mounts and taking them down, dead or alive."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


def _escaped(path: str) -> str:
    # /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")


def is_mounted(path: Path) -> bool:
    """Whether something is mounted on ``path`` (also a dead FUSE mount, where ``os.path.ismount`` says no)."""
    target = _escaped(os.path.realpath(path))
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
        return any(line.split(" ")[1] == target for line in mounts if line.count(" ") >= 2)


def detach(path: Path, *, lazy: bool) -> bool:
    """Unmount ``path`` (lazily: even while busy or dead); ``True`` when nothing is mounted there afterwards."""
    if not is_mounted(path):
        return True
    commands = []
    if shutil.which("fusermount"):
        commands.append(["fusermount", "-u", "-q", *(["-z"] if lazy else []), str(path)])
    if os.geteuid() == 0 and shutil.which("umount"):
        commands.append(["umount", *(["-l"] if lazy else []), str(path)])
    for command in commands:
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=30)
        if not is_mounted(path):
            return True
    return not is_mounted(path)


def unmount(path: Path, *, patience_s: float = 3.0) -> bool:
    """Unmount cleanly, retrying while busy for ``patience_s``, then lazily; ``True`` when it is gone."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        if detach(path, lazy=False):
            return True
        time.sleep(0.1)
    return detach(path, lazy=True)
