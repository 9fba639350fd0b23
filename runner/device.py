"""What this session trains on: the GPUs ``nvidia-smi`` reports, or the CPU.

Asked once per ``runner work`` without TensorFlow (which takes seconds to import and grabs the GPU's memory
when asked), and recorded per session in the job's events and state, so status says what each session ran on.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass

NVIDIA_SMI_TIMEOUT_S = 10.0
"""A wedged driver can make nvidia-smi hang: after this, the session is described as having no usable GPU."""

_QUERY = ("nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits")


@dataclass(frozen=True)
class Gpu:
    """One GPU as nvidia-smi reports it."""

    name: str
    memory_mib: int | None

    def describe(self) -> str:
        """``NVIDIA A100-SXM4-40GB (40960 MiB)``."""
        return f"{self.name} ({self.memory_mib} MiB)" if self.memory_mib else self.name


def parse_nvidia_smi(output: str) -> list[Gpu]:
    """The GPUs in ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`` output."""
    gpus = []
    for line in output.splitlines():
        name, _, memory = line.rpartition(",")
        if not name.strip():
            continue
        try:
            memory_mib: int | None = int(float(memory.strip()))
        except ValueError:
            memory_mib = None  # "[N/A]" on some virtual GPUs
        gpus.append(Gpu(name.strip(), memory_mib))
    return gpus


def detect_gpus() -> list[Gpu]:
    """This machine's GPUs; empty when there is no nvidia-smi or it fails."""
    if shutil.which(_QUERY[0]) is None:
        return []
    try:
        done = subprocess.run(_QUERY, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(done.stdout) if done.returncode == 0 else []


def describe_devices(gpus: list[Gpu]) -> str:
    """``CPU``, ``Tesla T4 (15360 MiB)`` or ``2 x NVIDIA A100-SXM4-40GB (40960 MiB)``."""
    if not gpus:
        return "CPU"
    counts = Counter(gpu.describe() for gpu in gpus)
    return ", ".join(text if count == 1 else f"{count} x {text}" for text, count in counts.items())


def short_device(device: str | None) -> str:
    """A device for a narrow table cell: ``T4``, ``2 x A100-SXM4-40GB``, ``CPU``."""
    if not device:
        return "-"
    parts = []
    for part in device.split(", "):
        part = part.split(" (")[0]
        for vendor in ("NVIDIA ", "Tesla "):
            part = part.replace(vendor, "")
        parts.append(part)
    return ", ".join(parts)


def short_engine(backend: str, devices: int | None) -> str:
    """The Keras backend and the devices in step, for a table cell: ``tf``, ``tf ×2``, ``jax ×8``."""
    name = {"tensorflow": "tf"}.get(backend, backend)
    return f"{name} ×{devices}" if devices and devices > 1 else name
