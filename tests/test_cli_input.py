"""The bad-input contract of the `runner` command, through real processes.

Bad input gives exit code 2, one line per problem naming the field, no traceback, and writes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner.queue import Queue
from runner.spec import load_spec
from tests.conftest import REPO, make_spec, make_spec_dict, run_cli, runner_env, write_spec


def _files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


def _assert_clean_exit(result: subprocess.CompletedProcess[str], code: int) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output


def _error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _spec_text(name: str = "job-a", **sections: object) -> str:
    return yaml.safe_dump(make_spec_dict(name, **sections))


INVALID_SPECS = {
    "yaml-syntax-error": ("name: broken\ndataset:\n\tsource: /data\n", ["line 3, column 1: invalid YAML"]),
    "unknown-field": (_spec_text(training={"epochz": 3}), ["training.epochz: unknown field"]),
    "wrong-type": (_spec_text(dataset={"batch_size": "twenty"}), ["dataset.batch_size: "]),
    "zero-epochs": (_spec_text(training={"epochs": 0}), ["training.epochs: "]),
    "name-with-slash": (_spec_text("cats/dogs"), ["name: "]),
    "name-with-dots": (_spec_text("cats..dogs"), ["name: "]),
    "builtin-and-factory": (_spec_text(model={"builtin": "simple_cnn", "factory": "my.models:build"}), ["model: "]),
    "neither-builtin-nor-factory": (_spec_text(model={"builtin": None, "factory": None, "params": {}}), ["model: "]),
    "two-problems": (
        _spec_text(training={"epochs": -1, "colour": "red"}),
        ["training.epochs: ", "training.colour: unknown field"],
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_SPECS))
def test_submit_of_an_invalid_spec_exits_2_with_one_line_per_problem(tmp_path: Path, case: str) -> None:
    text, expected = INVALID_SPECS[case]
    spec = tmp_path / "spec.yaml"
    spec.write_text(text, encoding="utf-8")
    queue_dir = tmp_path / "queue"

    result = run_cli("submit", str(spec), "--queue", str(queue_dir))

    _assert_clean_exit(result, 2)
    lines = _error_lines(result)
    assert len(lines) == len(expected), result.stderr
    assert all(str(spec) in line for line in lines), lines
    for problem in expected:
        assert len([line for line in lines if f": {problem}" in line]) == 1, (problem, lines)
    assert _files_under(queue_dir) == []


def test_problem_lines_show_names_and_paths_exactly_as_given(tmp_path: Path) -> None:
    folder = tmp_path / "[bold]specs"  # square brackets are common in Drive folder names
    folder.mkdir()
    spec = folder / "markup.yaml"
    spec.write_text(_spec_text("[/]bad"), encoding="utf-8")
    queue_dir = tmp_path / "queue"

    result = run_cli("submit", str(spec), "--queue", str(queue_dir))

    _assert_clean_exit(result, 2)
    [line] = _error_lines(result)
    assert str(spec) in line, line
    assert "name: " in line and "'[/]bad'" in line, line
    assert _files_under(queue_dir) == []


def test_submit_writes_nothing_when_one_of_several_specs_is_invalid(tmp_path: Path) -> None:
    good_one = write_spec(tmp_path, "good-one")
    good_two = write_spec(tmp_path, "good-two")
    bad = write_spec(tmp_path, "bad-one", training={"epochs": 0})
    queue_dir = tmp_path / "queue"

    result = run_cli("submit", str(good_one), str(bad), str(good_two), "--queue", str(queue_dir))

    _assert_clean_exit(result, 2)
    [line] = _error_lines(result)
    assert str(bad) in line and "training.epochs: " in line, line
    assert _files_under(queue_dir) == []


def test_submit_of_two_specs_with_the_same_name_exits_2(tmp_path: Path) -> None:
    first = write_spec(tmp_path, "twin")
    second = tmp_path / "other.yaml"
    second.write_text(_spec_text("twin", training={"epochs": 7}), encoding="utf-8")
    queue_dir = tmp_path / "queue"

    result = run_cli("submit", str(first), str(second), "--queue", str(queue_dir))

    _assert_clean_exit(result, 2)
    [line] = _error_lines(result)
    assert "'twin'" in line and "more than one spec" in line, line
    assert _files_under(queue_dir) == []


def test_submitting_the_same_spec_twice_is_not_an_error(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "same-twice")
    queue_dir = tmp_path / "queue"

    first = run_cli("submit", str(spec), "--queue", str(queue_dir))
    _assert_clean_exit(first, 0)
    assert "submitted same-twice" in first.stderr
    frozen = queue_dir / "jobs" / "same-twice" / "spec.yaml"
    before = frozen.read_bytes()

    second = run_cli("submit", str(spec), "--queue", str(queue_dir))
    _assert_clean_exit(second, 0)
    assert "already in the queue" in second.stderr
    assert "same-twice" in second.stderr
    assert frozen.read_bytes() == before
    assert Queue(queue_dir).names() == ["same-twice"]


def test_a_different_spec_under_an_existing_name_exits_2_and_says_what_to_do(queue: Queue, tmp_path: Path) -> None:
    queue.submit(make_spec("taken", training={"epochs": 3}))
    changed = write_spec(tmp_path, "taken", training={"epochs": 30})

    result = run_cli("submit", str(changed), "--queue", str(queue.root))

    _assert_clean_exit(result, 2)
    [line] = _error_lines(result)
    assert "'taken'" in line, line
    assert "another name" in line or "runner retry" in line, line
    assert load_spec(queue.paths.job("taken").spec).training.epochs == 3
    assert queue.names() == ["taken"]


def test_schema_prints_the_json_schema(tmp_path: Path) -> None:
    result = run_cli("schema")
    _assert_clean_exit(result, 0)
    schema = json.loads(result.stdout)
    assert {"name", "dataset", "model", "training", "checkpoint", "export"} <= set(schema["properties"])


def test_status_of_an_empty_queue_exits_0(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("status", "--queue", str(empty))
    _assert_clean_exit(result, 0)
    assert result.stdout.strip()


def test_status_json_of_an_empty_queue_is_an_empty_array(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("status", "--json", "--queue", str(empty))
    _assert_clean_exit(result, 0)
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize("command", ["cancel", "retry", "logs"])
def test_commands_on_a_missing_job_fail_in_one_line(tmp_path: Path, command: str) -> None:
    queue_dir = tmp_path / "queue"
    queue_dir.mkdir()

    result = run_cli(command, "nosuchjob", "--queue", str(queue_dir))

    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    [line] = _error_lines(result)
    assert "nosuchjob" in line, line
    assert _files_under(queue_dir) == []


def test_a_missing_job_name_with_square_brackets_is_shown_as_given(tmp_path: Path) -> None:
    result = run_cli("cancel", "[/]nosuch", "--queue", str(tmp_path))
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    [line] = _error_lines(result)
    assert "'[/]nosuch'" in line, line


def test_an_unknown_command_exits_2(tmp_path: Path) -> None:
    result = run_cli("frobnicate", "--queue", str(tmp_path / "queue"))
    _assert_clean_exit(result, 2)
    assert "frobnicate" in result.stderr
    assert _files_under(tmp_path / "queue") == []


def test_an_unknown_trainer_fails_before_any_job_is_claimed(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    job, _ = queue.submit(make_spec("job-a"))
    result = run_cli("work", "--queue", str(queue.root), env=runner_env(RUNNER_TRAINER="nosuch.module:Trainer"))
    _assert_clean_exit(result, 1)
    assert "cannot load trainer 'nosuch.module:Trainer'" in result.stderr
    assert job.read_state().generation == 0  # never claimed


def test_work_with_nothing_runnable_does_not_load_the_trainer(tmp_path: Path) -> None:
    # A trainer module that exists but would fail loudly if imported.
    (tmp_path / "explosive_trainer.py").write_text("raise SystemExit('imported!')\n")
    env = runner_env(RUNNER_TRAINER="explosive_trainer:Trainer")
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    (tmp_path / "queue").mkdir()  # a queue with no jobs
    result = run_cli("work", "--queue", str(tmp_path / "queue"), env=env)
    _assert_clean_exit(result, 0)
    assert "imported!" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["work"], ["logs", "job"], ["cancel", "job"]])
def test_a_queue_folder_that_does_not_exist_is_named_with_how_it_was_chosen(
    tmp_path: Path, command: list[str]
) -> None:
    mistyped = tmp_path / "runner-queeu"
    given = run_cli(*command, "--queue", str(mistyped))
    from_environment = run_cli(*command, env=runner_env(RUNNER_QUEUE=str(mistyped)))
    for result, chosen in ((given, "as given"), (from_environment, "from $RUNNER_QUEUE")):
        _assert_clean_exit(result, 1)
        [line] = result.stderr.splitlines()
        assert line.startswith(f"error: no queue folder at {mistyped} ({chosen}):"), line
        assert result.stdout == ""
    assert not mistyped.exists()  # nothing made where nothing was asked for


def test_the_default_queue_folder_is_named_as_the_default(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runner", "status"], capture_output=True, text=True, env=runner_env(), cwd=tmp_path,
        timeout=120,
    )  # fmt: skip
    _assert_clean_exit(result, 1)
    assert f"no queue folder at {tmp_path / 'runner-queue'} (the default: ./runner-queue in the current folder)" in (
        result.stderr
    )


def test_submit_creates_the_queue_folder(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "job")
    assert run_cli("submit", str(spec), "--queue", str(tmp_path / "new-queue")).returncode == 0
    listed = run_cli("status", "--json", "--queue", str(tmp_path / "new-queue"))
    assert listed.returncode == 0 and [row["name"] for row in json.loads(listed.stdout)] == ["job"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RUNNER_RETRY_BUDGET", "abc"),
        ("RUNNER_RETRY_BUDGET", "-5"),
        ("RUNNER_RETRY_BUDGET", "nan"),
        ("RUNNER_LEASE_DURATION", "0"),
        ("RUNNER_LEASE_DURATION", "soon"),
    ],
)
def test_a_bad_setting_in_the_environment_is_one_line_naming_it(tmp_path: Path, variable: str, value: str) -> None:
    queue_dir = tmp_path / "queue"
    spec = write_spec(tmp_path, "job-a")

    result = run_cli("submit", "--queue", str(queue_dir), str(spec), env=runner_env(**{variable: value}))

    _assert_clean_exit(result, 2)
    (line,) = _error_lines(result)
    assert line.startswith(f"error: {variable} must be ") and repr(value) in line
    assert _files_under(queue_dir) == []


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_a_closed_pipe_ends_status_quietly(tmp_path: Path, as_json: bool) -> None:
    """`runner status | head`: the reader went away before runner wrote; no traceback, no "please report it"."""
    queue = Queue(tmp_path / "queue")
    for index in range(3):
        queue.submit(make_spec(f"job-{index}"))
    buffered = {key: value for key, value in runner_env().items() if key != "PYTHONUNBUFFERED"}  # as in a shell
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before runner writes a byte: its first write fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "runner", "status", "--queue", str(queue.root), *(["--json"] if as_json else [])],
            stdout=write_end, stderr=subprocess.PIPE, text=True, env=buffered, cwd=REPO, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
