"""docs/colab_quickstart.ipynb runs top to bottom in a real Jupyter kernel, on the bundled digits job.

The Colab-only cells are guarded by ``IN_COLAB`` in the notebook itself; here they are skipped because
``google.colab`` is not importable. What a user sees is checked: the job ends done, the status renders as a
table, the curves as a PNG, and a run of 10 epochs leaves a handful of outputs, not a flood of progress lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = REPO / "docs" / "colab_quickstart.ipynb"

pytestmark = pytest.mark.slow


def _outputs(cell: dict) -> list[dict]:
    return list(cell.get("outputs", []))


def _text(output: dict) -> str:
    if "text" in output:
        return str(output["text"])
    data = output.get("data", {})
    return str(data.get("text/plain", "")) + str(data.get("text/html", ""))


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("notebook")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env_before = dict(os.environ)
    os.environ["RUNNER_CACHE"] = str(workdir / "cache")
    os.environ.pop("RUNNER_QUEUE", None)
    os.environ.pop("COLAB_RELEASE_TAG", None)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env_before.get("PYTHONPATH", "")]))
    try:
        client = nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    return {"notebook": notebook, "workdir": workdir}


def _cell(notebook: dict, source_start: str) -> dict:
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code" and cell["source"].startswith(source_start):
            return cell
    raise AssertionError(f"no code cell starts with {source_start!r}")


def test_every_cell_runs_without_error(executed: dict) -> None:
    for cell in executed["notebook"]["cells"]:
        for output in _outputs(cell):
            assert output["output_type"] != "error", (cell["source"], output)


def test_the_digits_job_trains_to_done_in_the_notebook_queue(executed: dict) -> None:
    state = json.loads((executed["workdir"] / "notebook-queue" / "jobs" / "digits" / "state.json").read_text())
    assert state["status"] == "done"
    assert state["epoch"] == 10
    assert state["device"] == "CPU"


def test_status_renders_as_a_table_with_the_job(executed: dict) -> None:
    outputs = _outputs(_cell(executed["notebook"], "runner.status("))
    assert outputs, "the status cell showed nothing"
    data = outputs[-1]["data"]
    assert "<" in data["text/html"] and "digits" in data["text/html"] and "done" in data["text/html"]
    assert "digits" in data["text/plain"]


def test_plot_renders_as_a_png(executed: dict) -> None:
    outputs = _outputs(_cell(executed["notebook"], 'runner.plot("digits"'))
    pngs = [output["data"]["image/png"] for output in outputs if "image/png" in output.get("data", {})]
    assert len(pngs) == 1 and len(pngs[0]) > 1000


def test_the_resume_cell_does_not_flood_the_notebook(executed: dict) -> None:
    outputs = _outputs(_cell(executed["notebook"], "result = runner.work("))
    text = "".join(_text(output) for output in outputs)
    # One summary line per epoch, a few lines about the session: not one output per training step.
    assert len(outputs) < 40, len(outputs)
    assert text.count("digits epoch") >= 10
    assert "digits epoch 10/10" in text
    assert len(text) < 20_000


def test_the_tutorial_spec_in_the_notebook_is_valid_and_matches_the_jobs_folder(executed: dict) -> None:
    from runner.spec import load_spec

    cell = _cell(executed["notebook"], "cats_vs_dogs = {")
    assert not [output for output in _outputs(cell) if output["output_type"] == "error"]
    bundled = load_spec(REPO / "jobs" / "cats_vs_dogs.yaml")
    assert bundled.dataset.source in cell["source"]
    assert f'"epochs": {bundled.training.epochs}' in cell["source"]


def test_the_committed_notebook_has_no_outputs() -> None:
    # Outputs in the repository would show a stale run, and grow the file with every change.
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook["cells"] if cell["cell_type"] == "code")
    assert Path(NOTEBOOK).stat().st_size < 50_000
