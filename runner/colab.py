"""Google Colab: Drive for the queue, the session's 12-hour clock, flushing Drive, and handing the runtime back.

Everything here calls ``google.colab`` lazily and turns its failures into one line: Colab's own errors are
``ValueError("mount failed")`` and tracebacks from deep inside its helpers, which tell a user nothing.
Outside Colab these functions are never called (or do nothing), so the rest of runner does not care where it runs.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from runner import defaults
from runner.device import Gpu, describe_devices, detect_gpus
from runner.errors import DriveUnavailable, UsageError
from runner.paths import on_colab

COLAB_SESSION_HOURS = 12.0
"""The longest a free Colab session lives, counted from the VM's start."""

COLAB_STOP_MARGIN_HOURS = 0.5
"""How long before the cap ``runner work`` stops by default: the last checkpoint needs time to reach Drive."""

DRIVE_MOUNT_TIMEOUT_S = 120.0
"""Seconds to wait for Drive to mount (the first mount of a session also waits for the user's consent)."""

DRIVE_FLUSH_TIMEOUT_S = 600.0
"""Seconds ``--flush`` waits for Drive to upload pending writes."""

NO_GPU_ADVICE = (
    "this Colab runtime has no GPU, so training runs on the CPU, many times slower: choose Runtime > "
    "Change runtime type > a GPU (T4, say), then run the notebook's cells again"
)


def drive_mounted(mount_point: Path) -> bool:
    """Whether Drive is mounted at ``mount_point`` (Colab shows it as ``MyDrive``, older runtimes ``My Drive``).

    A mount that is there but broken (errno 107 once Drive's process has died) is :class:`DriveUnavailable`.
    """
    for name in ("MyDrive", "My Drive"):
        try:
            if (mount_point / name).is_dir():
                return True
        except OSError as error:
            raise DriveUnavailable(
                f"Google Drive's mount at {mount_point} is not answering ({error.strerror or error}, errno "
                f"{error.errno}): choose Runtime > Restart session, then mount Drive again"
            ) from None
    return False


def drive_mounted_default() -> bool:
    """Whether Drive is mounted where Colab puts it."""
    return drive_mounted(Path(defaults.DRIVE_MOUNT_POINT))


def in_notebook_kernel() -> bool:
    """Whether this code runs inside an IPython kernel (a notebook cell), where Drive can ask for consent.

    A ``!runner work`` cell runs in a shell without the kernel: Colab cannot show its consent prompt there.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None  # type: ignore[attr-defined]
    return shell is not None and getattr(shell, "kernel", None) is not None


def ensure_drive(queue_root: Path, *, can_prompt: bool, mount_point: Path | None = None) -> None:
    """Mount Drive if the queue lives on it and it is not mounted yet; one-line errors otherwise.

    Nothing happens outside Colab or for a queue elsewhere.
    """
    mount_point = mount_point or Path(defaults.DRIVE_MOUNT_POINT)
    if not on_colab() or not _is_within(queue_root, mount_point) or drive_mounted(mount_point):
        return
    if not can_prompt:
        raise DriveUnavailable(
            f"Google Drive is not mounted at {mount_point}: run `from google.colab import drive; "
            f"drive.mount('{mount_point}')` in a notebook cell first (a `!` shell cell cannot ask for consent), "
            "or pass --queue a local folder"
        )
    try:
        drive = importlib.import_module("google.colab.drive")
        drive.mount(str(mount_point), timeout_ms=int(DRIVE_MOUNT_TIMEOUT_S * 1000))
    except Exception as error:  # Colab raises ValueError, TimeoutError, or its own errors: all mean "not mounted"
        raise DriveUnavailable(
            f"could not mount Google Drive at {mount_point} ({_reason(error)}): run the cell again and accept the "
            "consent prompt, or restart the runtime if Drive was mounted before (Runtime > Restart session)"
        ) from None
    if not drive_mounted(mount_point):
        raise DriveUnavailable(f"Google Drive reported success but {mount_point}/MyDrive is missing: mount it again")


def flush_drive(report: Callable[[str], None], *, mount_point: Path | None = None) -> bool:
    """Push Drive's pending writes to the cloud (this unmounts Drive); ``False`` with a reported line on failure."""
    mount_point = mount_point or Path(defaults.DRIVE_MOUNT_POINT)
    try:
        mounted = drive_mounted(mount_point)
    except DriveUnavailable as error:
        report(f"cannot flush Drive: {error}")
        return False
    if not mounted:
        report(f"Drive is not mounted at {mount_point}; nothing to flush")
        return False
    report("flushing Drive: waiting for pending writes to upload (Drive is unmounted afterwards)")
    try:
        drive = importlib.import_module("google.colab.drive")
        drive.flush_and_unmount(timeout_ms=int(DRIVE_FLUSH_TIMEOUT_S * 1000))
    except Exception as error:
        report(
            f"--flush failed ({_reason(error)}): recent writes may still be uploading; keep the runtime "
            "connected for a few minutes before closing it"
        )
        return False
    report("Drive flushed and unmounted")
    return True


def release_runtime(report: Callable[[str], None]) -> bool:
    """Hand the Colab runtime back so that no compute units are spent idle; ``False`` with a line on failure."""
    report("releasing the Colab runtime (--release-runtime)")
    try:
        runtime = importlib.import_module("google.colab.runtime")
        runtime.unassign()
    except Exception as error:
        report(
            f"could not release the runtime ({_reason(error)}): choose Runtime > Disconnect and delete runtime"
        )
        return False
    return True


def vm_uptime_s(proc_uptime: Path = Path("/proc/uptime")) -> float | None:
    """Seconds since this machine started (a Colab session's 12 hours count from there)."""
    try:
        return float(proc_uptime.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def default_max_hours(uptime_s: float | None) -> float | None:
    """Hours ``runner work`` may run when ``--max-hours`` is not given: on Colab, until a little before the cap."""
    if not on_colab():
        return None
    used = (uptime_s or 0.0) / 3600
    return max(0.0, COLAB_SESSION_HOURS - COLAB_STOP_MARGIN_HOURS - used)


def check_max_hours(hours: float) -> float:
    """``--max-hours`` as given, refused with one line when it cannot be a time limit."""
    if not hours > 0 or hours == float("inf"):
        raise UsageError(f"--max-hours must be a positive number of hours, such as 11.5 (got {hours:g})")
    return hours


def gpu_warning(gpus: list[Gpu]) -> str | None:
    """The warning for a Colab runtime without a GPU; ``None`` elsewhere or with one."""
    return NO_GPU_ADVICE if on_colab() and not gpus else None


def session_device(report: Callable[[str], None], detect: Callable[[], list[Gpu]] = detect_gpus) -> str:
    """What this session trains on, for the job's records; warns (through ``report``) on a GPU-less Colab."""
    gpus = detect()
    if (warning := gpu_warning(gpus)) is not None:
        report(warning)
    return describe_devices(gpus)


def _is_within(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
    except ValueError:
        return False
    return True


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
