"""The speed options against the stack a job lands on: what `auto` picks here, and one line for a misfit.

The misfits through a real `runner submit` / `runner work` are in the bad-input corpus (tests/corpus/); the
options' effect on training, through kills and resumes, is in tests/test_kill_resume.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

keras = pytest.importorskip("keras")

from runner.errors import TrainerError  # noqa: E402
from runner.spec import load_spec  # noqa: E402
from runner.train.backends.tensorflow import tensorflow_sees_a_gpu  # noqa: E402
from runner.train.engine.acceleration import MIXED_PRECISION_ON_CPU_ENV, configure_precision, resolve_jit_compile  # noqa: E402
from runner.train.engine.loop import AUTO_STEPS_PER_EXECUTION, resolve_steps_per_execution  # noqa: E402
from runner.train.models.build import build_model  # noqa: E402
from tests.support.keras_jobs import write_keras_spec  # noqa: E402

pytestmark = pytest.mark.skipif(tensorflow_sees_a_gpu(), reason="checks what the options do without a GPU")


def spec_with(tmp_path: Path, *, augment: bool = False, **training: object):  # noqa: ANN201
    params = {"filters": 2, "dense": 4, "augment": augment}
    return load_spec(write_keras_spec(tmp_path, "speed", tmp_path, model={"params": params}, training=training))


def test_steps_per_execution_auto_is_32_at_most_an_epoch() -> None:
    assert resolve_steps_per_execution("auto", 1000) == AUTO_STEPS_PER_EXECUTION == 32
    assert resolve_steps_per_execution("auto", 9) == 9
    assert resolve_steps_per_execution(4, 9) == 4
    assert resolve_steps_per_execution(100, 9) == 9


def test_mixed_precision_without_a_gpu_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MIXED_PRECISION_ON_CPU_ENV, raising=False)
    with pytest.raises(TrainerError, match=r"^training.mixed_precision: true needs a GPU.*set it to false") as error:
        configure_precision(spec_with(tmp_path, mixed_precision=True, deterministic=False))
    assert "\n" not in str(error.value)


def test_the_dtype_policy_is_set_for_each_job_so_the_next_job_is_float32_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MIXED_PRECISION_ON_CPU_ENV, "1")
    try:
        assert configure_precision(spec_with(tmp_path, mixed_precision=True)) == "mixed_float16"
        assert keras.config.dtype_policy().name == "mixed_float16"
        assert configure_precision(spec_with(tmp_path)) == "float32"
        assert keras.config.dtype_policy().name == "float32"
    finally:
        keras.config.set_dtype_policy("float32")


def test_xla_auto_is_off_without_a_gpu_and_true_names_the_layers_it_cannot_compile(tmp_path: Path) -> None:
    plain = spec_with(tmp_path, deterministic=False)
    model = build_model(plain, input_shape=(8, 8, 1), num_classes=3)
    assert resolve_jit_compile("auto", model, deterministic=False) is False
    assert resolve_jit_compile(True, model, deterministic=False) is True
    assert resolve_jit_compile(False, model, deterministic=False) is False

    augmented = build_model(spec_with(tmp_path, augment=True, deterministic=False), input_shape=(8, 8, 1), num_classes=3)
    with pytest.raises(TrainerError, match=r"XLA cannot compile the model's layer\(s\) random_rotation.*RandomRotation"):
        resolve_jit_compile(True, augmented, deterministic=False)
