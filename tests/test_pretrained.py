"""Pretrained networks: ImageNet weights fetched into the cache (checked, retried, served from 127.0.0.1), the
three bases equal to Keras' own ``weights="imagenet"`` models, their params refused at submit, and fine-tuning:
the top of the base unfrozen with a new optimizer, exact across kills.

The weights files are look-alikes of Keras' (:mod:`tests.support.imagenet_weights`): same format and names,
random weights, since the real ones cannot be downloaded here.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runner.errors import ModelError, SpecError
from runner.networks import BASE_LAYERS, PRETRAINED, imagenet_weights
from runner.spec import parse_spec
from tests.conftest import run_cli
from tests.support.data_server import Served, serve
from tests.support.imagenet_weights import lookalike_base, sums_of, write_lookalike
from tests.support.keras_jobs import job_of, keras_env, make_digit_folders, submit_keras_spec
from tests.support.kill_harness import (
    Kill,
    KillRun,
    Reference,
    assert_same_result,
    check_resumes,
    uninterrupted_run,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

KERAS_CLASS = {"mobilenet_v2": "MobileNetV2", "efficientnet_b0": "EfficientNetB0", "resnet50": "ResNet50"}
ALPHA = {"mobilenet_v2": 0.35, "efficientnet_b0": 1.0, "resnet50": 1.0}
SHAPE = (32, 32, 3)


@pytest.fixture(scope="module")
def lookalikes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Served path -> bytes: the three files ``weights: imagenet`` asks for at 32x32 (and MobileNetV2's alpha
    0.35)."""
    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for builtin in PRETRAINED:
        path = write_lookalike(folder, builtin, alpha=ALPHA[builtin], image_size=SHAPE[:2])
        files[f"/{path.name}"] = path.read_bytes()
    return files


@pytest.fixture
def mirror(lookalikes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """The look-alikes and their SHA256SUMS on 127.0.0.1, as ``$RUNNER_WEIGHTS_URL``."""
    with serve({**lookalikes, "/SHA256SUMS": sums_of(lookalikes)}) as served:
        monkeypatch.setenv("RUNNER_WEIGHTS_URL", served.base_url)
        yield served


def spec_of(builtin: str, *, epochs: int = 3, **params: Any):  # noqa: ANN201 (a JobSpec)
    if builtin == "mobilenet_v2":
        params.setdefault("alpha", ALPHA[builtin])
    return parse_spec(
        {
            "name": "pretrained",
            "dataset": {"source": "/data/unused", "image_size": list(SHAPE[:2]), "label_mode": "int"},
            "model": {"builtin": builtin, "params": params},
            "training": {"epochs": epochs, "loss": "sparse_categorical_crossentropy"},
        }
    )


def build(builtin: str, cache: Path, **params: Any):  # noqa: ANN201 (a keras.Model)
    from runner.train.models.build import build_model  # noqa: PLC0415 (TensorFlow only where a test needs it)

    return build_model(spec_of(builtin, **params), input_shape=SHAPE, num_classes=3, cache_dir=cache)


def pixels(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(3).uniform(0, 255, (batch, *SHAPE)).astype("float32")


# --- what runner knows of Keras' bases ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined or non-square")
@pytest.mark.parametrize("builtin", PRETRAINED)
def test_the_files_hashes_and_layer_counts_are_keras_own(builtin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """runner.networks is written out without TensorFlow; here it is checked against the Keras installed: the file
    ``weights="imagenet"`` asks for, its origin and hash, and the layers of the base."""
    import keras  # noqa: PLC0415
    from keras.src.utils import file_utils  # noqa: PLC0415 (where keras.applications fetches its weights)

    asked: dict[str, Any] = {}

    def record(fname: str, origin: str, **options: Any) -> str:
        asked.update(fname=fname, origin=origin, file_hash=options.get("file_hash"))
        raise LookupError("recorded")

    monkeypatch.setattr(file_utils, "get_file", record)
    options = {"alpha": ALPHA[builtin]} if builtin == "mobilenet_v2" else {}
    with pytest.raises(LookupError):
        getattr(keras.applications, KERAS_CLASS[builtin])(include_top=False, weights="imagenet", input_shape=SHAPE, **options)
    ours = imagenet_weights(builtin, alpha=ALPHA[builtin], image_size=SHAPE[:2])
    assert (ours.file, ours.origin, ours.md5) == (asked["fname"], asked["origin"], asked["file_hash"])

    base = getattr(keras.applications, KERAS_CLASS[builtin])(include_top=False, weights=None, input_shape=SHAPE, **options)
    assert BASE_LAYERS[builtin] == len(base.layers) - 1  # the input layer is not one to unfreeze


@pytest.mark.parametrize("builtin", PRETRAINED)
def test_each_network_computes_what_keras_own_imagenet_model_does_on_raw_pixels(
    builtin: str, mirror: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runner's network on raw 0-255 pixels gives the features Keras' ``weights="imagenet"`` model gives on
    ``preprocess_input`` of them: the preprocessing, ResNet50's channel order and EfficientNet's extra division
    are all right."""
    import keras  # noqa: PLC0415
    from keras.src.utils import file_utils  # noqa: PLC0415

    model = build(builtin, tmp_path / "cache", weights="imagenet")
    features = keras.Model(model.input, model.get_layer(index=len(model.layers) - 3).output)  # the pooling's

    served = tmp_path / "served"
    served.mkdir()
    for name, body in mirror.files.items():
        (served / name.lstrip("/")).write_bytes(body)
    monkeypatch.setattr(file_utils, "get_file", lambda fname, *args, **options: str(served / fname))
    options = {"alpha": ALPHA[builtin]} if builtin == "mobilenet_v2" else {}
    with pytest.warns() if builtin == "mobilenet_v2" else _nothing():  # MobileNetV2 says 32x32 takes the 224 file
        theirs = getattr(keras.applications, KERAS_CLASS[builtin])(
            include_top=False, weights="imagenet", input_shape=SHAPE, pooling="avg", **options
        )
    preprocess = getattr(keras.applications, {"efficientnet_b0": "efficientnet"}.get(builtin, builtin)).preprocess_input

    x = pixels()
    expected = keras.ops.convert_to_numpy(theirs(preprocess(x.copy()), training=False))
    got = keras.ops.convert_to_numpy(features(x, training=False))
    scale = float(np.max(np.abs(expected)))
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * scale)


class _nothing:  # noqa: N801 (a context manager that expects nothing)
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def test_a_snapshot_of_efficientnet_loads_into_a_network_built_without_its_weights(mirror: Served, tmp_path: Path) -> None:
    """A resumed session builds the network without downloading its weights and loads the checkpoint's: the
    Normalization layer of EfficientNet's base must then compute with the loaded mean and variance, not the ones
    it was built with (Keras computes them once, at load_weights)."""
    import keras  # noqa: PLC0415

    from runner.train.snapshots.snapshot import TrainingState, load_snapshot, save_snapshot  # noqa: PLC0415

    trained = build("efficientnet_b0", tmp_path / "cache", weights="imagenet")
    trained.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    trained.optimizer.build(trained.trainable_variables)
    save_snapshot(trained, TrainingState(epoch=1), tmp_path / "snapshot")

    from runner.train.models.build import build_model  # noqa: PLC0415

    fresh = build_model(
        spec_of("efficientnet_b0", weights="imagenet"), input_shape=SHAPE, num_classes=3, pretrained=False
    )
    fresh.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    fresh.optimizer.build(fresh.trainable_variables)
    load_snapshot(fresh, tmp_path / "snapshot", checkpoint="c")

    x = pixels()
    expected = keras.ops.convert_to_numpy(trained(x, training=False))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fresh(x, training=False)), expected)


# --- fetching the weights --------------------------------------------------------------------------------------


def fetch(builtin: str, cache: Path, **environ: str) -> Path:
    from runner.train.models.imagenet import fetch_imagenet_weights  # noqa: PLC0415

    published = imagenet_weights(builtin, alpha=ALPHA[builtin], image_size=SHAPE[:2])
    return fetch_imagenet_weights(published, cache_dir=cache, environ=environ)


def cache_files(cache: Path) -> set[str]:
    return {path.name for path in (cache / "weights").iterdir() if not path.name.endswith(".lock")}


def test_weights_are_fetched_once_checked_against_the_mirror_sums_and_reused(
    lookalikes: dict[str, bytes], tmp_path: Path
) -> None:
    file = imagenet_weights("mobilenet_v2", alpha=0.35, image_size=SHAPE[:2]).file
    with serve({**lookalikes, "/SHA256SUMS": sums_of(lookalikes)}) as served:
        first = fetch("mobilenet_v2", tmp_path, RUNNER_WEIGHTS_URL=served.base_url)
        again = fetch("mobilenet_v2", tmp_path, RUNNER_WEIGHTS_URL=served.base_url)
    assert first == again == tmp_path / "weights" / file
    assert first.read_bytes() == lookalikes[f"/{file}"]
    assert served.requests == ["/SHA256SUMS", f"/{file}"], "the second use downloaded again"
    assert cache_files(tmp_path) == {file, f"{file}.sha256"}


def test_a_download_that_does_not_match_the_mirror_sums_is_one_line_naming_the_url_and_the_cache(
    lookalikes: dict[str, bytes], tmp_path: Path
) -> None:
    file = imagenet_weights("mobilenet_v2", alpha=0.35, image_size=SHAPE[:2]).file
    wrong = {f"/{file}": b"another file"}
    with serve({**lookalikes, "/SHA256SUMS": sums_of(wrong)}) as served, pytest.raises(ModelError) as caught:
        fetch("mobilenet_v2", tmp_path, RUNNER_WEIGHTS_URL=served.base_url)
    message = str(caught.value)
    assert f"{served.base_url}/{file} do not match their sha256 in {served.base_url}/SHA256SUMS" in message
    assert str(tmp_path / "weights" / file) in message and "\n" not in message
    assert cache_files(tmp_path) == set(), "a file that does not match was kept"


def test_without_mirror_sums_the_md5_keras_publishes_is_checked(lookalikes: dict[str, bytes], tmp_path: Path) -> None:
    """EfficientNet's file has an md5 in Keras' source; a look-alike cannot match it, so it must be refused."""
    file = imagenet_weights("efficientnet_b0").file
    with serve(lookalikes) as served, pytest.raises(ModelError) as caught:  # no SHA256SUMS: 404
        fetch("efficientnet_b0", tmp_path, RUNNER_WEIGHTS_URL=served.base_url)
    message = str(caught.value)
    assert f"do not match the md5 Keras publishes for {file}" in message
    assert "expected 50bc09e76180e00e4465e1a485ddc09d" in message and str(tmp_path / "weights" / file) in message
    assert cache_files(tmp_path) == set()


def test_a_file_with_no_published_hash_has_its_sha256_recorded_and_checked_at_every_use(
    lookalikes: dict[str, bytes], tmp_path: Path
) -> None:
    """Keras publishes no hash for MobileNetV2: the first download's is recorded; a cached copy damaged since
    then is downloaded again."""
    file = imagenet_weights("mobilenet_v2", alpha=0.35, image_size=SHAPE[:2]).file
    with serve(lookalikes) as served:
        path = fetch("mobilenet_v2", tmp_path, RUNNER_WEIGHTS_URL=served.base_url)
        pinned = (tmp_path / "weights" / f"{file}.sha256").read_text().strip()
        with open(path, "r+b") as handle:  # one byte of the cached copy goes bad
            handle.seek(1000)
            handle.write(bytes([handle.read(1)[0] ^ 0xFF]))
        again = fetch("mobilenet_v2", tmp_path, RUNNER_WEIGHTS_URL=served.base_url)
    assert again.read_bytes() == lookalikes[f"/{file}"]
    assert (tmp_path / "weights" / f"{file}.sha256").read_text().strip() == pinned
    assert served.requests.count(f"/{file}") == 2, "the damaged copy was used"


def test_a_cut_download_and_a_server_error_are_retried(lookalikes: dict[str, bytes], tmp_path: Path) -> None:
    file = imagenet_weights("mobilenet_v2", alpha=0.35, image_size=SHAPE[:2]).file
    files = {**lookalikes, "/SHA256SUMS": sums_of(lookalikes)}
    with serve(files, faults=["503", "", "truncate", "503"]) as served:
        path = fetch("mobilenet_v2", tmp_path, RUNNER_WEIGHTS_URL=served.base_url)
    assert path.read_bytes() == lookalikes[f"/{file}"]
    assert served.requests.count(f"/{file}") == 3 and served.requests.count("/SHA256SUMS") == 2


def test_a_missing_file_is_one_line_naming_the_url_and_the_cache(tmp_path: Path) -> None:
    file = imagenet_weights("resnet50").file
    with serve({}) as served, pytest.raises(ModelError) as caught:
        fetch("resnet50", tmp_path, RUNNER_WEIGHTS_URL=served.base_url)
    message = str(caught.value)
    assert message.startswith(f"downloading {served.base_url}/{file} failed with HTTP 404")
    assert f"check $RUNNER_WEIGHTS_URL; the weights file would be {tmp_path / 'weights' / file}" in message


def test_a_mirror_that_refuses_the_connection_is_one_line_within_seconds(tmp_path: Path) -> None:
    """A host that refuses is given the short retry budget of an unreachable one, not the minutes of a blip."""
    with pytest.raises(ModelError) as caught:
        fetch("mobilenet_v2", tmp_path, RUNNER_WEIGHTS_URL="http://127.0.0.1:9/")
    message = str(caught.value)
    assert message.startswith("could not read http://127.0.0.1:9/SHA256SUMS: ") and "\n" not in message
    assert message.endswith("check $RUNNER_WEIGHTS_URL and the network")


# --- bad params at submit ----------------------------------------------------------------------------------------

BAD_PARAMS = [
    ("mobilenet_v2", {"dataset": {"image_size": [24, 24]}}, {}, "mobilenet_v2 needs images of at least 32x32 pixels"),
    ("efficientnet_b0", {"dataset": {"color_mode": "grayscale"}}, {"weights": "imagenet"}, "needs color images"),
    ("mobilenet_v2", {}, {"weights": "imagenet", "alpha": 0.6}, "model.params.alpha 0.6 has no ImageNet weights"),
    ("efficientnet_b0", {}, {"weights": "weights.bin"}, "model.params.weights must be imagenet, null, or the path"),
    ("efficientnet_b0", {}, {"fine_tune": {"at_epoch": 2, "layers": 237}}, "layers (237) is more than efficientnet_b0's 236"),
    ("resnet50", {}, {"fine_tune": {"at_epoch": 5}}, "at_epoch (5) must be less than training.epochs (5)"),
    ("resnet50", {}, {"fine_tune": {"at_epoch": 0}}, "fine_tune.at_epoch must be a positive integer"),
    ("resnet50", {}, {"fine_tune": {"at_epoch": 1, "layers": 0}}, "fine_tune.layers must be a positive integer or all"),
    ("resnet50", {}, {"fine_tune": {"at_epoch": 1, "learning_rate": 0.01}}, "is above training.learning_rate (0.001)"),
    ("resnet50", {}, {"fine_tune": {"at_epoch": 1, "unfreeze": 3}}, "fine_tune: 'unfreeze' not known"),
    ("resnet50", {}, {"fine_tune": {"at_epoch": 1}, "trainable_base": True}, "trainable_base already trains whole"),
    ("simple_cnn", {}, {"fine_tune": {"at_epoch": 1}}, "'fine_tune' not known to simple_cnn"),
    ("resnet50", {"dataset": {"color_mode": "grayscale"}}, {}, "resnet50 takes color images"),
    ("resnet50", {}, {"fine_tune": {"at_epoch": 1, 1: 2}}, "fine_tune: 1 not known"),
    ("simple_cnn", {}, {"steps": 4}, "'steps' not known to simple_cnn; allowed: filters, dense, dropout, augment"),
]  # fmt: skip


@pytest.mark.parametrize(("builtin", "sections", "params", "said"), BAD_PARAMS, ids=[case[3][:40] for case in BAD_PARAMS])
def test_params_that_cannot_work_are_refused_at_submit_naming_the_field(
    builtin: str, sections: dict[str, Any], params: dict[str, Any], said: str
) -> None:
    data: dict[str, Any] = {
        "name": "bad",
        "dataset": {"source": "/data", "image_size": [64, 64], **sections.get("dataset", {})},
        "model": {"builtin": builtin, "params": params},
        "training": {"epochs": 5, "learning_rate": 0.001},
    }
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    assert said in str(caught.value) and "\n" not in str(caught.value)


def test_runner_submit_refuses_a_fine_tune_larger_than_the_network_in_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: too-deep\ndataset: {source: /data, image_size: [160, 160]}\n"
        "model: {builtin: mobilenet_v2, params: {weights: imagenet, fine_tune: {at_epoch: 2, layers: 200}}}\n"
    )
    result = run_cli("submit", str(spec), "--queue", str(tmp_path / "queue"))
    assert result.returncode == 2
    said = "model.params.fine_tune.layers (200) is more than mobilenet_v2's 153 layers: give at most 153, or all"
    assert result.stderr.strip().splitlines() == [f"error: submit: {spec}: {said}"]
    assert not (tmp_path / "queue").exists() or not any((tmp_path / "queue").rglob("job.yaml"))


# --- fine-tuning -------------------------------------------------------------------------------------------------


def test_fine_tuning_unfreezes_the_top_layers_but_their_batch_norms(tmp_path: Path) -> None:
    import keras  # noqa: PLC0415

    from runner.train.models.builtin import base_of  # noqa: PLC0415
    from runner.train.models.fine_tune import FineTune  # noqa: PLC0415

    spec = spec_of("mobilenet_v2", fine_tune={"at_epoch": 1, "layers": 20})
    model = build("mobilenet_v2", tmp_path, fine_tune={"at_epoch": 1, "layers": 20})
    head = len(model.trainable_weights)
    tune = FineTune.of(spec)
    assert tune is not None and (tune.at_epoch, tune.layers, tune.learning_rate) == (1, 20, pytest.approx(0.0001))
    assert not tune.due(0) and tune.due(1)

    unfrozen = tune.unfreeze(model)

    base = base_of(model)
    top = base.layers[-20:]
    norms = [layer for layer in top if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and not any(layer.trainable for layer in norms), "a BatchNormalization was unfrozen"
    assert unfrozen == 20 - len(norms) and all(layer.trainable for layer in top if layer not in norms)
    assert not any(layer.trainable for layer in base.layers[1:-20])
    weights_of_top = sum(len(layer.trainable_weights) for layer in top)
    assert len(model.trainable_weights) == head + weights_of_top > head

    FineTune.freeze(model)
    assert len(model.trainable_weights) == head

    everything = FineTune.of(spec_of("mobilenet_v2", fine_tune={"at_epoch": 1}))
    assert everything is not None and everything.unfreeze(model) == sum(
        not isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers[1:]
    )


# --- exact across kills ------------------------------------------------------------------------------------------

NAME = "fine-tuned"
FINE_TUNED = {
    "dataset": {"image_size": [32, 32], "color_mode": "rgb", "augment": {"flip": "horizontal"}},
    "model": {
        "builtin": "mobilenet_v2",
        "params": {"alpha": 0.35, "weights": "imagenet", "dropout": 0.2, "fine_tune": {"at_epoch": 2, "layers": 20}},
    },
    "training": {
        "epochs": 5,
        "lr_schedule": {"kind": "cosine", "warmup_epochs": 1},
        "reduce_lr_on_plateau": {"monitor": "val_loss", "patience": 1, "factor": 0.5},
        "early_stopping": {"monitor": "val_accuracy", "patience": 4, "restore_best": True},
        "class_weight": {"0": 2.0},
        "steps_per_execution": 2,
    },
    "export": {"best": True},
}
"""MobileNetV2 from (look-alike) ImageNet weights: two epochs of the head alone, then its top 20 layers unfrozen
with a new optimizer at a tenth of the rate, the cosine going on across the switch; with augmentation, a plateau,
an early stop's watch, a class weighed double and the best epoch exported, every option of the spec at once."""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_digit_folders(tmp_path_factory.mktemp("digits"), train_per_class=16)


@pytest.fixture(scope="module")
def weights_server(lookalikes: dict[str, bytes]) -> Iterator[Served]:
    with serve({**lookalikes, "/SHA256SUMS": sums_of(lookalikes)}) as served:
        yield served


def fine_tune_env(cache: Path, served: Served) -> dict[str, str]:
    return {**keras_env(cache), "RUNNER_WEIGHTS_URL": served.base_url}


@pytest.fixture(scope="module")
def reference(digits: Path, weights_server: Served, tmp_path_factory: pytest.TempPathFactory) -> tuple[Reference, Path]:
    tmp = tmp_path_factory.mktemp("reference")
    return uninterrupted_run(tmp, digits, NAME, fine_tune_env(tmp / "cache", weights_server), **FINE_TUNED)


def _events(queue: Path, kind: str) -> list[dict]:
    return [event for event in job_of(queue, NAME).events.read() if event["event"] == kind]


def test_the_uninterrupted_run_trains_the_head_then_fine_tunes_the_top_of_the_base(
    reference: tuple[Reference, Path],
) -> None:
    """What the kill test relies on has to happen: the base starts from the downloaded weights, only the head
    learns for two epochs, then the top of the base does too, at the lower rate."""
    import keras  # noqa: PLC0415

    ref, queue = reference
    [pretrained] = _events(queue, "pretrained")
    assert pretrained["file"].endswith(imagenet_weights("mobilenet_v2", alpha=0.35, image_size=(32, 32)).file)
    [tuned] = _events(queue, "fine-tuning")
    assert (tuned["epoch"], tuned["learning_rate"]) == (3, pytest.approx(0.001))
    reduced = [event["epoch"] for event in _events(queue, "lr-reduced")]
    assert min(reduced) <= 2 < max(reduced), f"the plateau did not lower the rate on both sides of the switch: {reduced}"
    assert {path.name for path in job_of(queue, NAME).paths.final.iterdir()} >= {"model.keras", "best.keras"}
    rates = [float(row["lr"]) for row in ref.history]
    assert rates[2] < rates[1] / 5, f"the rate did not drop to the fine-tune's at epoch 3: {rates}"
    assert ref.training_state["step_offset"] == 2 * 6, "the new optimizer's schedule does not go on from step 12"

    model = keras.models.load_model(job_of(queue, NAME).paths.final / "model.keras")
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    start = lookalike_base("mobilenet_v2", alpha=0.35)
    changed = {
        layer.name
        for layer, before in zip(base.layers, start.layers, strict=True)
        if any(not np.array_equal(a, b) for a, b in zip(layer.get_weights(), before.get_weights(), strict=True))
    }
    top = {layer.name for layer in base.layers[-20:] if not isinstance(layer, keras.layers.BatchNormalization)}
    assert changed and changed <= top, f"layers outside the fine-tuned top changed: {sorted(changed - top)}"


def test_kills_around_the_switch_end_as_the_uninterrupted_run_and_a_resume_downloads_nothing(
    digits: Path, weights_server: Served, reference: tuple[Reference, Path], tmp_path: Path
) -> None:
    ref, _ = reference
    env = fine_tune_env(tmp_path / "cache", weights_server)
    queue = tmp_path / "queue"
    submit_keras_spec(tmp_path, queue, digits, NAME, env, **FINE_TUNED, checkpoint={"every_minutes": 0.000001})
    run = KillRun(queue, NAME, env, rng=random.Random(5), folder=tmp_path)
    for nth in (2, 6, 3):  # one resume before the switch (epoch 2), two after it
        run.session(Kill.after_commit(nth, delay_s=(0.0, 0.05)))
    # The last session runs on a fresh machine with no way to the weights: a resume must not need them.
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    run.env = {**env, "RUNNER_WEIGHTS_URL": "http://127.0.0.1:9"}
    run.finish()

    assert len(run.landed("training")) == 3, run.summary()
    assert run.mid_epoch_resumes() >= 1, run.summary()
    assert [event for event in run.resumes() if event["epoch"] >= 2], f"no resume after the switch: {run.summary()}"
    assert [event for event in run.resumes() if event["epoch"] < 2], f"no resume before the switch: {run.summary()}"
    check_resumes(run)
    assert_same_result(run, ref)  # the variables (the new optimizer's included), the state, history.csv with lr
    run.report()

