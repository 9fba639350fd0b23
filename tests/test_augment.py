"""`dataset.augment`: each training image's random changes depend only on (seed, epoch, the image), so a resumed
job, or one whose batch size was halved, sees exactly the images an uninterrupted one saw; validation images are
never changed. Real images (the bundled digits), the real pipelines, real TensorFlow and Keras.

Every property is checked on both input pipelines: TensorFlow's (tf.data, stateless random ops) and the JAX
backend's (NumPy batches, a Philox stream per image), which also runs here on Keras' TensorFlow backend and in
CI's JAX leg without TensorFlow. Both resample with the same geometry, to float rounding.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runner.spec import DatasetSpec
from runner.train.data.common import epoch_order
from tests.conftest import REPO, make_spec
from tests.support.keras_jobs import make_digit_folders

EVERYTHING = {"flip": "both", "rotation": 0.1, "zoom": 0.2, "translation": 0.1, "contrast": 0.3, "brightness": 0.1}
HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_digit_folders(tmp_path_factory.mktemp("digits"), train_per_class=8, val_per_class=3)


@pytest.fixture(
    params=[
        pytest.param("tf.data", marks=pytest.mark.skipif(not HAS_TENSORFLOW, reason="TensorFlow is not installed")),
        "arrays",
    ]
)
def pipeline(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def prepare(digits: Path, cache: Path, augment: dict[str, Any] | None, pipeline: str, *, batch_size: int = 6) -> Any:
    dataset = {
        "source": str(digits), "train": "train", "validation": "validation", "image_size": [16, 16],
        "color_mode": "grayscale", "label_mode": "int", "batch_size": batch_size, "augment": augment,
    }  # fmt: skip
    if pipeline == "arrays":
        from runner.train.data.arrays import prepare_dataset
    else:
        from runner.train.data.pipeline import prepare_dataset
    return prepare_dataset(DatasetSpec.model_validate(dataset), seed=5, cache_dir=cache)


def images_by_sample(data: Any, epoch: int, *, start_sample: int = 0) -> list[np.ndarray]:
    """The epoch's images from ``start_sample`` on, one array per image, in the epoch's order."""
    batches = data.train_batches(epoch=epoch, start_sample=start_sample)
    return [image for images, _ in batches for image in np.asarray(images)]


def validation_images(data: Any) -> list[np.ndarray]:
    batches = data.validation_batches()
    pairs = batches if hasattr(batches, "element_spec") else (batches[n] for n in range(len(batches)))
    return [np.asarray(images) for images, _ in pairs]


def test_the_same_image_gets_the_same_changes_after_a_resume_or_a_halved_batch(
    digits: Path, tmp_path: Path, pipeline: str
) -> None:
    data = prepare(digits, tmp_path, EVERYTHING, pipeline)
    epoch = images_by_sample(data, 2)

    assert len(epoch) == 24
    assert all(
        np.array_equal(a, b) for a, b in zip(images_by_sample(data, 2, start_sample=12), epoch[12:], strict=True)
    )
    halved = dataclasses.replace(data, batch_size=3)
    assert all(np.array_equal(a, b) for a, b in zip(images_by_sample(halved, 2), epoch, strict=True))
    again = prepare(digits, tmp_path, EVERYTHING, pipeline)  # a new session
    assert all(np.array_equal(a, b) for a, b in zip(images_by_sample(again, 2), epoch, strict=True))


def test_each_epoch_changes_the_images_differently_and_only_the_training_ones(
    digits: Path, tmp_path: Path, pipeline: str
) -> None:
    plain, augmented = prepare(digits, tmp_path, None, pipeline), prepare(digits, tmp_path, EVERYTHING, pipeline)
    originals = images_by_sample(plain, 0)
    first, second = images_by_sample(augmented, 0), images_by_sample(augmented, 1)

    changed = sum(not np.array_equal(a, b) for a, b in zip(first, originals, strict=True))
    assert changed == len(originals), "every image is changed (turned, zoomed, shifted, contrast, brightness)"
    same_image_next_epoch = {int(i): n for n, i in enumerate(epoch_order(5, 1, 24))}
    order0 = epoch_order(5, 0, 24)
    differs = [not np.array_equal(first[n], second[same_image_next_epoch[int(i)]]) for n, i in enumerate(order0)]
    assert all(differs), "an image is changed differently in the next epoch"
    for a, b in zip(validation_images(augmented), validation_images(plain), strict=True):
        assert np.array_equal(a, b), "validation images must not be augmented"
    assert all(0.0 <= float(image.min()) and float(image.max()) <= 255.0 for image in first)


def test_a_horizontal_flip_mirrors_about_half_of_the_images_and_changes_nothing_else(
    digits: Path, tmp_path: Path, pipeline: str
) -> None:
    plain, flipped = (
        prepare(digits, tmp_path, None, pipeline),
        prepare(digits, tmp_path, {"flip": "horizontal"}, pipeline),
    )
    for epoch in range(3):
        kinds = []
        for original, image in zip(images_by_sample(plain, epoch), images_by_sample(flipped, epoch), strict=True):
            mirrored = np.array_equal(image, original[:, ::-1])
            assert mirrored or np.array_equal(image, original)
            kinds.append(mirrored)
        assert 4 <= sum(kinds) <= 20, kinds


def test_brightness_shifts_a_whole_image_by_one_amount_within_its_bound(
    digits: Path, tmp_path: Path, pipeline: str
) -> None:
    plain, brighter = (
        prepare(digits, tmp_path, None, pipeline),
        prepare(digits, tmp_path, {"brightness": 0.1}, pipeline),
    )
    shifts = []
    for original, image in zip(images_by_sample(plain, 0), images_by_sample(brighter, 0), strict=True):
        inside = (original > 30) & (original < 225)  # away from the clipping at 0 and 255
        delta = np.unique(np.round(image[inside] - original[inside], 3))
        assert len(delta) == 1 and abs(delta[0]) <= 25.5
        shifts.append(delta[0])
    assert len(set(shifts)) > 10, "each image draws its own shift"


GEOMETRY_CHECK = """
import keras, numpy as np, tensorflow as tf
from runner.spec import AugmentSpec
from runner.train.data.array_augment import resample
from runner.train.data.augment_transform import DRAWS, transform_rows
assert keras.backend.backend() == "jax"
spec = AugmentSpec(rotation=0.1, zoom=0.2, translation=0.1)
rng = np.random.default_rng(1)
images = rng.uniform(0, 255, (8, 20, 30, 3)).astype(np.float32)
spread = rng.uniform(-1, 1, (8, DRAWS)).astype(np.float32)
rows = transform_rows(spec, spread, np.float32(20), np.float32(30), np).astype(np.float32)
tf_rows = transform_rows(spec, tf.constant(spread), tf.constant(20.0), tf.constant(30.0), tf).numpy()
ours = resample(images, rows)
theirs = tf.raw_ops.ImageProjectiveTransformV3(
    images=images, transforms=tf_rows, output_shape=[20, 30], fill_value=0.0, interpolation="BILINEAR",
    fill_mode="REFLECT",
).numpy()
print(np.abs(rows - tf_rows).max(), np.abs(ours - images).mean(), np.abs(ours - theirs).max())
"""


@pytest.mark.skipif(
    not (HAS_TENSORFLOW and importlib.util.find_spec("jax")), reason="compares JAX's resampling with TensorFlow's"
)
def test_both_pipelines_turn_zoom_and_shift_with_the_same_geometry() -> None:
    """The JAX pipeline's resampling (``keras.ops.image.affine_transform``, on Keras' JAX backend) is TensorFlow's
    (``ImageProjectiveTransformV3``, bilinear, edges reflected) for the same draws, to float rounding."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", GEOMETRY_CHECK], capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows, moved, apart = (float(word) for word in done.stdout.split())
    assert rows < 1e-5, "both backends make the same transform of the same draws"
    assert moved > 10, "the draws turn, zoom and shift the images"
    assert apart < 1e-3, f"the resamplings differ by {apart} (of 255)"


@pytest.mark.parametrize(
    ("augment", "said"),
    [
        ({}, "dataset.augment: changes nothing: give flip, rotation, zoom, translation, contrast or brightness"),
        ({"flip": "sideways"}, "dataset.augment.flip: Input should be 'horizontal', 'vertical' or 'both'"),
        ({"rotation": 0.7}, "dataset.augment.rotation: Input should be less than or equal to 0.5"),
        ({"zoom": 1}, "dataset.augment.zoom: Input should be less than 1"),
    ],
)
def test_bad_augmentation_is_one_line(augment: dict[str, Any], said: str) -> None:
    from runner.errors import SpecError

    with pytest.raises(SpecError) as raised:
        make_spec("a", dataset={"augment": augment})
    [line] = str(raised.value).splitlines()
    assert said in line, line
