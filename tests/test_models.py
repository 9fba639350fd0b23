"""Models: built-in networks, the user's factory, the loss-for-labels check and compiling; real Keras, tiny shapes."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from runner.errors import ModelError, RunnerError, SpecError
from runner.spec import JobSpec, parse_spec
from runner.train.models.build import build_model, check_loss_matches_labels, compile_model

# Keras's TensorFlow backend trips NumPy 2's copy-keyword deprecation on every weight it reads; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

TINY = (16, 16, 3)
MOBILE = (32, 32, 3)
LOSS_FOR = {
    "binary": "binary_crossentropy",
    "categorical": "categorical_crossentropy",
    "int": "sparse_categorical_crossentropy",
}

# Written out here rather than read from the module, so that a change to the module's table shows up as a failure.
FITS = {
    ("binary", "binary_crossentropy"),
    ("binary", "hinge"),
    ("binary", "mean_squared_error"),
    ("binary", "mean_absolute_error"),
    ("categorical", "categorical_crossentropy"),
    ("categorical", "mean_squared_error"),
    ("categorical", "mean_absolute_error"),
    ("int", "sparse_categorical_crossentropy"),
}
LOSSES = sorted({loss for _, loss in FITS})


def make_spec(
    *,
    label_mode: str = "binary",
    loss: str | None = None,
    builtin: str | None = "simple_cnn",
    factory: str | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    **training: Any,
) -> JobSpec:
    """A valid spec; the loss defaults to the one that fits ``label_mode``."""
    model: dict[str, Any] = {"factory": factory} if factory else {"builtin": builtin}
    model["params"] = params or {}
    return parse_spec(
        {
            "name": "models",
            "dataset": {"source": "/data/unused", "label_mode": label_mode},
            "model": model,
            "training": {"loss": loss or LOSS_FOR[label_mode], "seed": seed, **training},
        }
    )


def layer_types(model: Any) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


def pixels(shape: tuple[int, int, int], *, batch: int = 2) -> np.ndarray:
    """Raw float32 pixels in [0, 255], as the data pipeline hands them over."""
    return np.random.default_rng(7).uniform(0, 255, size=(batch, *shape)).astype("float32")


def same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# --- simple_cnn ------------------------------------------------------------------------------------------------


def test_simple_cnn_is_the_tutorial_network_with_a_sigmoid_head_for_binary_labels() -> None:
    model = build_model(make_spec(), input_shape=TINY, num_classes=2)

    assert layer_types(model) == ["Rescaling", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"]
    rescaling, conv, pool, _, dense, head = model.layers
    assert rescaling.scale == pytest.approx(1 / 255) and rescaling.offset == 0
    assert (conv.filters, conv.kernel_size, conv.activation.__name__) == (32, (3, 3), "relu")
    assert pool.pool_size == (2, 2)
    assert (dense.units, dense.activation.__name__) == (512, "relu")
    assert (head.units, head.activation.__name__) == (1, "sigmoid")
    assert model.output_shape == (None, 1)


@pytest.mark.parametrize("label_mode", ["categorical", "int"])
def test_simple_cnn_has_a_softmax_over_the_classes_for_categorical_and_int_labels(label_mode: str) -> None:
    model = build_model(make_spec(label_mode=label_mode), input_shape=TINY, num_classes=5)

    head = model.layers[-1]
    assert (head.units, head.activation.__name__) == (5, "softmax")
    assert np.sum(model(pixels(TINY)), axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_the_tutorial_network_has_89_7_million_parameters() -> None:
    """150x150x3 → Conv2D 32 (896) → 74x74x32 after pooling → Dense 512 (89,719,296) → Dense 1 (513)."""
    model = build_model(make_spec(), input_shape=(150, 150, 3), num_classes=2)

    assert model.count_params() == 89_720_705


def test_simple_cnn_params_set_filters_and_dense_and_grayscale_input_works() -> None:
    model = build_model(make_spec(params={"filters": 4, "dense": 8}), input_shape=(16, 16, 1), num_classes=2)

    assert model.layers[1].filters == 4 and model.layers[4].units == 8
    assert model(pixels((16, 16, 1))).shape == (2, 1)


def test_dropout_and_augment_add_seeded_layers_where_the_tutorial_puts_them() -> None:
    model = build_model(make_spec(params={"dropout": 0.5, "augment": True}), input_shape=TINY, num_classes=2)

    assert layer_types(model) == [
        "RandomFlip", "RandomRotation", "Rescaling", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dropout", "Dense",
    ]  # fmt: skip
    flip, rotation, dropout = model.layers[0], model.layers[1], model.layers[7]
    assert flip.get_config()["mode"] == "horizontal"
    assert rotation.get_config()["factor"] in (0.1, (-0.1, 0.1))
    assert dropout.rate == 0.5
    # Seeds are in the layers' configs, so a saved model keeps them too.
    assert all(layer.get_config()["seed"] is not None for layer in (flip, rotation, dropout))


def test_the_same_seed_builds_the_same_weights_and_the_same_random_layers() -> None:
    def build(seed: int) -> tuple[list[np.ndarray], np.ndarray, list[int]]:
        spec = make_spec(params={"filters": 4, "dense": 8, "dropout": 0.5, "augment": True}, seed=seed)
        model = build_model(spec, input_shape=TINY, num_classes=2)
        outputs = keras.ops.convert_to_numpy(model(pixels(TINY, batch=4), training=True))
        seeds = [layer.get_config()["seed"] for layer in model.layers if "seed" in layer.get_config()]
        return model.get_weights(), outputs, seeds

    weights, outputs, seeds = build(3)
    again_weights, again_outputs, again_seeds = build(3)
    other_weights, other_outputs, other_seeds = build(4)

    assert same_weights(weights, again_weights) and np.array_equal(outputs, again_outputs) and seeds == again_seeds
    assert not same_weights(weights, other_weights)
    assert not np.array_equal(outputs, other_outputs)
    assert len(set(seeds)) == 3 and set(seeds).isdisjoint(other_seeds)


def unchecked(spec: JobSpec, params: dict[str, Any]) -> JobSpec:
    """``spec`` with ``params`` that skipped the spec's checks: a job folder written by an older runner."""
    return spec.model_copy(update={"model": spec.model.model_copy(update={"params": params})})


def test_an_unknown_simple_cnn_param_is_refused_with_the_allowed_ones() -> None:
    allowed = "allowed: filters, dense, dropout, augment"
    with pytest.raises(SpecError, match=rf"model.params: 'steps' not known to simple_cnn; {allowed}$"):
        make_spec(params={"steps": 4})
    with pytest.raises(ModelError, match=rf"model.params: 'steps' not known to simple_cnn; {allowed}$"):
        build_model(unchecked(make_spec(), {"steps": 4}), input_shape=TINY, num_classes=2)


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"filters": "abc"}, "filters"),
        ({"filters": 2.5}, "filters"),
        ({"dense": 0}, "dense"),
        ({"dense": True}, "dense"),
        ({"dropout": 1.5}, "dropout"),
        ({"dropout": "half"}, "dropout"),
        ({"augment": "yes"}, "augment"),
    ],
)
def test_a_bad_simple_cnn_param_value_is_refused_naming_it(params: dict[str, Any], name: str) -> None:
    with pytest.raises(SpecError, match=rf"model\.params\.{name} must be .*, got {params[name]!r}"):
        make_spec(params=params)
    with pytest.raises(ModelError, match=rf"model\.params\.{name} must be .*, got {params[name]!r}"):
        build_model(unchecked(make_spec(), params), input_shape=TINY, num_classes=2)


@pytest.mark.parametrize(("label_mode", "num_classes"), [("binary", 3), ("categorical", 1), ("int", 0)])
def test_a_class_count_the_labels_cannot_have_is_a_model_error(label_mode: str, num_classes: int) -> None:
    with pytest.raises(ModelError, match="class"):
        build_model(make_spec(label_mode=label_mode), input_shape=TINY, num_classes=num_classes)


# --- loss against labels -------------------------------------------------------------------------------------


def spec_from_an_older_runner(*, label_mode: str, loss: str) -> JobSpec:
    """A spec as a job folder written before the loss was checked at submit may hold it (not validated again)."""
    spec = make_spec(label_mode=label_mode)
    training = spec.training.model_copy(update={"loss": loss})
    return spec.model_copy(update={"training": training})


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("label_mode", ["binary", "categorical", "int"])
def test_the_loss_must_fit_the_label_mode(label_mode: str, loss: str) -> None:
    if (label_mode, loss) in FITS:
        check_loss_matches_labels(make_spec(label_mode=label_mode, loss=loss))
        return
    with pytest.raises(SpecError) as refused:  # at submit, one line naming both fields
        make_spec(label_mode=label_mode, loss=loss)
    with pytest.raises(ModelError) as caught:  # and again when a worker starts an older folder's job
        check_loss_matches_labels(spec_from_an_older_runner(label_mode=label_mode, loss=loss))
    fitting = [mode for mode, fit in FITS if fit == loss]
    message = str(caught.value)
    assert refused.value.problems == [message]
    assert message.startswith(f"training.loss {loss!r} does not fit dataset.label_mode {label_mode!r}: ")
    assert f"use {LOSS_FOR[label_mode]}, or label_mode: " in message
    assert all(mode in message.rsplit("label_mode: ", 1)[1] for mode in fitting)
    assert "\n" not in message and isinstance(caught.value, RunnerError)


def test_the_loss_mismatch_message_reads_as_designed() -> None:
    with pytest.raises(SpecError) as caught:
        make_spec(label_mode="binary", loss="categorical_crossentropy")

    assert caught.value.problems == [
        "training.loss 'categorical_crossentropy' does not fit dataset.label_mode 'binary': "
        "use binary_crossentropy, or label_mode: categorical"
    ]


# --- compiling ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("adam", "Adam"), ("adamw", "AdamW"), ("sgd", "SGD"),
        ("rmsprop", "RMSprop"), ("adagrad", "Adagrad"), ("nadam", "Nadam"),
    ],  # fmt: skip
)
def test_compile_uses_the_named_optimizer_and_learning_rate(name: str, cls: str) -> None:
    spec = make_spec(params={"filters": 2, "dense": 4}, optimizer=name, learning_rate=0.025)
    model = build_model(spec, input_shape=TINY, num_classes=2)

    compile_model(model, spec)

    assert type(model.optimizer).__name__ == cls
    assert float(model.optimizer.learning_rate) == pytest.approx(0.025)


@pytest.mark.parametrize("label_mode", ["binary", "categorical", "int"])
def test_a_compiled_model_trains_a_batch_and_reports_loss_and_metrics(label_mode: str) -> None:
    # AUC needs one column per class: Keras cannot compute it from int labels.
    metrics = ["accuracy"] if label_mode == "int" else ["accuracy", "auc"]
    spec = make_spec(label_mode=label_mode, params={"filters": 2, "dense": 4}, metrics=metrics)
    model = build_model(spec, input_shape=TINY, num_classes=3 if label_mode != "binary" else 2)
    compile_model(model, spec)
    labels = {"binary": [[0.0], [1.0]], "categorical": [[1.0, 0, 0], [0, 0, 1.0]], "int": [0, 2]}[label_mode]

    logs = model.train_on_batch(pixels(TINY), np.array(labels, dtype="float32"), return_dict=True)

    assert set(logs) == {"loss", *metrics}
    assert all(np.isfinite(value) for value in logs.values())


def test_an_unknown_metric_is_a_model_error_naming_it() -> None:
    spec = make_spec(params={"filters": 2, "dense": 4}, metrics=["accuracy", "acuracy"])
    model = build_model(spec, input_shape=TINY, num_classes=2)

    with pytest.raises(ModelError, match=r"training.metrics: unknown metric 'acuracy'"):
        compile_model(model, spec)


# --- mobilenet_v2 ------------------------------------------------------------------------------------------------


def mobilenet_spec(label_mode: str = "binary", **params: Any) -> JobSpec:
    return make_spec(label_mode=label_mode, builtin="mobilenet_v2", params={"alpha": 0.35, **params})


def base_of(model: Any) -> Any:
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def test_mobilenet_v2_without_weights_builds_frozen_and_runs_on_raw_pixels() -> None:
    model = build_model(mobilenet_spec("int"), input_shape=MOBILE, num_classes=4)

    assert layer_types(model) == ["InputLayer", "Rescaling", "Functional", "GlobalAveragePooling2D", "Dropout", "Dense"]
    rescaling, base, dropout, head = model.layers[1], base_of(model), model.layers[4], model.layers[5]
    assert rescaling.scale == pytest.approx(1 / 127.5) and rescaling.offset == -1.0
    assert base.trainable is False and model.trainable_weights == head.trainable_weights
    assert dropout.rate == 0.2 and dropout.get_config()["seed"] is not None
    assert (head.units, head.activation.__name__) == (4, "softmax")
    outputs = keras.ops.convert_to_numpy(model(pixels(MOBILE)))
    assert outputs.shape == (2, 4) and np.sum(outputs, axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_mobilenet_v2_trainable_base_and_dropout_params() -> None:
    model = build_model(mobilenet_spec(trainable_base=True, dropout=0.4), input_shape=MOBILE, num_classes=2)

    assert base_of(model).trainable is True and len(model.trainable_weights) > 2
    assert model.layers[4].rate == 0.4 and model.output_shape == (None, 1)


def test_mobilenet_v2_weights_not_on_this_machine_are_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"'no/such/weights.h5' is not a file on this machine: give the path of"):
        build_model(mobilenet_spec(weights="no/such/weights.h5"), input_shape=MOBILE, num_classes=2)


def test_mobilenet_v2_loads_weights_from_a_local_file(tmp_path: Path) -> None:
    keras.utils.set_random_seed(123)
    saved = keras.applications.MobileNetV2(include_top=False, input_shape=MOBILE, weights=None, alpha=0.35)
    path = tmp_path / "base.weights.h5"
    saved.save_weights(path)

    model = build_model(mobilenet_spec(weights=str(path)), input_shape=MOBILE, num_classes=2)

    assert same_weights(base_of(model).get_weights(), saved.get_weights())


def test_mobilenet_v2_loads_the_legacy_h5_files_keras_applications_publishes(tmp_path: Path) -> None:
    """The files users download (``..._no_top.h5``) are Keras 2 weight files, not ``.weights.h5`` ones."""
    legacy = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")
    h5py = pytest.importorskip("h5py")
    keras.utils.set_random_seed(321)
    saved = keras.applications.MobileNetV2(include_top=False, input_shape=MOBILE, weights=None, alpha=0.35)
    path = tmp_path / "mobilenet_v2_no_top.h5"
    with h5py.File(path, "w") as file:
        legacy.save_weights_to_hdf5_group(file, saved)

    model = build_model(mobilenet_spec(weights=str(path)), input_shape=MOBILE, num_classes=2)

    assert same_weights(base_of(model).get_weights(), saved.get_weights())


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_mobilenet_v2_weights_for_another_alpha_are_a_model_error_naming_params(tmp_path: Path) -> None:
    other = keras.applications.MobileNetV2(include_top=False, input_shape=MOBILE, weights=None, alpha=0.5)
    path = tmp_path / "alpha-0.5.weights.h5"
    other.save_weights(path)

    with pytest.raises(ModelError) as caught:
        build_model(mobilenet_spec(weights=str(path)), input_shape=MOBILE, num_classes=2)

    message = str(caught.value)
    assert message.startswith(f"model.params.weights {str(path)!r} does not fit mobilenet_v2 with input shape [32, 32, 3]")
    assert message.endswith(": give the weights file saved for these settings (for mobilenet_v2, the same alpha)")
    assert "\n" not in message and len(message) < 600


def test_mobilenet_v2_params_are_checked_at_submit_and_again_at_build(tmp_path: Path) -> None:
    cases = [({"steps": 1}, "not known to mobilenet_v2"), ({"alpha": "big"}, r"params\.alpha"),
             ({"trainable_base": "no"}, r"params\.trainable_base"), ({"weights": "weights.bin"}, r"\.h5")]  # fmt: skip
    for params, match in cases:
        with pytest.raises(SpecError, match=match):
            mobilenet_spec(**params)
        with pytest.raises(ModelError, match=match):
            build_model(unchecked(mobilenet_spec(), {"alpha": 0.35, **params}), input_shape=MOBILE, num_classes=2)
    with pytest.raises(ModelError, match=r"at least 32x32 pixels, got 16x16: raise dataset.image_size"):
        build_model(mobilenet_spec(), input_shape=TINY, num_classes=2)


# --- factories ---------------------------------------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Writes a module into the working directory (as next to a notebook) and returns its (unique) name."""
    monkeypatch.chdir(tmp_path)
    names: list[str] = []

    def write(source: str) -> str:
        name = f"user_models_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_a_factory_next_to_the_notebook_builds_the_model_with_the_params(user_module: Callable[[str], str]) -> None:
    module = user_module(
        """
        import keras

        def build(input_shape, num_classes, units=1):
            inputs = keras.Input(shape=input_shape)
            x = keras.layers.Flatten()(inputs)
            return keras.Model(inputs, keras.layers.Dense(num_classes * units, name="out")(x), name="mine")
        """
    )
    path_before = list(sys.path)

    spec = make_spec(label_mode="categorical", factory=f"{module}:build", params={"units": 2})

    model = build_model(spec, input_shape=TINY, num_classes=3)

    assert model.name == "mine" and model.input_shape == (None, *TINY) and model.output_shape == (None, 6)
    assert sys.path == path_before


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("def build(**kwargs):\n    return 'a model'\n", r"^factory '{f}' returned str, not a keras\.Model$"),
        (
            "def build(**kwargs):\n    raise ValueError('no such\\n backbone')\n",
            r"^factory '{f}' raised ValueError: no such backbone$",
        ),
        ("def build(input_shape):\n    return None\n", r"^factory '{f}' raised TypeError: .*num_classes"),
        (
            "def other(**kwargs):\n    return None\n",
            r"^cannot import factory '{f}': module '{m}' has no attribute 'build'$",
        ),
        ("build = 3\n", r"^factory '{f}' is not a function \(it is int\)$"),
        ("raise RuntimeError('broken at import')\n", r"^cannot import factory '{f}': RuntimeError: broken at import$"),
        ("import not_installed_pkg_xyz\n", r"needs 'not_installed_pkg_xyz': install it"),
    ],
)
def test_a_factory_that_does_not_give_a_model_is_a_model_error(
    user_module: Callable[[str], str], body: str, match: str
) -> None:
    module = user_module(body)
    factory = f"{module}:build"

    with pytest.raises(ModelError, match=match.format(f=factory, m=module)):
        build_model(make_spec(factory=factory), input_shape=TINY, num_classes=2)


def test_a_missing_factory_module_is_a_model_error_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ModelError) as caught:
        build_model(make_spec(factory="nowhere_pkg.models:build"), input_shape=TINY, num_classes=2)

    assert str(caught.value) == (
        "cannot import factory 'nowhere_pkg.models:build': No module named 'nowhere_pkg': "
        "put the module on PYTHONPATH or next to the notebook, in the working directory"
    )
