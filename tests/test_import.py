"""``import runner`` stays light: no TensorFlow, no Keras, no matplotlib (status and submit must start fast)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, runner_env

HEAVY = ("tensorflow", "keras", "matplotlib")
"""matplotlib loads only when `runner plot` draws (runner/curves.py imports it inside its functions)."""

# Records every attempt to import a heavy package, even one that is not installed, then imports the modules.
PROBE = """
import json, sys

attempts = []

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {heavy!r}:
            attempts.append(name)
        return None

sys.meta_path.insert(0, Spy())
for module in {modules!r}:
    __import__(module)
loaded = sorted(name for name in sys.modules if name.split(".")[0] in {heavy!r})
print(json.dumps({{"attempts": attempts, "loaded": loaded}}))
"""


@pytest.mark.parametrize(
    "modules", [["runner"], ["runner", "runner.cli", "runner.worker", "runner.console", "runner.curves"]]
)
def test_import_runner_leaves_tensorflow_keras_and_matplotlib_out(modules: list[str]) -> None:
    probe = PROBE.format(heavy=HEAVY, modules=modules)

    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=runner_env(), cwd=REPO, timeout=120
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"attempts": [], "loaded": []}


def test_the_probe_would_see_a_heavy_import() -> None:
    """The spy itself works: looking a heavy package up is recorded (without loading it)."""
    probe = PROBE.format(heavy=HEAVY, modules=["runner"]).replace(
        "for module in", "import importlib.util\nimportlib.util.find_spec('keras')\nfor module in"
    )

    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=runner_env(), timeout=120)

    assert done.returncode == 0, done.stderr
    assert "keras" in json.loads(done.stdout.strip().splitlines()[-1])["attempts"]


def test_every_folder_of_the_package_is_a_package_so_a_wheel_carries_it() -> None:
    """pyproject's ``packages.find`` takes only folders with an ``__init__.py``: a folder without one works in an
    editable install and is missing from the wheel users install."""
    folders = {path.parent for path in (REPO / "runner").rglob("*.py") if "__pycache__" not in path.parts}

    missing = sorted(str(folder.relative_to(REPO)) for folder in folders if not (folder / "__init__.py").is_file())

    assert missing == []
