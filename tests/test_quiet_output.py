"""What `runner work` prints on a plain terminal: runner's own lines, each once; no raw log records, no Keras or
TensorFlow chatter (a real process, real TensorFlow, the environment a user has: TF_CPP_MIN_LOG_LEVEL unset)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.support.keras_jobs import keras_env, make_digit_folders, submit_keras_spec
from tests.support.warm_start import COLD_START_ENV

pytestmark = pytest.mark.slow

NOISE = ("INFO:", "WARNING:", "E0000", "W0000", "oneDNN", "absl", "legacy")


def test_two_jobs_with_an_h5_export_print_each_line_once_and_no_library_chatter(tmp_path: Path) -> None:
    data = make_digit_folders(tmp_path / "digits")  # grayscale: the path that made oneDNN print an E line
    env = keras_env(tmp_path / "cache")
    env.pop("TF_CPP_MIN_LOG_LEVEL")
    env[COLD_START_ENV] = "1"  # a new interpreter, whose import of TensorFlow is what chatters
    queue = tmp_path / "queue"
    submit_keras_spec(tmp_path, queue, data, "first", env, training={"epochs": 1}, export={"formats": ["keras", "h5"]})
    submit_keras_spec(tmp_path, queue, data, "second", env, training={"epochs": 1}, priority=-1)

    result = run_cli("work", "--queue", str(queue), env=env, timeout=600)
    said = result.stdout + result.stderr

    assert result.returncode == 0, said[-3000:]
    assert [word for word in NOISE if word in said] == [], said
    for job in ("first", "second"):  # after the first job's .h5 export, lines used to come twice
        assert len(re.findall(rf"^{job} epoch 1/1 ", said, flags=re.MULTILINE)) == 1, said
        assert said.count(f"job '{job}' done") == 1, said


def test_verbose_lets_tensorflows_start_up_messages_through(tmp_path: Path) -> None:
    data = make_digit_folders(tmp_path / "digits")
    env = keras_env(tmp_path / "cache")
    env.pop("TF_CPP_MIN_LOG_LEVEL")
    queue = tmp_path / "queue"
    submit_keras_spec(tmp_path, queue, data, "loud", env, training={"epochs": 1})

    result = run_cli("work", "--verbose", "--queue", str(queue), env=env, timeout=600)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "oneDNN" in result.stderr, result.stderr[-3000:]  # TensorFlow's own line, which runner hides by default
    assert result.stderr.count("job 'loud' done") == 1
