"""runner.train.data.pipeline on real files: tiny image folders, real archives, real TensorFlow, a real HTTP server.

What can break: the order of batches across a resume, the two decoding paths drifting apart, labels in the
wrong shape, a cache that is reused half-filled or never reused, an archive that writes outside its folder, a
download that gives up on a blip or retries a 404, and bad input reported as anything but one clear line.
"""

from __future__ import annotations

import dataclasses
import email.message
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.error
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from rich.console import Console

from runner import defaults, storage
from runner.errors import DatasetError, RunnerError
from runner.spec import DatasetSpec
from runner.train.data import cache as dataset_cache
from runner.train.data import download as download_module
from runner.train.data.pipeline import ImageFolderData, epoch_order, is_transient_download, prepare_dataset
from tests.support.data_archives import ESCAPES, TAR_ONLY, hostile_tar, hostile_zip
from tests.support.data_images import (
    SIZE,
    TINY_GIF,
    encode,
    ids_and_classes,
    image,
    make_archive,
    write_classes,
    write_dataset,
)
from tests.support.data_server import serve

TRAIN = {"a": 5, "b": 6, "c": 4}
"""15 training images in 3 classes: with batches of 4, an epoch is 4 batches, the last one of 3."""

Batches = list[tuple[np.ndarray, np.ndarray]]


def make_spec(source: Path | str, **fields: Any) -> DatasetSpec:
    """A spec for the tiny datasets: 12x12 images, batches of 4, int labels unless told otherwise."""
    values: dict[str, Any] = {"image_size": SIZE, "batch_size": 4, "label_mode": "int"} | fields
    return DatasetSpec(source=str(source), **values)


def prepare(
    source: Path | str, cache: Path, *, seed: int = 7, budget: int | None = None, **fields: Any
) -> ImageFolderData:
    return prepare_dataset(make_spec(source, **fields), seed=seed, cache_dir=cache, memory_budget=budget)


def collect(dataset: tf.data.Dataset | None) -> Batches:
    assert dataset is not None
    return [(images.numpy(), labels.numpy()) for images, labels in dataset]


def same(left: Batches, right: Batches) -> bool:
    return len(left) == len(right) and all(
        np.array_equal(a, c) and np.array_equal(b, d) for (a, b), (c, d) in zip(left, right)
    )


def ids_of(batches: Batches) -> list[int]:
    return [image_id for images, _ in batches for image_id in ids_and_classes(images)[0]]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A dataset folder with 15 training images (ids 0-14) and 6 validation images (ids 15-20)."""
    return write_dataset(tmp_path / "dataset", TRAIN, {"a": 2, "b": 2, "c": 2})


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def refused(tmp_path: Path, source: Path | str, match: str, **fields: Any) -> DatasetError:
    """Prepare ``source``, expecting a one-line :class:`DatasetError` whose message matches ``match``."""
    with pytest.raises(DatasetError, match=match) as caught:
        prepare(source, tmp_path / "cache", **fields)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, RunnerError) and isinstance(caught.value, ValueError)
    return caught.value


# --- order: a pure function of (seed, epoch) ------------------------------------------------------------------


def test_order_is_a_pure_function_of_seed_and_epoch(folder: Path, cache: Path) -> None:
    data = prepare(folder, cache)
    first, second = collect(data.train_batches(epoch=0)), collect(data.train_batches(epoch=1))

    tf.random.set_seed(123)  # global random state, which Keras seeds from the spec, has no say in the order
    np.random.seed(5)
    again = prepare(folder, cache)  # a fresh object, as in a new session, asked for epoch 1 first
    assert same(collect(again.train_batches(epoch=1)), second)
    assert same(collect(again.train_batches(epoch=0)), first)
    assert ids_of(first) == list(epoch_order(7, 0, 15))  # ids 0-14 are the files in sorted order
    assert ids_of(first) != ids_of(second)
    assert sorted(ids_of(second)) == list(range(15))
    assert ids_of(collect(prepare(folder, cache, seed=8).train_batches(epoch=0))) != ids_of(first)


def test_start_step_gives_exactly_the_tail_of_the_epoch(folder: Path, cache: Path) -> None:
    data = prepare(folder, cache)
    full = collect(data.train_batches(epoch=3))

    assert data.steps_per_epoch == 4 and [len(labels) for _, labels in full] == [4, 4, 4, 3]
    for start in range(data.steps_per_epoch + 1):
        assert same(collect(data.train_batches(epoch=3, start_step=start)), full[start:])


def test_start_sample_with_another_batch_size_gives_the_rest_of_the_epoch(folder: Path, cache: Path) -> None:
    """After running out of memory mid-epoch the batch size is halved: the epoch goes on at the sample where the
    checkpoint stopped, whatever the new size, so no image of it is skipped or trained on twice."""
    data = prepare(folder, cache)
    done = ids_of(collect(data.train_batches(epoch=3)))[:8]  # two batches of 4
    halved = dataclasses.replace(data, batch_size=2)
    rest = collect(halved.train_batches(epoch=3, start_sample=8))

    assert [len(labels) for _, labels in rest] == [2, 2, 2, 1]
    assert done + ids_of(rest) == list(epoch_order(7, 3, 15))
    with pytest.raises(ValueError, match="start_sample must be between 0 and 15"):
        data.train_batches(epoch=0, start_sample=16)


def test_batches_hold_float32_images_in_0_255_with_the_right_labels(folder: Path, cache: Path) -> None:
    data = prepare(folder, cache)
    images, labels = next(iter(data.train_batches(epoch=0)))

    assert images.dtype == tf.float32 and images.shape == (4, 12, 12, 3)
    pixels = images.numpy()
    assert pixels.min() >= 0 and pixels.max() <= 255 and pixels.max() > 200
    ids, classes = ids_and_classes(pixels)
    assert list(labels.numpy()) == classes
    assert all(np.array_equal(pixels[i], image(classes[i], ids[i]).astype(np.float32)) for i in range(4))


def test_bad_epoch_or_start_step_is_refused(folder: Path, cache: Path) -> None:
    data = prepare(folder, cache)

    with pytest.raises(ValueError, match="start_step must be between 0 and 4, got 5"):
        data.train_batches(epoch=0, start_step=5)
    with pytest.raises(ValueError, match="epoch must be 0 or more"):
        data.train_batches(epoch=-1)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_memory_and_streaming_give_identical_batches(tmp_path: Path, fmt: str) -> None:
    folder = write_dataset(tmp_path / "dataset", TRAIN, {"a": 2, "b": 2, "c": 2}, fmt=fmt)
    memory = prepare(folder, tmp_path / "cache", validation="validation")
    streamed = prepare(folder, tmp_path / "cache", validation="validation", budget=12 * 12 * 3 * 21 - 1)  # a byte short

    assert memory.in_memory and not streamed.in_memory
    for epoch, start in [(0, 0), (1, 0), (1, 2), (5, 3), (5, 4)]:
        assert same(collect(memory.train_batches(epoch=epoch, start_step=start)),
                    collect(streamed.train_batches(epoch=epoch, start_step=start)))
    assert same(collect(memory.validation_batches()), collect(streamed.validation_batches()))


# --- labels and images -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "classes", "shape", "dtype"),
    [
        ("binary", {"a": 3, "b": 4}, (4, 1), tf.float32),
        ("categorical", TRAIN, (4, 3), tf.float32),
        ("int", TRAIN, (4,), tf.int32),
    ],
)
def test_labels_have_the_shape_and_type_of_their_mode(
    tmp_path: Path, mode: str, classes: dict[str, int], shape: tuple[int, ...], dtype: tf.DType
) -> None:
    folder = write_dataset(tmp_path / "dataset", classes)
    data = prepare(folder, tmp_path / "cache", label_mode=mode)

    images, labels = next(iter(data.train_batches(epoch=0)))
    assert labels.shape == shape and labels.dtype == dtype
    expected = ids_and_classes(images.numpy())[1]
    if mode == "binary":
        assert list(labels.numpy()[:, 0]) == expected
    elif mode == "categorical":
        assert np.array_equal(labels.numpy(), np.eye(3, dtype=np.float32)[expected])
    else:
        assert list(labels.numpy()) == expected
    assert data.num_classes == len(classes) and data.class_names == tuple(sorted(classes))


def test_grayscale_and_every_format_decode(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    write_classes(root / "train", {"a": 2}, fmt="jpg")
    write_classes(root / "train", {"b": 2}, fmt="bmp", first_id=2)
    (root / "train" / "b" / "004.gif").write_bytes(TINY_GIF)
    (root / "train" / "a" / "nested").mkdir()
    (root / "train" / "a" / "nested" / "005.PNG").write_bytes(encode(image(0, 5), "png"))

    for mode, channels in [("grayscale", 1), ("rgb", 3)]:
        data = prepare(root, tmp_path / "cache", color_mode=mode, image_size=(20, 16), batch_size=10)
        (images, labels), = collect(data.train_batches(epoch=0))
        assert images.shape == (6, 20, 16, channels) and data.input_shape == (20, 16, channels)
        assert sorted(labels) == [0, 0, 0, 1, 1, 1]


def test_hidden_files_and_folders_are_not_images_or_classes(folder: Path, cache: Path) -> None:
    (folder / "train" / ".ipynb_checkpoints").mkdir()
    (folder / "train" / "a" / "._000.png").write_bytes(b"\0\5\26\7 AppleDouble junk")
    (folder / "train" / "a" / "notes.txt").write_text("not an image")

    data = prepare(folder, cache)

    assert data.class_names == ("a", "b", "c") and data.num_train == 15


# --- validation ------------------------------------------------------------------------------------------------


def test_validation_folder_is_batched_in_a_fixed_order(folder: Path, cache: Path) -> None:
    data = prepare(folder, cache, validation="validation")

    batches = collect(data.validation_batches())
    assert data.num_validation == 6 and data.num_train == 15
    assert ids_of(batches) == list(range(15, 21))
    assert [len(labels) for _, labels in batches] == [4, 2]
    assert same(collect(data.validation_batches()), batches)


def test_validation_split_is_disjoint_deterministic_and_sized(folder: Path, cache: Path) -> None:
    data = prepare(folder, cache, validation_split=0.2)

    held = ids_of(collect(data.validation_batches()))
    trained = ids_of(collect(data.train_batches(epoch=0)))
    assert (data.num_train, data.num_validation) == (12, 3) and len(held) == 3 and len(trained) == 12
    assert sorted(held + trained) == list(range(15))
    assert held == sorted(held)  # a fixed order
    assert ids_of(collect(prepare(folder, cache, validation_split=0.2).validation_batches())) == held
    assert ids_of(collect(prepare(folder, cache, seed=8, validation_split=0.2).validation_batches())) != held


def test_no_validation_gives_none(folder: Path, cache: Path) -> None:
    data = prepare(folder, cache)
    assert prepare(folder, cache, validation="validation").num_validation == 6

    assert data.validation_batches() is None and data.num_validation == 0


# --- sources and the cache -------------------------------------------------------------------------------------


class CountingUnpack:
    """Wraps the real unpacker and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = dataset_cache.unpack_archive

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        self.real(*args, **kwargs)


@pytest.fixture
def unpacks(monkeypatch: pytest.MonkeyPatch) -> CountingUnpack:
    counter = CountingUnpack()
    monkeypatch.setattr(dataset_cache, "unpack_archive", counter)
    return counter


def entry_of(cache: Path) -> Path:
    (entry,) = [path for path in (cache / "datasets").iterdir() if path.is_dir()]
    return entry


@pytest.mark.parametrize("name", ["data.zip", "data.tar.gz", "data.tgz", "data.tar"])
def test_archives_are_unpacked_once_and_reused(
    tmp_path: Path, folder: Path, cache: Path, unpacks: CountingUnpack, name: str
) -> None:
    archive = make_archive(folder, tmp_path / name)
    direct = collect(prepare(folder, cache, validation="validation").train_batches(epoch=2))

    first = prepare(archive, cache, validation="validation")
    marker = entry_of(cache) / "READY.json"
    stamp = marker.stat().st_mtime_ns
    second = prepare(archive, cache, validation="validation")

    assert unpacks.calls == 1 and marker.stat().st_mtime_ns == stamp
    assert same(collect(first.train_batches(epoch=2)), direct)
    assert same(collect(second.train_batches(epoch=2)), direct)
    assert sorted(os.listdir(entry_of(cache))) == ["READY.json", "data"]


def test_a_changed_local_archive_is_unpacked_again(
    tmp_path: Path, folder: Path, cache: Path, unpacks: CountingUnpack
) -> None:
    archive = make_archive(folder, tmp_path / "data.zip")
    assert prepare(archive, cache).num_train == 15
    write_classes(folder / "train", {"d": 2}, first_id=30)
    make_archive(folder, archive)

    assert prepare(archive, cache).num_train == 17 and unpacks.calls == 2


def test_an_unfinished_cache_entry_is_redone(
    tmp_path: Path, folder: Path, cache: Path, unpacks: CountingUnpack
) -> None:
    archive = make_archive(folder, tmp_path / "data.tar.gz")
    prepare(archive, cache)
    entry = entry_of(cache)
    # What a kill leaves: no marker yet, a temporary folder, a half-written tree.
    (entry / "READY.json").unlink()
    (entry / ".tmp-data-123-abcd" / "train").mkdir(parents=True)
    shutil.rmtree(entry / "data" / "train" / "b")

    data = prepare(archive, cache)

    assert unpacks.calls == 2 and data.num_train == 15
    assert sorted(os.listdir(entry)) == ["READY.json", "data"]


def test_a_failed_unpack_leaves_nothing_that_is_reused(
    tmp_path: Path, folder: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_archive(folder, tmp_path / "data.zip")

    def killed(source: Path, target: Path, *, label: str) -> None:
        target.mkdir(parents=True)
        (target / "half").write_text("...")
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset_cache, "unpack_archive", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(archive, cache)
    assert os.listdir(entry_of(cache)) == []
    monkeypatch.undo()

    assert prepare(archive, cache).num_train == 15


def test_sha256_is_checked(tmp_path: Path, folder: Path, cache: Path) -> None:
    archive = make_archive(folder, tmp_path / "data.zip")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()

    assert prepare(archive, cache, sha256=digest.upper()).num_train == 15
    error = refused(tmp_path, archive, "dataset.sha256", sha256="0" * 64)
    assert digest in str(error) and "0" * 64 in str(error)


def test_a_local_folder_is_used_in_place(folder: Path, cache: Path) -> None:
    prepare(folder, cache)

    assert not cache.exists()


def test_sources_on_drive_are_copied_to_the_cache_first(
    tmp_path: Path, folder: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drive = tmp_path / "drive"
    monkeypatch.setattr(dataset_cache, "DRIVE_ROOT", drive)
    shutil.copytree(folder, drive / "MyDrive" / "dataset")
    archive = make_archive(folder, drive / "MyDrive" / "dataset.tar.gz")

    from_folder = prepare(drive / "MyDrive" / "dataset", cache, budget=0)
    from_archive = prepare(archive, cache, budget=0)
    shutil.rmtree(drive)  # training must not read Drive: the streamed batches come from the cache

    expected = collect(prepare(folder, tmp_path / "other-cache").train_batches(epoch=1))
    assert same(collect(from_folder.train_batches(epoch=1)), expected)
    assert same(collect(from_archive.train_batches(epoch=1)), expected)
    entries = [entry for entry in (cache / "datasets").iterdir() if entry.is_dir()]
    assert len(entries) == 2 and all(sorted(os.listdir(entry)) == ["READY.json", "data"] for entry in entries)


# --- hostile archives ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "case"),
    [(hostile_zip, case) for case in [*ESCAPES, "device"]]
    + [(hostile_tar, case) for case in [*ESCAPES, *TAR_ONLY, "device"]],
)
def test_archives_that_write_outside_their_folder_are_refused(tmp_path: Path, make: Any, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    archive = make(tmp_path / ("hostile.zip" if make is hostile_zip else "hostile.tar.gz"), case, outside)

    message = "special file" if case == "device" else "would write outside its folder: .*; refusing to unpack it"
    error = refused(tmp_path, archive, message)

    assert str(archive) in str(error)
    written = [path for path in tmp_path.rglob("*") if path.name.startswith("evil")]
    assert written == [] and sorted(os.listdir(outside)) == ["secret.txt"]
    assert os.listdir(entry_of(tmp_path / "cache")) == []


@pytest.mark.parametrize("make", ["zip", "tar"])
def test_links_that_stay_inside_are_kept(tmp_path: Path, folder: Path, make: str) -> None:
    if make == "tar":
        (folder / "train" / "c" / "100.png").symlink_to("../a/000.png")
    archive = make_archive(folder, tmp_path / f"data.{make}")
    if make == "zip":  # zipfile.write would store the target's bytes: add a link entry by hand
        with zipfile.ZipFile(archive, "a") as handle:
            info = zipfile.ZipInfo("train/c/100.png")
            info.create_system, info.external_attr = 3, (0o120777 << 16)
            handle.writestr(info, "../a/000.png")

    data = prepare(archive, tmp_path / "cache")

    assert data.num_train == 16


# --- downloads -------------------------------------------------------------------------------------------------


class Sleeps(list[float]):
    """A fake sleep that records its pauses."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_a_download_survives_503s_and_is_reused(tmp_path: Path, folder: Path, cache: Path) -> None:
    body = make_archive(folder, tmp_path / "data.zip").read_bytes()
    sleeps = Sleeps()
    console = Console(file=io.StringIO(), width=100)
    with serve({"/data.zip": body}, faults=["503", "503"]) as server:
        url = server.url("/data.zip")
        spec = make_spec(url, sha256=hashlib.sha256(body).hexdigest())
        data = prepare_dataset(spec, seed=7, cache_dir=cache, console=console, sleep=sleeps)
        again = prepare_dataset(spec, seed=7, cache_dir=cache, sleep=sleeps)

    assert server.requests == ["/data.zip"] * 3 and len(sleeps) == 2
    assert data.num_train == again.num_train == 15
    assert "download" in console.file.getvalue()  # type: ignore[attr-defined]
    assert sorted(os.listdir(entry_of(cache))) == ["READY.json", "data"]


def test_a_download_cut_short_is_retried(tmp_path: Path, folder: Path, cache: Path) -> None:
    body = make_archive(folder, tmp_path / "data.tar.gz").read_bytes()
    with serve({"/d.tgz": body}, faults=["truncate", "429"]) as server:
        data = prepare_dataset(make_spec(server.url("/d.tgz")), seed=7, cache_dir=cache, sleep=Sleeps())

    assert data.num_train == 15 and len(server.requests) == 3


def test_a_missing_url_is_not_retried(tmp_path: Path, cache: Path) -> None:
    sleeps = Sleeps()
    with serve({}) as server:
        url = server.url("/gone.zip")
        with pytest.raises(DatasetError, match="HTTP 404") as caught:
            prepare_dataset(make_spec(url), seed=0, cache_dir=cache, sleep=sleeps)

    assert url in str(caught.value) and "dataset.source" in str(caught.value)
    assert server.requests == ["/gone.zip"] and sleeps == []


def test_a_download_that_keeps_failing_gives_up_with_one_line(cache: Path) -> None:
    with socket.socket() as probe:  # a port with nobody listening: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    url = f"http://127.0.0.1:{port}/data.zip"

    with pytest.raises(DatasetError, match="could not download .*still failing after retries") as caught:
        prepare_dataset(make_spec(url), seed=0, cache_dir=cache, sleep=sleeps)

    assert url in str(caught.value) and len(sleeps) >= 3


def test_a_refused_connection_is_given_seconds_not_the_whole_budget_and_each_try_is_said(
    cache: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real pauses, the default 300 s budget: it ends after the 10 s given to a host that refuses (a run that
    waited out the whole budget would outlast this test's own limit, checked after)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.zip"
    monkeypatch.setattr(storage, "_budget", [defaults.RETRY_BUDGET_S])
    monkeypatch.setattr(defaults, "UNREACHABLE_RETRY_BUDGET_S", 2.0)  # the rule, not its 10 s, is under test
    caplog.set_level(logging.WARNING, logger="runner.storage")
    started = time.monotonic()

    with pytest.raises(DatasetError, match="Connection refused, still failing after retries"):
        prepare_dataset(make_spec(url), seed=0, cache_dir=cache)

    took = time.monotonic() - started
    tries = [record.getMessage() for record in caplog.records if record.name == "runner.storage"]
    assert tries and all(line.startswith(f"downloading {url} failed (") for line in tries), tries
    assert all(re.search(r"try \d+, retrying in \d+\.\ds$", line) for line in tries), tries
    assert took < defaults.RETRY_BUDGET_S / 3, f"{took:.0f}s: the short budget for a refused connection did not apply"


def test_a_download_with_the_wrong_sha256_is_refused_and_dropped(tmp_path: Path, folder: Path, cache: Path) -> None:
    body = make_archive(folder, tmp_path / "data.zip").read_bytes()
    with serve({"/data.zip": body}) as server:
        with pytest.raises(DatasetError, match="fix dataset.sha256"):
            prepare_dataset(make_spec(server.url("/data.zip"), sha256="a" * 64), seed=0, cache_dir=cache)

    assert os.listdir(entry_of(cache)) == []


def http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://127.0.0.1/x", code, "reason", email.message.Message(), None)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (http_error(503), True),
        (http_error(500), True),
        (http_error(429), True),
        (http_error(404), False),
        (http_error(403), False),
        (urllib.error.URLError(ConnectionRefusedError(111, "refused")), True),
        (urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "try again")), True),
        (urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "no such host")), False),
        (urllib.error.URLError("unknown url type: ftp"), False),
        (ConnectionResetError(104, "reset"), True),
        (TimeoutError("timed out"), True),
        (ValueError("a bug"), False),
    ],
)
def test_which_download_errors_are_transient(error: BaseException, transient: bool) -> None:
    assert is_transient_download(error) is transient


@pytest.mark.parametrize(
    ("error", "budget"),
    [
        (urllib.error.URLError(ConnectionRefusedError(111, "refused")), defaults.UNREACHABLE_RETRY_BUDGET_S),
        (urllib.error.URLError(socket.gaierror(socket.EAI_AGAIN, "try again")), defaults.UNREACHABLE_RETRY_BUDGET_S),
        (urllib.error.URLError(ConnectionResetError(104, "reset")), None),
        (http_error(503), None),
        (TimeoutError("timed out"), None),
    ],
)
def test_only_unreachable_hosts_get_the_short_budget(error: BaseException, budget: float | None) -> None:
    assert download_module.unreachable_budget(error) == budget


# --- bad input: one line naming the cause and the fix ------------------------------------------------------------


def test_a_missing_source_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, tmp_path / "nowhere.zip", "does not exist: fix dataset.source")


def test_a_file_that_is_no_archive_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.zip").write_text("this is not a zip")
    refused(tmp_path, tmp_path / "data.zip", "is not a valid zip or tar archive")


@pytest.mark.parametrize("name", ["data.zip", "data.tar.gz"])
def test_a_truncated_archive_is_refused(tmp_path: Path, folder: Path, name: str) -> None:
    archive = make_archive(folder, tmp_path / name)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])

    refused(tmp_path, archive, "is damaged|is not a valid zip or tar archive")
    assert os.listdir(entry_of(tmp_path / "cache")) == []


def test_a_missing_train_folder_lists_what_is_there(tmp_path: Path, folder: Path) -> None:
    listing = "train folder 'trian' is not in .*: its top level holds train/, validation/"
    error = refused(tmp_path, folder, listing, train="trian")
    assert "set dataset.train" in str(error)


@pytest.mark.parametrize(
    ("layout", "fields", "match"),
    [
        ({}, {}, "has no class subfolders"),
        ({"a": 3}, {"label_mode": "categorical"}, "binary and categorical labels need at least 2 classes"),
        ({"a": 3}, {"label_mode": "binary"}, "binary and categorical labels need at least 2 classes"),
        (TRAIN, {"label_mode": "binary"}, "label_mode binary needs exactly 2 classes, but .* has 3 \\(a, b, c\\)"),
        ({"a": 3, "b": 0}, {}, "class folder train/b has no images"),
        ({"a": 3, "b": 3}, {"validation_split": 0.05}, "validation_split 0.05 of 6 training images"),
    ],
)
def test_bad_class_folders_are_refused(
    tmp_path: Path, layout: dict[str, int], fields: dict[str, Any], match: str
) -> None:
    root = tmp_path / "dataset"
    (root / "train").mkdir(parents=True)
    (root / "train" / "README.txt").write_text("images go in subfolders")
    write_classes(root / "train", layout)

    refused(tmp_path, root, match, **fields)


def test_validation_classes_must_match_train(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "dataset", TRAIN, {"a": 1, "b": 1, "d": 1})

    refused(tmp_path, root, "other classes .*missing there: c; not in train: d", validation="validation")
    refused(tmp_path, root, "validation folder 'valid' is not in", validation="valid")


@pytest.mark.parametrize(
    ("budget", "damage"),
    # Streaming checks every file's signature up front; a damaged body only fails when its batch is decoded.
    [(None, "body"), (None, "signature"), (0, "signature")],
    ids=["in-memory-body", "in-memory-signature", "streaming-signature"],
)
def test_a_corrupt_image_is_named(folder: Path, tmp_path: Path, budget: int | None, damage: str) -> None:
    bad = folder / "train" / "b" / "006.png"
    good = bad.read_bytes()
    bad.write_bytes(good[:8] + b"garbage" * 10 if damage == "body" else b"garbage" + good)

    error = refused(tmp_path, folder, "image train/b/006.png ", budget=budget)
    assert "replace or delete it" in str(error)


# --- a cached URL follows the file on the server ----------------------------------------------------------------


def served_archive(tmp_path: Path, name: str, classes: dict[str, int]) -> bytes:
    folder = write_dataset(tmp_path / f"source-{name}", classes, {})
    return make_archive(folder, tmp_path / f"{name}.zip").read_bytes()


def said(console: Console) -> str:
    return " ".join(console.file.getvalue().split())  # type: ignore[attr-defined]


def test_a_url_changed_on_the_server_is_fetched_again_and_an_unchanged_one_is_not(tmp_path: Path, cache: Path) -> None:
    first, fixed = served_archive(tmp_path, "first", TRAIN), served_archive(tmp_path, "fixed", {"a": 3, "b": 3})
    console = Console(file=io.StringIO(), width=200)
    with serve({"/data.zip": first}) as server:
        spec = make_spec(server.url("/data.zip"))
        before = prepare_dataset(spec, seed=7, cache_dir=cache, console=console)
        unchanged = prepare_dataset(spec, seed=7, cache_dir=cache, console=console)
        assert server.requests == ["/data.zip"] and server.heads == ["/data.zip"]  # asked, not downloaded again
        server.files["/data.zip"] = fixed  # the archive fixed at the same URL
        after = prepare_dataset(spec, seed=7, cache_dir=cache, console=console)

    assert (before.num_train, unchanged.num_train, after.num_train) == (15, 15, 6)
    assert server.requests == ["/data.zip"] * 2 and server.heads == ["/data.zip"] * 2
    text = said(console)
    assert f"dataset: using the cached copy of {spec.source}" in text
    assert f"dataset: {spec.source} has changed since it was cached (ETag" in text and "fetching it again" in text
    marker = storage.read_json(entry_of(cache) / "READY.json")
    assert marker["remote"]["size"] == len(fixed) and marker["remote"]["etag"]


def test_a_cached_url_whose_server_is_gone_is_used_with_a_line_saying_so(tmp_path: Path, cache: Path) -> None:
    body = served_archive(tmp_path, "data", TRAIN)
    with serve({"/data.zip": body}) as server:
        spec = make_spec(server.url("/data.zip"))
        prepare_dataset(spec, seed=7, cache_dir=cache)
    console = Console(file=io.StringIO(), width=200)

    data = prepare_dataset(spec, seed=7, cache_dir=cache, console=console)  # the server has stopped

    assert data.num_train == 15
    assert f"dataset: could not ask {spec.source} whether it changed (" in said(console)
    assert "using the cached copy" in said(console)


def test_a_server_that_refuses_head_is_asked_with_a_get(tmp_path: Path, cache: Path) -> None:
    first, fixed = served_archive(tmp_path, "first", TRAIN), served_archive(tmp_path, "fixed", {"a": 3, "b": 3})
    with serve({"/data.zip": first}) as server:
        server.head_allowed = False
        spec = make_spec(server.url("/data.zip"))
        prepare_dataset(spec, seed=7, cache_dir=cache)
        server.files["/data.zip"] = fixed
        after = prepare_dataset(spec, seed=7, cache_dir=cache)

    assert after.num_train == 6
    assert server.heads == ["/data.zip"]
    assert server.requests == ["/data.zip"] * 3  # the download, the GET that asked, the download of the new file


def test_a_url_pinned_by_sha256_is_not_asked_again(tmp_path: Path, cache: Path) -> None:
    body = served_archive(tmp_path, "data", TRAIN)
    with serve({"/data.zip": body}) as server:
        spec = make_spec(server.url("/data.zip"), sha256=hashlib.sha256(body).hexdigest())
        prepare_dataset(spec, seed=7, cache_dir=cache)
        prepare_dataset(spec, seed=7, cache_dir=cache)

    assert server.requests == ["/data.zip"] and server.heads == []


def test_forget_cached_makes_the_next_run_fetch_again(tmp_path: Path, cache: Path) -> None:
    body = served_archive(tmp_path, "data", TRAIN)
    console = Console(file=io.StringIO(), width=200)
    with serve({"/data.zip": body}) as server:
        spec = make_spec(server.url("/data.zip"))
        prepare_dataset(spec, seed=7, cache_dir=cache)

        assert dataset_cache.forget_cached(spec, cache_dir=cache, console=console)
        assert os.listdir(entry_of(cache)) == []
        prepare_dataset(spec, seed=7, cache_dir=cache)

    assert server.requests == ["/data.zip"] * 2
    assert f"dataset: forgot the cached copy of {spec.source} ({entry_of(cache)})" in said(console)
    assert not dataset_cache.forget_cached(make_spec(tmp_path / "source-data"), cache_dir=cache)  # read in place


def test_dataset_errors_name_the_local_copy(tmp_path: Path, cache: Path) -> None:
    body = served_archive(tmp_path, "data", TRAIN)
    with serve({"/data.zip": body}) as server:
        wrong_sha = refused(tmp_path, server.url("/data.zip"), "dataset.sha256", sha256="0" * 64)
        wrong_folder = refused(tmp_path, server.url("/data.zip"), "is not in", train="nope")

    entries = sorted(path for path in (cache / "datasets").iterdir() if path.is_dir())
    assert any(f"(the local copy: {entry})" in str(wrong_sha) for entry in entries), wrong_sha
    assert any(
        f"(in the local copy {entry / 'data'}; `runner work --refresh-data` fetches the source again)"
        in str(wrong_folder)
        for entry in entries
    ), wrong_folder
    own = refused(tmp_path, tmp_path / "source-data", "is not in", train="nope")
    assert "local copy" not in str(own)  # a folder read where it is: no copy to name


def test_work_refresh_data_forgets_the_copies_of_the_jobs_it_runs(tmp_path: Path, cache: Path) -> None:
    from tests.conftest import make_spec_dict, run_cli, runner_env  # noqa: PLC0415

    body = served_archive(tmp_path, "data", TRAIN)
    queue = tmp_path / "queue"
    with serve({"/data.zip": body}) as server:
        url = server.url("/data.zip")
        prepare_dataset(make_spec(url), seed=7, cache_dir=cache)
        spec = tmp_path / "job.yaml"
        spec.write_text(json.dumps(make_spec_dict("job-a", dataset={"source": url})))
        assert run_cli("submit", "--queue", str(queue), str(spec)).returncode == 0

        worked = run_cli("work", "--refresh-data", "--queue", str(queue), env=runner_env(RUNNER_CACHE=str(cache)))

    assert worked.returncode == 0, worked.stderr
    assert f"dataset: forgot the cached copy of {url}" in " ".join(worked.stderr.split())
    assert not (entry_of(cache) / "READY.json").exists()


def test_a_changed_file_that_cannot_be_fetched_leaves_the_cached_copy_in_use(tmp_path: Path, cache: Path) -> None:
    first, fixed = served_archive(tmp_path, "first", TRAIN), served_archive(tmp_path, "fixed", {"a": 3, "b": 3})
    console = Console(file=io.StringIO(), width=200)
    with serve({"/data.zip": first}) as server:
        spec = make_spec(server.url("/data.zip"))
        prepare_dataset(spec, seed=7, cache_dir=cache)
        server.files["/data.zip"] = fixed
        server.faults.append("404")  # the new file's download fails
        data = prepare_dataset(spec, seed=7, cache_dir=cache, console=console, sleep=Sleeps())

    assert data.num_train == 15  # the copy of before, still whole
    assert "could not fetch the changed file" in said(console) and "using the cached copy" in said(console)
    assert (entry_of(cache) / "READY.json").exists()


def test_etags_that_differ_by_server_but_agree_on_time_and_size_are_the_same_file() -> None:
    same = {"etag": '"a"', "last_modified": "Fri, 04 Dec 2026 10:00:00 GMT", "size": 3}
    assert download_module.same_file(same, {**same, "etag": '"b"'}) is True
    assert download_module.same_file({**same, "etag": 'W/"a"'}, same) is True
    assert download_module.same_file(same, {**same, "etag": '"b"', "size": 4}) is False
    assert download_module.same_file({"etag": '"a"', "size": 3}, {"etag": '"b"', "size": 3}) is False
    assert download_module.same_file(None, same) is None
