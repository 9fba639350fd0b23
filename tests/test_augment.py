"""`dataset.augment`: each training image's random changes depend only on (seed, epoch, the image), so a resumed
job, or one whose batch size was halved, sees exactly the images an uninterrupted one saw; validation images are
never changed. Real images (the bundled digits), the real pipeline, real TensorFlow."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runner.spec import DatasetSpec
from runner.train.data.pipeline import ImageFolderData, epoch_order, prepare_dataset
from tests.conftest import make_spec
from tests.support.keras_jobs import make_digit_folders

EVERYTHING = {"flip": "both", "rotation": 0.1, "zoom": 0.2, "translation": 0.1, "contrast": 0.3, "brightness": 0.1}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_digit_folders(tmp_path_factory.mktemp("digits"), train_per_class=8, val_per_class=3)


def prepare(digits: Path, cache: Path, augment: dict[str, Any] | None, *, batch_size: int = 6) -> ImageFolderData:
    dataset = {
        "source": str(digits), "train": "train", "validation": "validation", "image_size": [16, 16],
        "color_mode": "grayscale", "label_mode": "int", "batch_size": batch_size, "augment": augment,
    }  # fmt: skip
    return prepare_dataset(DatasetSpec.model_validate(dataset), seed=5, cache_dir=cache)


def images_by_sample(data: ImageFolderData, epoch: int, *, start_sample: int = 0) -> list[np.ndarray]:
    """The epoch's images from ``start_sample`` on, one array per image, in the epoch's order."""
    return [image for images, _ in data.train_batches(epoch=epoch, start_sample=start_sample) for image in images.numpy()]


def test_the_same_image_gets_the_same_changes_after_a_resume_or_a_halved_batch(digits: Path, tmp_path: Path) -> None:
    data = prepare(digits, tmp_path, EVERYTHING)
    epoch = images_by_sample(data, 2)

    assert len(epoch) == 24
    assert all(np.array_equal(a, b) for a, b in zip(images_by_sample(data, 2, start_sample=12), epoch[12:], strict=True))
    halved = dataclasses.replace(data, batch_size=3)
    assert all(np.array_equal(a, b) for a, b in zip(images_by_sample(halved, 2), epoch, strict=True))
    again = prepare(digits, tmp_path, EVERYTHING)  # a new session
    assert all(np.array_equal(a, b) for a, b in zip(images_by_sample(again, 2), epoch, strict=True))


def test_each_epoch_changes_the_images_differently_and_only_the_training_ones(digits: Path, tmp_path: Path) -> None:
    plain, augmented = prepare(digits, tmp_path, None), prepare(digits, tmp_path, EVERYTHING)
    originals = images_by_sample(plain, 0)
    first, second = images_by_sample(augmented, 0), images_by_sample(augmented, 1)

    changed = sum(not np.array_equal(a, b) for a, b in zip(first, originals, strict=True))
    assert changed == len(originals), "every image is changed (turned, zoomed, shifted, contrast, brightness)"
    same_image_next_epoch = {int(i): n for n, i in enumerate(epoch_order(5, 1, 24))}
    order0 = epoch_order(5, 0, 24)
    differs = [not np.array_equal(first[n], second[same_image_next_epoch[int(i)]]) for n, i in enumerate(order0)]
    assert all(differs), "an image is changed differently in the next epoch"
    for (a, _), (b, _) in zip(augmented.validation_batches(), plain.validation_batches(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), "validation images must not be augmented"
    assert all(0.0 <= float(image.min()) and float(image.max()) <= 255.0 for image in first)


def test_a_horizontal_flip_mirrors_about_half_of_the_images_and_changes_nothing_else(
    digits: Path, tmp_path: Path
) -> None:
    plain, flipped = prepare(digits, tmp_path, None), prepare(digits, tmp_path, {"flip": "horizontal"})
    for epoch in range(3):
        kinds = []
        for original, image in zip(images_by_sample(plain, epoch), images_by_sample(flipped, epoch), strict=True):
            mirrored = np.array_equal(image, original[:, ::-1])
            assert mirrored or np.array_equal(image, original)
            kinds.append(mirrored)
        assert 4 <= sum(kinds) <= 20, kinds


def test_brightness_shifts_a_whole_image_by_one_amount_within_its_bound(digits: Path, tmp_path: Path) -> None:
    plain, brighter = prepare(digits, tmp_path, None), prepare(digits, tmp_path, {"brightness": 0.1})
    shifts = []
    for original, image in zip(images_by_sample(plain, 0), images_by_sample(brighter, 0), strict=True):
        inside = (original > 30) & (original < 225)  # away from the clipping at 0 and 255
        delta = np.unique(np.round(image[inside] - original[inside], 3))
        assert len(delta) == 1 and abs(delta[0]) <= 25.5
        shifts.append(delta[0])
    assert len(set(shifts)) > 10, "each image draws its own shift"


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
    from runner.errors import SpecError  # noqa: PLC0415

    with pytest.raises(SpecError) as raised:
        make_spec("a", dataset={"augment": augment})
    [line] = str(raised.value).splitlines()
    assert said in line, line

