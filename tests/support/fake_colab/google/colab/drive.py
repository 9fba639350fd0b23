"""Stand-in for ``google.colab.drive`` (see the package docstring): mounting and flushing Google Drive.

The real ``mount`` shows a consent prompt and starts DriveFS at ``mountpoint``, with the user's files under
``<mountpoint>/MyDrive``; it raises ``ValueError("mount failed")`` when consent is refused and a timeout error
when Drive does not answer. The real ``flush_and_unmount`` uploads pending writes and unmounts, raising
``ValueError`` when it fails. Here a mounted Drive is a plain ``<mountpoint>/MyDrive`` folder; unmounting moves
it out of sight to ``<mountpoint>-cloud/MyDrive`` (the files stay "in the cloud", where tests can still read
them) and a later mount brings it back.
"""

from __future__ import annotations

import os
from pathlib import Path

from google.colab import behaviour, record

__all__ = ["flush_and_unmount", "mount"]


def _cloud(mountpoint: Path) -> Path:
    return mountpoint.with_name(mountpoint.name + "-cloud") / "MyDrive"


def mount(mountpoint: str, force_remount: bool = False, timeout_ms: int = 120000, readonly: bool = False) -> None:
    """Mount Google Drive at ``mountpoint``."""
    record("drive.mount", mountpoint=mountpoint, force_remount=force_remount, timeout_ms=timeout_ms, readonly=readonly)
    mode = behaviour("FAKE_COLAB_MOUNT")
    if mode == "refuse":
        raise ValueError("mount failed")
    if mode == "timeout":
        raise ValueError("mount failed: timeout during initial read of root folder")
    if mode == "timeout-error":
        raise TimeoutError("Timed out waiting for the mount to complete")
    if mode == "empty":
        return
    root = Path(mountpoint)
    folder, cloud = root / "MyDrive", _cloud(root)
    if cloud.is_dir() and not folder.exists():
        root.mkdir(parents=True, exist_ok=True)
        cloud.rename(folder)
    folder.mkdir(parents=True, exist_ok=True)


def flush_and_unmount(timeout_ms: int = 86400000) -> None:
    """Upload pending writes to Drive, then unmount it."""
    record("drive.flush_and_unmount", timeout_ms=timeout_ms)
    if behaviour("FAKE_COLAB_FLUSH") == "fail":
        raise ValueError("flush_and_unmount failed")
    root = Path(os.environ.get("FAKE_COLAB_MOUNT_POINT", "/content/drive"))
    folder, cloud = root / "MyDrive", _cloud(root)
    if folder.is_dir():
        cloud.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(cloud)
