"""Helpers for the Colab, session and device tests: a modelled Colab VM (the stand-in ``google.colab`` on the
import path, Drive's mount point in a test's folder), real ``runner`` processes on it, and a stand-in
``nvidia-smi``.

Only Colab itself and NVIDIA's driver are stood in for; the queue, the worker and the processes are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runner.queue import Queue
from tests.conftest import REPO, runner_env, start_python

FAKE_COLAB = Path(__file__).with_name("fake_colab")
"""Put on the import path, this folder makes ``google.colab`` importable (see its package docstring)."""

COLAB_CLI = "tests.support.colab_cli"
"""``python -m`` this: the real ``runner`` command with Drive's mount point moved (see that module)."""


@dataclass
class ColabVM:
    """A modelled Colab runtime: where Drive mounts, and the log of every ``google.colab`` call."""

    mount_point: Path
    log: Path

    @property
    def my_drive(self) -> Path:
        """The user's files while Drive is mounted."""
        return self.mount_point / "MyDrive"

    @property
    def queue_root(self) -> Path:
        """Colab's default queue folder, on Drive."""
        return self.my_drive / "runner"

    @property
    def cloud_queue_root(self) -> Path:
        """The same queue after the stand-in unmounted Drive (the files stay "in the cloud")."""
        return self.mount_point.with_name(self.mount_point.name + "-cloud") / "MyDrive" / "runner"

    def mount_drive(self) -> None:
        """Drive as it is after the user mounted it in an earlier cell."""
        self.my_drive.mkdir(parents=True, exist_ok=True)

    def calls(self) -> list[dict[str, Any]]:
        """Every ``google.colab`` call made so far, in order."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def call_names(self) -> list[str]:
        """The names of those calls, in order."""
        return [call["call"] for call in self.calls()]

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a ``runner`` subprocess on this VM (counting trainer, stand-in ``google.colab``)."""
        env = runner_env(
            COLAB_RELEASE_TAG="release-colab-test",
            FAKE_COLAB_LOG=str(self.log),
            FAKE_COLAB_MOUNT_POINT=str(self.mount_point),
        )
        env["PYTHONPATH"] = os.pathsep.join([str(FAKE_COLAB), env["PYTHONPATH"]])
        env.update(extra)
        return env


def colab_vm(tmp_path: Path) -> ColabVM:
    """A Colab VM whose Drive is not mounted yet."""
    return ColabVM(mount_point=tmp_path / "content" / "drive", log=tmp_path / "colab-calls.jsonl")


def run_colab_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real ``runner ARGS`` on a modelled Colab VM and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", COLAB_CLI, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def start_colab_cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start the real ``runner ARGS`` on a modelled Colab VM in the background (its own process group)."""
    return start_python("-m", COLAB_CLI, *args, env=env)


def forget_fake_colab() -> None:
    """Drop the stand-in ``google.colab`` modules from this process, so that later tests do not see Colab.

    ``importlib.util.find_spec`` answers from ``sys.modules`` first: a module left there would make
    ``on_colab()`` true for every test after this one.
    """
    for name in [name for name in sys.modules if name == "google.colab" or name.startswith("google.colab.")]:
        del sys.modules[name]
    google = sys.modules.get("google")
    if google is not None and hasattr(google, "colab"):
        delattr(google, "colab")


class _Kernel:
    """Stands in for an IPython kernel object: only its presence matters to ``colab.in_notebook_kernel``."""


@dataclass
class _Shell:
    """Stands in for the ``InteractiveShell`` that ``IPython.get_ipython()`` returns in a notebook or terminal."""

    kernel: object | None


class _IPythonModule:
    """Stands in for the ``IPython`` module as far as ``colab.in_notebook_kernel`` looks: ``get_ipython()``."""

    def __init__(self, shell: _Shell | None) -> None:
        self._shell = shell

    def get_ipython(self) -> _Shell | None:
        return self._shell


def pretend_ipython(monkeypatch: pytest.MonkeyPatch, *, shell: bool, kernel: bool) -> None:
    """Make ``sys.modules["IPython"]`` say whether this code runs in an IPython shell, and one with a kernel
    (a notebook cell) or without (a terminal ``ipython``)."""
    module = _IPythonModule(_Shell(_Kernel() if kernel else None) if shell else None)
    monkeypatch.setitem(sys.modules, "IPython", module)


def cpu_only_path() -> str:
    """``$PATH`` without any folder that holds an ``nvidia-smi`` (so the tests mean the same on a GPU machine)."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(folder for folder in folders if folder and not Path(folder, "nvidia-smi").exists())


NVIDIA_SMI_ARGS = ["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
"""The query runner must ask (``nvidia-smi --help-query-gpu`` names these fields); the stand-in answers only it."""


def install_nvidia_smi(
    folder: Path, output: str, *, hang_s: float = 0.0, exit_code: int = 0, log: Path | None = None
) -> Path:
    """Write a stand-in ``nvidia-smi`` into ``folder`` and return ``folder`` (to put first on ``$PATH``).

    It stands in for the tool NVIDIA's driver installs: for runner's exact query it sleeps ``hang_s`` (a wedged
    driver), then prints ``output`` and exits with ``exit_code``; any other arguments are an error. Each call
    is appended to ``log``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(
        f"#!{sys.executable}\n"
        '"""Stand-in for NVIDIA\'s nvidia-smi, written by tests/support/colab_helpers.py."""\n'
        "import sys, time\n"
        f"log = {str(log) if log else None!r}\n"
        "if log:\n"
        "    with open(log, 'a') as file:\n"
        "        file.write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"if sys.argv[1:] != {NVIDIA_SMI_ARGS!r}:\n"
        "    sys.stderr.write('stand-in nvidia-smi: unexpected arguments %r\\n' % sys.argv[1:])\n"
        "    sys.exit(2)\n"
        f"time.sleep({hang_s!r})\n"
        f"sys.stdout.write({output!r})\n"
        f"sys.exit({exit_code!r})\n"
    )
    script.chmod(0o755)
    return folder


def gpu_path(folder: Path) -> str:
    """``$PATH`` with ``folder`` (holding a stand-in ``nvidia-smi``) first and no real nvidia-smi after it."""
    return os.pathsep.join([str(folder), cpu_only_path()])


def flat(text: str) -> str:
    """Text with rich's line wrapping undone."""
    return " ".join(text.split())


def lines_with(text: str, needle: str) -> list[str]:
    """The lines of ``text`` that contain ``needle``."""
    return [line for line in text.splitlines() if needle in line]


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line a failing command printed; fails on more output or a traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("error:"), stderr
    return lines[0]


def queue_at(root: Path) -> Queue:
    """A queue folder to read back (a short lease, so a stopped worker's job reads as interrupted)."""
    return Queue(root, lease_duration=3.0)
