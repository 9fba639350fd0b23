"""The job spec: valid specs round-trip through YAML and JSON, invalid ones name the field that is wrong."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from runner.errors import SpecError
from runner.spec import (
    FACTORY_PATTERN,
    LOSSES_FOR_LABELS,
    CheckpointSpec,
    DatasetSpec,
    ExportSpec,
    JobSpec,
    ModelSpec,
    TrainingSpec,
    _plain,  # tuples as lists, as a YAML or JSON file gives them
    json_schema,
    load_spec,
    parse_spec,
)
from tests.conftest import REPO, make_spec_dict

TUTORIAL_URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"
TUTORIAL_YAML = REPO / "jobs" / "cats_vs_dogs.yaml"

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PER_BREAKAGE = settings(max_examples=12, deadline=None)

SECTION_FIELDS = {
    "dataset": set(DatasetSpec.model_fields),
    "model": set(ModelSpec.model_fields),
    "training": set(TrainingSpec.model_fields),
    "checkpoint": set(CheckpointSpec.model_fields),
    "export": set(ExportSpec.model_fields),
}

# --- strategies for valid specs -----------------------------------------------------------------------------

names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True).filter(lambda name: ".." not in name)
folders = st.lists(
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_ .-]{0,15}", fullmatch=True), min_size=1, max_size=3
).map("/".join)
sha256s = st.from_regex(r"[0-9a-fA-F]{64}", fullmatch=True)
factories = st.from_regex(
    r"[A-Za-z_][A-Za-z0-9_]{0,8}(\.[A-Za-z_][A-Za-z0-9_]{0,8}){0,3}:[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True
)
metric_names = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
params = st.dictionaries(st.text(max_size=10), json_values, max_size=4)
fractions = st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True)


@st.composite
def datasets(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(
        st.fixed_dictionaries(
            # Absolute paths and URLs: load_spec resolves relative ones against the spec file's folder.
            {"source": st.text(min_size=1, max_size=40).map(lambda text: "/data/" + text) | st.just("https://data.invalid/x.zip")},
            optional={
                "sha256": st.none() | sha256s,
                "train": folders,
                "image_size": st.lists(st.integers(1, 8192), min_size=2, max_size=2),
                "label_mode": st.sampled_from(["binary", "categorical", "int"]),
                "batch_size": st.integers(1, 65536),
            },
        )
    )
    # Either a validation folder, or a split, or neither (explicit nulls count as neither).
    held_out = draw(st.sampled_from(["neither", "folder", "split", "folder-null", "split-null"]))
    if held_out == "folder":
        data["validation"] = draw(folders)
    elif held_out == "split":
        data["validation_split"] = draw(fractions)
    elif held_out == "folder-null":
        data["validation"] = None
    elif held_out == "split-null":
        data["validation_split"] = None
    return data


# A built-in network's params are checked at submit (tests/test_pretrained.py): here, valid ones only.
builtin_params = st.sampled_from([{}, {"dropout": 0.5}, {"filters": 8, "dense": 16}, {"augment": True}])
models = st.one_of(
    st.fixed_dictionaries({"builtin": st.just("simple_cnn")}, optional={"params": builtin_params}),
    st.fixed_dictionaries({"builtin": st.sampled_from(["mobilenet_v2", "efficientnet_b0", "resnet50"])}),
    st.fixed_dictionaries({"factory": factories}, optional={"params": params}),
)
trainings = st.fixed_dictionaries(
    {},
    optional={
        "epochs": st.integers(1, 1_000_000),
        "optimizer": st.sampled_from(["adam", "adamw", "sgd", "rmsprop", "adagrad", "nadam"]),
        "learning_rate": st.floats(min_value=0, max_value=10, exclude_min=True),
        "loss": st.sampled_from(
            [
                "binary_crossentropy",
                "categorical_crossentropy",
                "sparse_categorical_crossentropy",
                "mean_squared_error",
                "mean_absolute_error",
                "hinge",
            ]
        ),
        "metrics": st.lists(metric_names, max_size=3),
        "seed": st.integers(0, 2**31 - 1),
        "deterministic": st.booleans(),
    },
)
checkpoints = st.fixed_dictionaries(
    {},
    optional={
        "every_epochs": st.integers(1, 10**6),
        "every_minutes": st.none() | st.floats(min_value=0, max_value=10**6, exclude_min=True),
        "keep": st.integers(1, 1000),
    },
)
exports = st.fixed_dictionaries(
    {},
    optional={
        "formats": st.lists(st.sampled_from(["keras", "h5", "saved_model"]), min_size=1, max_size=3, unique=True)
    },
)
def _with_a_fitting_loss(spec: dict[str, Any]) -> dict[str, Any]:
    """A loss that cannot train on the labels is refused (tested on its own): keep drawn losses that fit; and an
    image size the network takes."""
    label_mode = spec["dataset"].get("label_mode", "binary")
    loss = spec.get("training", {}).get("loss", "binary_crossentropy")
    if loss not in LOSSES_FOR_LABELS[label_mode]:
        spec.setdefault("training", {})["loss"] = LOSSES_FOR_LABELS[label_mode][0]
    if spec.get("model", {}).get("builtin", "simple_cnn") != "simple_cnn" and "image_size" in spec["dataset"]:
        # The pretrained bases take images of 32x32 and up (refused at submit otherwise, tested on its own).
        spec["dataset"]["image_size"] = [max(side, 32) for side in spec["dataset"]["image_size"]]
    return spec


valid_specs = st.fixed_dictionaries(
    {"name": names, "dataset": datasets()},
    optional={
        "priority": st.integers(-1000, 1000),
        "model": models,
        "training": trainings,
        "checkpoint": checkpoints,
        "export": exports,
    },
).map(_with_a_fitting_loss)


def _assert_kept(given: dict[str, Any], dumped: dict[str, Any]) -> None:
    """Every value the user gave is in the parsed spec, unchanged."""
    for key, value in given.items():
        if isinstance(value, dict):
            for field, inner in value.items():
                assert dumped[key][field] == inner, f"{key}.{field}: gave {inner!r}, parsed {dumped[key][field]!r}"
        else:
            assert dumped[key] == value, f"{key}: gave {value!r}, parsed {dumped[key]!r}"


# --- round trips --------------------------------------------------------------------------------------------


@PROPERTY
@given(data=valid_specs)
@example(data=make_spec_dict("clipped", model={"params": {"clip_norm": float("inf")}}))
def test_valid_specs_keep_their_values_and_round_trip_through_yaml(tmp_path: Path, data: dict[str, Any]) -> None:
    spec = parse_spec(data)
    _assert_kept(data, _plain(spec.model_dump()))

    text = spec.to_yaml()
    assert parse_spec(yaml.safe_load(text)) == spec
    frozen = tmp_path / "spec.yaml"
    frozen.write_text(text, encoding="utf-8")
    assert load_spec(frozen) == spec

    written_by_hand = tmp_path / "hand.yml"
    written_by_hand.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert load_spec(written_by_hand) == spec


@PROPERTY
@given(data=valid_specs)
def test_valid_specs_round_trip_through_json_files(tmp_path: Path, data: dict[str, Any]) -> None:
    spec = parse_spec(data)
    by_hand = tmp_path / "spec.json"
    by_hand.write_text(json.dumps(data, indent=2), encoding="utf-8")
    assert load_spec(by_hand) == spec

    upper = tmp_path / "SPEC.JSON"  # the suffix is matched without regard to case
    upper.write_text(json.dumps(data), encoding="utf-8")
    assert load_spec(upper) == spec


def test_to_yaml_keeps_infinite_floats_in_params_and_fields() -> None:
    spec = parse_spec(
        make_spec_dict(
            "clipped",
            model={"params": {"clip_norm": float("inf"), "floor": -float("inf")}},
            checkpoint={"every_minutes": float("inf")},
        )
    )
    again = parse_spec(yaml.safe_load(spec.to_yaml()))
    assert again.checkpoint.every_minutes == float("inf")
    assert again.model.params == {"clip_norm": float("inf"), "floor": -float("inf")}
    assert again == spec


def test_to_yaml_writes_every_field_with_defaults_filled_in() -> None:
    text = JobSpec(name="minimal", dataset=DatasetSpec(source="/data")).to_yaml()
    dumped = yaml.safe_load(text)
    assert set(dumped) == set(JobSpec.model_fields)
    for section, fields in SECTION_FIELDS.items():
        assert set(dumped[section]) == fields, section
    assert dumped["training"]["epochs"] == 15
    assert dumped["dataset"]["image_size"] == [150, 150]


# --- invalid specs name the field ---------------------------------------------------------------------------


def _put(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A breakage that sets the field at ``path`` (dot-separated) to ``value``."""
    *sections, field = path.split(".")

    def apply(data: dict[str, Any]) -> None:
        target = data
        for section in sections:
            target = target.setdefault(section, {})
        target[field] = value

    return apply


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    *sections, field = path.split(".")

    def apply(data: dict[str, Any]) -> None:
        target = data
        for section in sections:
            target = target.setdefault(section, {})
        target.pop(field, None)

    return apply


def _with(path: str, values: st.SearchStrategy[Any], fragment: str = "") -> st.SearchStrategy[tuple[Any, ...]]:
    """(breakage, field path the problem must name, text the problem must contain)."""
    return values.map(lambda value: (_put(path, value), path, fragment))


unknown_keys = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True)
wrong_ints = st.sampled_from(["many", "", "3.5", "ten"]) | st.lists(st.integers(), max_size=2) | st.just({"n": 1})
fractional = st.floats(min_value=0.5, max_value=1e6).filter(lambda x: not x.is_integer())
bad_names = st.one_of(
    st.tuples(names, names).map(lambda pair: f"{pair[0]}/{pair[1]}"),
    st.tuples(names, names).map(lambda pair: f"{pair[0][:30]}..{pair[1][:30]}"),
    st.tuples(names, st.from_regex(r"[A-Z]", fullmatch=True), st.integers(0, 64)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
    ),
    names.map(lambda name: "." + name),
    st.from_regex(r"[a-z0-9][a-z0-9_-]{64,90}", fullmatch=True),
    st.sampled_from(["", "..", ".", "-job", "_job", "my job", "job\n", "a\\b", "[/]", "café"]),
    st.integers() | st.none() | st.lists(names, max_size=2),
)
bad_factories = st.sampled_from(
    ["a.b", "a:b:c", "1a:b", "a..b:c", "a.b:", ":f", "a b:c", "a-b:c", "a.b:c\n", "a.b:c()", "a/b:c", "", "a.:b"]
) | st.text(max_size=20).filter(lambda text: not re.fullmatch(FACTORY_PATTERN, text))
bad_sha256s = st.one_of(
    st.from_regex(r"[0-9a-f]{1,63}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{65,80}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{20}[g-zG-Z ][0-9a-f]{43}", fullmatch=True),
    sha256s.map(lambda digest: digest + "\n"),
    st.just(""),
    st.integers(),
)


@st.composite
def _unknown_field(draw: st.DrawFn, level: str) -> tuple[Any, ...]:
    allowed = set(JobSpec.model_fields) if level == "" else SECTION_FIELDS[level]
    key = draw(unknown_keys.filter(lambda key: key not in allowed))
    path = key if level == "" else f"{level}.{key}"
    return _put(path, draw(json_values)), path, "unknown field"


@st.composite
def _image_size_element(draw: st.DrawFn) -> tuple[Any, ...]:
    index = draw(st.integers(0, 1))
    size: list[Any] = [150, 150]
    size[index] = draw(st.sampled_from(["a", "150px", None]) | st.lists(st.integers(), max_size=1))
    return _put("dataset.image_size", size), f"dataset.image_size.{index}", ""


@st.composite
def _both_validations(draw: st.DrawFn) -> tuple[Any, ...]:
    folder, split = draw(folders), draw(fractions)

    def apply(data: dict[str, Any]) -> None:
        data["dataset"].update(validation=folder, validation_split=split)

    return apply, "dataset", "not both"


@st.composite
def _builtin_and_factory(draw: st.DrawFn, both: bool) -> tuple[Any, ...]:
    model: dict[str, Any] = {"params": draw(params)}
    if both:
        model.update(builtin=draw(st.sampled_from(["simple_cnn", "mobilenet_v2", "resnet50"])), factory=draw(factories))
    else:
        nulls = [{}, {"builtin": None}, {"factory": None}, {"builtin": None, "factory": None}]
        model.update(draw(st.sampled_from(nulls)))
    return _put("model", model), "model", "exactly one of builtin"


BREAKAGES: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "epochs-too-small": _with("training.epochs", st.integers(max_value=0), "greater than or equal to 1"),
    "epochs-too-large": _with("training.epochs", st.integers(min_value=1_000_001)),
    "epochs-wrong-type": _with("training.epochs", wrong_ints | fractional | st.none()),
    "batch-size-out-of-range": _with("dataset.batch_size", st.integers(max_value=0) | st.integers(min_value=65537)),
    "batch-size-wrong-type": _with("dataset.batch_size", wrong_ints | fractional),
    "bad-name": _with("name", bad_names),
    "missing-name": st.just((_drop("name"), "name", "required field is missing")),
    "missing-source": st.just((_drop("dataset.source"), "dataset.source", "required field is missing")),
    "empty-source": _with("dataset.source", st.just("")),
    "priority-out-of-range": _with("priority", st.integers(max_value=-1001) | st.integers(min_value=1001)),
    "image-side-out-of-range": _with(
        "dataset.image_size",
        st.tuples(st.integers(max_value=0) | st.integers(min_value=8193), st.integers(1, 8192), st.booleans()).map(
            lambda t: [t[0], t[1]] if t[2] else [t[1], t[0]]
        ),
        "between 1 and 8192",
    ),
    "image-size-wrong-length": _with(
        "dataset.image_size", st.lists(st.integers(1, 100), max_size=5).filter(lambda size: len(size) != 2)
    ),
    "image-size-wrong-element": _image_size_element(),
    "image-size-wrong-type": _with("dataset.image_size", st.sampled_from(["150x150", 150, {"h": 1}])),
    "label-mode": _with("dataset.label_mode", st.sampled_from(["grayscale", "BINARY", "", 1])),
    "both-validations": _both_validations(),
    "validation-split-out-of-range": _with(
        "dataset.validation_split", st.sampled_from([0, 0.0, 1, 1.0, -0.5, 2.0, float("nan"), "half"])
    ),
    "train-folder-escapes": _with("dataset.train", st.sampled_from(["/abs", "../up", "a/../../b", "/"])),
    "validation-folder-escapes": _with("dataset.validation", st.sampled_from(["/abs/val", "..", "x/../.."])),
    "sha256": _with("dataset.sha256", bad_sha256s),
    "builtin-and-factory": _builtin_and_factory(both=True),
    "neither-builtin-nor-factory": _builtin_and_factory(both=False),
    "unknown-builtin": _with("model.builtin", st.sampled_from(["resnet", "SIMPLE_CNN", ""])),
    "bad-factory": st.tuples(bad_factories, params).map(
        lambda t: (_put("model", {"factory": t[0], "params": t[1]}), "model.factory", "")
    ),
    "params-not-a-mapping": _with("model.params", st.sampled_from([[1], "filters=32", 3])),
    "learning-rate": _with(
        "training.learning_rate", st.sampled_from([0, -0.1, 10.5, 1e9, float("nan"), float("inf"), "fast"])
    ),
    "optimizer": _with("training.optimizer", st.sampled_from(["adamx", "Adam", ""])),
    "loss": _with("training.loss", st.sampled_from(["mse", "crossentropy", None])),
    "metrics": _with("training.metrics", st.sampled_from([["Accuracy"], ["acc uracy"], ["1acc"], "accuracy"])),
    "seed": _with("training.seed", st.integers(max_value=-1) | st.integers(min_value=2**31)),
    "deterministic": _with("training.deterministic", st.sampled_from(["maybe", [True], 2])),
    "every-epochs": _with("checkpoint.every_epochs", st.integers(max_value=0)),
    "every-minutes": _with("checkpoint.every_minutes", st.sampled_from([0, -5, "hourly"])),
    "keep": _with("checkpoint.keep", st.integers(max_value=0) | st.integers(min_value=1001)),
    "export-formats": _with(
        "export.formats", st.sampled_from([[], ["keras", "keras"], ["onnx"], ["keras", "tflite"], "keras"])
    ),
    "section-wrong-type": st.sampled_from(["dataset", "model", "training", "checkpoint", "export"]).flatmap(
        lambda section: _with(section, st.sampled_from(["x", 3, [1, 2]]))
    ),
    **{f"unknown-field-{level or 'top'}": _unknown_field(level) for level in ["", *SECTION_FIELDS]},
}


@pytest.mark.parametrize("kind", sorted(BREAKAGES))
def test_a_broken_field_is_named_in_every_problem(kind: str) -> None:
    @PER_BREAKAGE
    @given(data=valid_specs, breakage=BREAKAGES[kind])
    def check(data: dict[str, Any], breakage: tuple[Any, ...]) -> None:
        breaks, path, fragment = breakage
        breaks(data)
        with pytest.raises(SpecError) as caught:
            parse_spec(data, source="spec.yaml")
        problems = caught.value.problems
        assert problems
        locations = [problem.split(": ", 1)[0] for problem in problems]
        assert all(location == path or location.startswith(path + ".") for location in locations), problems
        assert all(": " in problem and problem.split(": ", 1)[1].strip() for problem in problems), problems
        if fragment:
            assert any(fragment in problem for problem in problems), problems
        lines = str(caught.value).splitlines()
        assert lines == [f"spec.yaml: {problem}" for problem in problems]

    check()


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("training.epochs", 0, "training.epochs: Input should be greater than or equal to 1 (got 0)"),
        ("training.epochs", -3, "training.epochs: Input should be greater than or equal to 1 (got -3)"),
        ("dataset.batch_size", 0, "dataset.batch_size: Input should be greater than or equal to 1 (got 0)"),
        ("name", "a/b", "name: must be 1-64 characters"),
        ("name", "a..b", "name: must be 1-64 characters"),
        ("name", "Cats", "name: must be 1-64 characters"),
        ("name", ".hidden", "name: must be 1-64 characters"),
        ("name", "x" * 65, "name: must be 1-64 characters"),
        ("dataset.image_size", ["a", 150], "dataset.image_size.0: Input should be a valid integer"),
        ("extra", 1, "extra: unknown field; allowed here: name, priority, dataset, model, training, checkpoint,"),
        ("training.epoch", 3, "training.epoch: unknown field; allowed here: epochs, optimizer,"),
        ("model", {"params": {}}, "model: give exactly one of builtin"),
        ("dataset.sha256", "abc", "dataset.sha256: String should match pattern"),
    ],
)
def test_problem_lines_for_the_common_mistakes(path: str, value: Any, expected: str) -> None:
    data = make_spec_dict("tidy-job")
    _put(path, value)(data)
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    assert len(caught.value.problems) == 1, caught.value.problems
    assert caught.value.problems[0].startswith(expected)


def test_every_problem_is_reported_not_just_the_first() -> None:
    data = make_spec_dict("Bad/Name", training={"epochs": 0, "bogus": True}, dataset={"batch_size": -1})
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    locations = sorted(problem.split(": ", 1)[0] for problem in caught.value.problems)
    assert locations == ["dataset.batch_size", "name", "training.bogus", "training.epochs"]


def test_spec_error_is_a_value_error_with_exit_code_2() -> None:
    with pytest.raises(ValueError) as caught:
        parse_spec({"name": "x"})
    assert isinstance(caught.value, SpecError)
    assert caught.value.exit_code == 2
    assert caught.value.problems == ["dataset: required field is missing"]


# --- files that are not specs -------------------------------------------------------------------------------


def _problems_of(path: Path) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert caught.value.source == str(path)
    assert str(caught.value).splitlines() == [f"{path}: {problem}" for problem in caught.value.problems]
    return caught.value.problems


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "tabs.yaml"
    path.write_text("name: tabs\ndataset:\n\tsource: /data\n", encoding="utf-8")
    [problem] = _problems_of(path)
    assert problem.startswith("line 3, column 1: invalid YAML:"), problem


def test_yaml_unclosed_bracket_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "unclosed.yml"
    path.write_text("name: job\ndataset:\n  source: /data\n  image_size: [150, 150\ntraining: {epochs: 3}\n")
    [problem] = _problems_of(path)
    match = re.match(r"line (\d+), column (\d+): invalid YAML: \S", problem)
    assert match, problem
    assert int(match.group(1)) in (4, 5), problem


def test_json_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "comma.json"
    path.write_text('{\n  "name": "job",\n  "dataset": {"source": "/data",}\n}\n', encoding="utf-8")
    [problem] = _problems_of(path)
    assert re.match(r"line 3, column \d+: invalid JSON: \S", problem), problem


def test_json_files_are_parsed_as_json_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "yaml-inside.json"
    path.write_text("name: job\ndataset: {source: /data}\n", encoding="utf-8")
    [problem] = _problems_of(path)
    assert problem.startswith("line 1, column 1: invalid JSON"), problem


@pytest.mark.parametrize(
    ("file_name", "text", "expected"),
    [
        ("empty.yaml", "", "the spec is empty"),
        ("comments.yaml", "# nothing here yet\n", "the spec is empty"),
        ("list.yaml", "- name: a\n- name: b\n", "the spec is a list"),
        ("list.json", '[{"name": "a"}]', "the spec is a list"),
        ("scalar.yaml", "cats-vs-dogs\n", "the spec is a str"),
    ],
)
def test_a_file_that_is_not_a_mapping_says_so(tmp_path: Path, file_name: str, text: str, expected: str) -> None:
    path = tmp_path / file_name
    path.write_text(text, encoding="utf-8")
    [problem] = _problems_of(path)
    assert problem.startswith(expected), problem
    assert "mapping" in problem


def test_a_missing_file_says_file_not_found(tmp_path: Path) -> None:
    assert _problems_of(tmp_path / "nowhere.yaml") == ["file not found"]


def test_a_file_that_is_not_utf8_says_it_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    [problem] = _problems_of(path)
    assert problem.startswith("cannot read the file"), problem


# --- the tutorial's job -------------------------------------------------------------------------------------


def _tutorial_spec() -> JobSpec:
    return JobSpec(
        name="cats-vs-dogs",
        priority=0,
        dataset=DatasetSpec(
            source=TUTORIAL_URL,
            sha256=None,
            train="cats_and_dogs_filtered/train",
            validation="cats_and_dogs_filtered/validation",
            image_size=(150, 150),
            label_mode="binary",
            batch_size=20,
        ),
        model=ModelSpec(builtin="simple_cnn", params={"filters": 32, "dense": 512}),
        training=TrainingSpec(
            epochs=15,
            optimizer="adam",
            learning_rate=0.001,
            loss="binary_crossentropy",
            metrics=("accuracy",),
            seed=0,
            deterministic=False,
        ),
        checkpoint=CheckpointSpec(every_epochs=1, every_minutes=None, keep=2),
        export=ExportSpec(formats=("keras",)),
    )


def test_bundled_cats_vs_dogs_job_is_the_tutorials_job() -> None:
    spec = load_spec(TUTORIAL_YAML)
    assert spec.dataset.source == TUTORIAL_URL
    assert spec.dataset.image_size == (150, 150)
    assert spec.dataset.batch_size == 20
    assert spec.dataset.label_mode == "binary"
    assert spec.dataset.train == "cats_and_dogs_filtered/train"
    assert spec.dataset.validation == "cats_and_dogs_filtered/validation"
    assert spec.dataset.validation_split is None
    assert spec.training.epochs == 15
    assert spec.training.optimizer == "adam"
    assert spec.training.learning_rate == 0.001
    assert spec.training.loss == "binary_crossentropy"
    assert spec.model.builtin == "simple_cnn"
    assert spec.model.factory is None
    assert spec.model.params == {"filters": 32, "dense": 512}
    assert spec == _tutorial_spec()


def test_defaults_reproduce_the_tutorials_settings() -> None:
    tutorial = load_spec(TUTORIAL_YAML)
    for spec in (
        JobSpec(name="defaults", dataset=DatasetSpec(source=TUTORIAL_URL)),
        parse_spec({"name": "defaults", "dataset": {"source": TUTORIAL_URL}}),
    ):
        assert spec.priority == tutorial.priority
        assert spec.dataset.source == TUTORIAL_URL
        assert spec.dataset.sha256 is None
        assert spec.dataset.image_size == tutorial.dataset.image_size == (150, 150)
        assert spec.dataset.batch_size == tutorial.dataset.batch_size == 20
        assert spec.dataset.label_mode == tutorial.dataset.label_mode == "binary"
        assert spec.model.builtin == tutorial.model.builtin == "simple_cnn"
        assert spec.model.factory is None
        assert spec.training == tutorial.training
        assert spec.checkpoint == tutorial.checkpoint
        assert spec.export == tutorial.export


# --- the model itself ---------------------------------------------------------------------------------------


def test_job_spec_is_frozen() -> None:
    spec = _tutorial_spec()
    with pytest.raises(ValidationError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        spec.training.epochs = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        spec.dataset.batch_size = 1  # type: ignore[misc]
    assert spec == _tutorial_spec()


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (JobSpec, {"name": "x", "dataset": {"source": "/d"}}),
        (DatasetSpec, {"source": "/d"}),
        (ModelSpec, {"builtin": "simple_cnn"}),
        (TrainingSpec, {}),
        (CheckpointSpec, {}),
        (ExportSpec, {}),
    ],
)
def test_extra_fields_are_forbidden(model: type, fields: dict[str, Any]) -> None:
    model(**fields)  # valid without the extra field
    with pytest.raises(ValidationError) as caught:
        model(**fields, surprise=1)
    assert [error["type"] for error in caught.value.errors()] == ["extra_forbidden"]


def test_json_schema_describes_every_section() -> None:
    schema = json_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert schema["type"] == "object"
    assert {"name", "priority", "dataset", "model", "training", "checkpoint", "export"} <= set(schema["properties"])
    assert {"name", "dataset"} <= set(schema["required"])
    assert schema.get("additionalProperties") is False
    definitions = schema["$defs"]
    for section, fields in SECTION_FIELDS.items():
        node = schema["properties"][section]
        refs = [node.get("$ref")] + [item.get("$ref") for item in node.get("allOf", []) + node.get("anyOf", [])]
        ref = next(ref for ref in refs if ref)
        target = definitions[ref.rsplit("/", 1)[-1]]
        assert set(target["properties"]) == fields, section
        assert target.get("additionalProperties") is False, section


def test_tutorial_job_validates_against_the_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    tutorial = yaml.safe_load(TUTORIAL_YAML.read_text())
    assert list(validator.iter_errors(tutorial)) == []
    assert list(validator.iter_errors({**tutorial, "surprise": 1}))
    assert list(validator.iter_errors({**tutorial, "training": {"epochs": 0}}))
    assert list(validator.iter_errors({**tutorial, "name": "Cats vs Dogs"}))  # editors flag a bad name too


def test_a_relative_source_is_resolved_against_the_spec_files_folder(tmp_path: Path) -> None:
    folder = tmp_path / "specs"
    folder.mkdir()
    path = folder / "job.yaml"
    path.write_text("name: job\ndataset: {source: ../data/images.zip}\n")
    assert load_spec(path).dataset.source == str((tmp_path / "data" / "images.zip").resolve())
    path.write_text("name: job\ndataset: {source: https://data.invalid/x.zip}\n")
    assert load_spec(path).dataset.source == "https://data.invalid/x.zip"


@pytest.mark.parametrize(("written", "value"), [("1e-3", 1e-3), ("1E-4", 1e-4), ("5e-5", 5e-5), ("2.5e-4", 2.5e-4)])
def test_numbers_with_an_exponent_and_no_dot_are_floats_in_yaml(tmp_path: Path, written: str, value: float) -> None:
    # YAML 1.1 reads `1e-3` as a string: refused as "not a number" before this was fixed.
    path = tmp_path / "job.yaml"
    path.write_text(f"name: job\ndataset: {{source: /data}}\ntraining: {{learning_rate: {written}}}\n")
    spec = load_spec(path)
    assert spec.training.learning_rate == value and isinstance(spec.training.learning_rate, float)
    assert load_spec_text(spec.to_yaml(), tmp_path).training.learning_rate == value  # the frozen copy reads back


def test_strings_that_look_like_exponents_stay_strings_in_the_frozen_copy(tmp_path: Path) -> None:
    spec = parse_spec(make_spec_dict("1e5", model={"params": {"code": "2e3"}}))
    again = load_spec_text(spec.to_yaml(), tmp_path)
    assert again.name == "1e5" and again.model.params["code"] == "2e3"


@pytest.mark.parametrize("written", ["yes", "true", "1e", "fast"])
def test_words_stay_refused_where_a_number_is_wanted(tmp_path: Path, written: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(f"name: job\ndataset: {{source: /data}}\ntraining: {{learning_rate: {written}}}\n")
    [problem] = _problems_of(path)
    assert problem.startswith("training.learning_rate:"), problem


def load_spec_text(text: str, folder: Path) -> JobSpec:
    path = folder / "frozen.yaml"
    path.write_text(text)
    return load_spec(path)


def test_keep_done_above_keep_is_refused_with_the_fix() -> None:
    with pytest.raises(SpecError, match=r"checkpoint.keep_done \(3\) is more than checkpoint.keep \(2\).*set keep_done to 2"):
        parse_spec(make_spec_dict("job", checkpoint={"keep": 2, "keep_done": 3}))
    assert parse_spec(make_spec_dict("job", checkpoint={"keep": 2, "keep_done": 0})).checkpoint.keep_done == 0
