"""The job spec: what to train, on what data, and how to checkpoint it.

Field names are a contract (users' YAML files use them). Defaults reproduce the tutorial's cats-vs-dogs job.
Every problem is reported as one line naming the field path and what is allowed.
"""

from __future__ import annotations

import errno
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runner import storage
from runner.errors import SpecError, StorageError
from runner.networks import params_problem

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
"""Job names: they become folder names on Drive, so no slashes, no leading dot, no spaces, no capitals."""

FACTORY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"

TUTORIAL_DATASET_URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"

LabelMode = Literal["binary", "categorical", "int"]
Optimizer = Literal["adam", "adamw", "sgd", "rmsprop", "adagrad", "nadam"]
Loss = Literal[
    "binary_crossentropy",
    "categorical_crossentropy",
    "sparse_categorical_crossentropy",
    "mean_squared_error",
    "mean_absolute_error",
    "hinge",
]

LOSSES_FOR_LABELS: dict[str, tuple[str, ...]] = {
    "binary": ("binary_crossentropy", "hinge", "mean_squared_error", "mean_absolute_error"),
    "categorical": ("categorical_crossentropy", "mean_squared_error", "mean_absolute_error"),
    "int": ("sparse_categorical_crossentropy",),
}
"""The losses that fit each ``dataset.label_mode``; the first is the one to advise."""


def loss_label_problem(loss: str, label_mode: str) -> str | None:
    """Why ``loss`` cannot train on labels of ``label_mode``, as one line; ``None`` when it can."""
    if loss in LOSSES_FOR_LABELS[label_mode]:
        return None
    fitting_modes = " or ".join(mode for mode, losses in LOSSES_FOR_LABELS.items() if loss in losses)
    return (
        f"training.loss {loss!r} does not fit dataset.label_mode {label_mode!r}: "
        f"use {LOSSES_FOR_LABELS[label_mode][0]}, or label_mode: {fitting_modes}"
    )


ExportFormat = Literal["keras", "h5", "saved_model"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AugmentSpec(_Section):
    """Random changes to each training image, the same on every resume (validation images are left as they are)."""

    flip: Literal["horizontal", "vertical", "both"] | None = Field(default=None, description="mirror half the images")
    rotation: float = Field(
        default=0.0, strict=True, ge=0, le=0.5, description="turn by up to this fraction of a full turn, either way"
    )
    zoom: float = Field(default=0.0, strict=True, ge=0, lt=1, description="zoom in or out by up to this fraction")
    translation: float = Field(
        default=0.0, strict=True, ge=0, le=0.5, description="shift by up to this fraction of the height and width"
    )
    contrast: float = Field(default=0.0, strict=True, ge=0, lt=1, description="scale the contrast by 1 ± up to this")
    brightness: float = Field(
        default=0.0, strict=True, ge=0, le=1, description="shift the brightness by up to this fraction of 255"
    )

    @model_validator(mode="after")
    def _changes_something(self) -> AugmentSpec:
        if self.flip is None and not any((self.rotation, self.zoom, self.translation, self.contrast, self.brightness)):
            raise ValueError("changes nothing: give flip, rotation, zoom, translation, contrast or brightness")
        return self


class DatasetSpec(_Section):
    """Where the images come from and how they are batched."""

    source: str = Field(min_length=1, description="URL, path to a .zip/.tar.gz (local or on Drive), or a directory")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$", description="checked when given")
    train: str = Field(default="train", min_length=1, description="folder in the source, one subfolder per class")
    validation: str | None = Field(default=None, min_length=1, description="validation folder in the source")
    validation_split: float | None = Field(
        default=None, strict=True, gt=0, lt=1, description="fraction of train held out, instead of a validation folder"
    )
    image_size: tuple[int, int] = Field(default=(150, 150), description="height and width images are resized to")
    color_mode: Literal["rgb", "grayscale"] = Field(default="rgb", description="3 channels or 1")
    label_mode: LabelMode = Field(
        default="binary", description="binary: 2 classes, one 0/1 output; categorical: one-hot; int: class numbers"
    )
    batch_size: int = Field(default=20, strict=True, ge=1, le=65536, description="images per training step")
    augment: AugmentSpec | None = Field(default=None, description="random changes to the training images")

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= side <= 8192 for side in size):
            raise ValueError(f"each side must be between 1 and 8192 pixels, got {list(size)}")
        return size

    @field_validator("train", "validation")
    @classmethod
    def _relative_folder(cls, folder: str | None) -> str | None:
        if folder is not None and (folder.startswith("/") or ".." in Path(folder).parts):
            raise ValueError(f"must be a folder inside the source, without '..' or a leading '/', got {folder!r}")
        return folder

    @model_validator(mode="after")
    def _one_validation(self) -> DatasetSpec:
        if self.validation is not None and self.validation_split is not None:
            raise ValueError("give either validation (a folder) or validation_split (a fraction), not both")
        return self


class ModelSpec(_Section):
    """The network: a built-in one or a factory of the user's."""

    builtin: Literal["simple_cnn", "mobilenet_v2", "efficientnet_b0", "resnet50"] | None = Field(
        default=None, description="a network that comes with runner"
    )
    factory: str | None = Field(
        default=None,
        pattern=FACTORY_PATTERN,
        description='"package.module:function", called with the input shape, number of classes and params',
    )
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the model")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSpec:
        if (self.builtin is None) == (self.factory is None):
            raise ValueError(
                "give exactly one of builtin (simple_cnn | mobilenet_v2 | efficientnet_b0 | resnet50) or factory "
                "(package.module:fn)"
            )
        return self


MAX_STEPS_PER_EXECUTION = 10_000


ScheduleKind = Literal["constant", "cosine", "exponential", "step", "polynomial"]

_SCHEDULE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "cosine": ("alpha",),
    "exponential": ("decay_rate", "decay_epochs"),
    "step": ("factor", "decay_epochs"),
    "polynomial": ("end_learning_rate", "power"),
}
"""Which parameters each schedule takes (``warmup_epochs`` goes with every one)."""


class LrScheduleSpec(_Section):
    """How the learning rate moves from `training.learning_rate`, counted in optimizer steps."""

    kind: ScheduleKind = Field(default="constant", description="constant, cosine, exponential, step or polynomial")
    warmup_epochs: float = Field(
        default=0, strict=True, ge=0, description="first rise linearly from 0 to learning_rate over this many epochs"
    )
    alpha: float = Field(
        default=0.0, strict=True, ge=0, le=1, description="cosine: the last rate, as a fraction of learning_rate"
    )
    decay_rate: float = Field(
        default=0.9,
        strict=True,
        gt=0,
        lt=1,
        description="exponential: the rate is multiplied by this every decay_epochs",
    )
    decay_epochs: float = Field(default=1, strict=True, gt=0, description="exponential and step: epochs per decay")
    factor: float = Field(
        default=0.1, strict=True, gt=0, lt=1, description="step: the rate is multiplied by this every decay_epochs"
    )
    end_learning_rate: float = Field(
        default=0.0, strict=True, ge=0, description="polynomial: the rate at the last step"
    )
    power: float = Field(default=1.0, strict=True, gt=0, description="polynomial: 1 is a straight line down")

    @model_validator(mode="before")
    @classmethod
    def _kind_alone(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value  # `lr_schedule: cosine`

    @model_validator(mode="after")
    def _parameters_of_its_kind(self) -> LrScheduleSpec:
        # Compared with the defaults, not with what was given: a frozen spec.yaml holds every field.
        given = {name for name in self.model_fields_set if getattr(self, name) != type(self).model_fields[name].default}
        given -= {"kind", "warmup_epochs"}
        if stray := sorted(given - set(_SCHEDULE_PARAMETERS[self.kind])):
            takes = ", ".join(_SCHEDULE_PARAMETERS[self.kind]) or "no parameters"
            raise ValueError(
                f"{', '.join(stray)} is not a parameter of the {self.kind} schedule, which takes {takes} (and "
                "warmup_epochs): remove it or change kind"
            )
        return self

    @property
    def moves(self) -> bool:
        """Whether the rate changes during training at all."""
        return self.kind != "constant" or self.warmup_epochs > 0


class PlateauSpec(_Section):
    """Lower the learning rate when a metric stops improving, as Keras' ReduceLROnPlateau."""

    monitor: str | None = Field(
        default=None,
        description="an epoch metric (loss, val_accuracy, ...); by default val_loss, or loss without validation data",
    )
    factor: float = Field(default=0.1, strict=True, gt=0, lt=1, description="the rate is multiplied by this")
    patience: int = Field(default=5, strict=True, ge=0, description="epochs without improvement before lowering it")
    min_delta: float = Field(default=0.0001, strict=True, ge=0, description="smaller changes are no improvement")
    cooldown: int = Field(
        default=0, strict=True, ge=0, description="epochs to wait after lowering it before counting again"
    )
    min_lr: float = Field(default=0.0, strict=True, ge=0, description="the rate is never lowered below this")
    mode: Literal["auto", "min", "max"] = Field(
        default="auto", description="whether lower or higher is better; auto: higher for accuracy, auc, precision, recall"
    )


class EarlyStoppingSpec(_Section):
    """Stop when a metric stops improving, as Keras' EarlyStopping."""

    monitor: str | None = Field(
        default=None,
        description="an epoch metric (loss, val_accuracy, ...); by default val_loss, or loss without validation data",
    )
    patience: int = Field(default=5, strict=True, ge=0, description="epochs without improvement before stopping")
    min_delta: float = Field(default=0.0, strict=True, ge=0, description="smaller changes are no improvement")
    mode: Literal["auto", "min", "max"] = Field(
        default="auto",
        description="whether lower or higher is better; auto: higher for accuracy, auc, precision, recall",
    )
    restore_best: bool = Field(
        default=False, strict=True, description="end with the best epoch's weights (kept in every checkpoint)"
    )


HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "r2")
"""Parts of metric names whose higher values are better (``accuracy``, ``val_binary_accuracy``, ``mean_iou``,
``r2_score``...): ``mode: auto`` maximises them, as Keras' callbacks do; every other metric (and the loss) is
minimised."""


def monitor_mode(monitor: str, mode: str = "auto") -> str:
    """``"min"`` or ``"max"``: which way ``monitor`` improves."""
    if mode != "auto":
        return mode
    name = monitor.removeprefix("val_")
    return "max" if name != "loss" and any(word in name for word in HIGHER_IS_BETTER) else "min"


def resolved_monitor(spec: JobSpec, monitor: str | None) -> str:
    """The metric a plateau or an early stop watches: the one given, else val_loss (loss without validation)."""
    if monitor is not None:
        return monitor
    validated = spec.dataset.validation is not None or spec.dataset.validation_split is not None
    return "val_loss" if validated else "loss"


def training_problem(spec: JobSpec) -> str | None:
    """One line when the schedule, the plateau or the early stop contradicts the rest of the spec."""
    training = spec.training
    schedule = training.lr_schedule
    if schedule.warmup_epochs >= training.epochs:
        return (
            f"training.lr_schedule.warmup_epochs ({schedule.warmup_epochs:g}) must be less than training.epochs "
            f"({training.epochs}): the warm-up would take the whole training"
        )
    if schedule.kind == "polynomial" and schedule.end_learning_rate >= training.learning_rate:
        return (
            f"training.lr_schedule.end_learning_rate ({schedule.end_learning_rate:g}) must be below "
            f"training.learning_rate ({training.learning_rate:g}): the polynomial schedule goes down to it"
        )
    plateau = training.reduce_lr_on_plateau
    if plateau is not None and plateau.min_lr >= training.learning_rate:
        return (
            f"training.reduce_lr_on_plateau.min_lr ({plateau.min_lr:g}) must be below training.learning_rate "
            f"({training.learning_rate:g}): the rate could never be lowered"
        )
    validated = spec.dataset.validation is not None or spec.dataset.validation_split is not None
    for where, watcher in (("reduce_lr_on_plateau", plateau), ("early_stopping", training.early_stopping)):
        if watcher is None or (monitor := watcher.monitor) is None:
            continue
        if monitor.startswith("val_") and not validated:
            return (
                f"training.{where}.monitor {monitor!r} needs validation data: set dataset.validation or "
                f"dataset.validation_split, or monitor {monitor.removeprefix('val_')!r}"
            )
        known = ("loss", *training.metrics)
        if spec.model.factory is None and monitor.removeprefix("val_") not in known:
            names = ", ".join(f"{prefix}{name}" for name in known for prefix in ("", "val_"))
            return f"training.{where}.monitor {monitor!r} is not a metric of this job: use one of {names}"
    return None


class TrainingSpec(_Section):
    """How long and how to train."""

    epochs: int = Field(default=15, strict=True, ge=1, le=1_000_000, description="passes over the training images")
    optimizer: Optimizer = Field(default="adam", description="Keras optimizer")
    learning_rate: float = Field(default=0.001, strict=True, gt=0, le=10, description="the optimizer's learning rate")
    loss: Loss = Field(default="binary_crossentropy", description="Keras loss; must fit dataset.label_mode")
    metrics: tuple[str, ...] = Field(default=("accuracy",), description="Keras metrics, reported every epoch")
    seed: int = Field(
        default=0, strict=True, ge=0, lt=2**31, description="seeds the data order, initial weights and random layers"
    )
    deterministic: bool = Field(
        default=False, strict=True, description="op determinism: bit-identical resumes on the CPU"
    )
    on_oom: Literal["fail", "halve_batch"] = Field(
        default="fail",
        description="on a GPU out-of-memory error: fail with advice, or go back to the last checkpoint and go on "
        "with half the batch size, halving again on each new error down to 1 (this changes the training trajectory: "
        "more optimizer steps, each on fewer images)",
    )
    steps_per_execution: Literal["auto"] | int = Field(
        default="auto",
        description="training steps per compiled call, with no host sync inside it: 'auto' (32, at most an epoch) "
        "or a number; mid-epoch checkpoints land between calls",
    )
    jit_compile: Literal["auto"] | bool = Field(
        default="auto",
        description="XLA-compile the training step: 'auto' (on a GPU, when every layer supports it), true or false",
    )
    mixed_precision: bool = Field(
        default=False,
        strict=True,
        description="mixed_float16: float16 compute, float32 weights, dynamic loss scaling (needs a GPU; the loss "
        "scale is in every checkpoint)",
    )
    distribute: Literal["auto", "none", "mirrored"] = Field(
        default="auto",
        description="several devices: 'auto' (mirrored over every visible GPU when there are several), 'none' (one "
        "device) or 'mirrored' (tf.distribute.MirroredStrategy; dataset.batch_size is the global batch)",
    )
    lr_schedule: LrScheduleSpec = Field(
        default_factory=LrScheduleSpec, description="how the learning rate moves: `cosine`, or a mapping with kind"
    )
    class_weight: Literal["balanced"] | dict[str, float] | None = Field(
        default=None,
        description="weigh each class's loss: `balanced` (by how rare it is), or class name -> weight (others 1)",
    )
    reduce_lr_on_plateau: PlateauSpec | None = Field(default=None, description="lower the rate when a metric stalls")
    early_stopping: EarlyStoppingSpec | None = Field(default=None, description="stop when a metric stops improving")

    @model_validator(mode="after")
    def _xla_without_op_determinism(self) -> TrainingSpec:
        if self.jit_compile is True and self.deterministic:
            raise ValueError(
                "jit_compile: true cannot go with deterministic: true (TensorFlow's op determinism has no XLA "
                "version of several ops, the gradient of MaxPooling among them): set one of them to false"
            )
        return self

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        return value

    @field_validator("steps_per_execution", mode="before")
    @classmethod
    def _steps_per_execution(cls, value: Any) -> Any:
        whole = isinstance(value, int) and not isinstance(value, bool)
        if value != "auto" and not (whole and 1 <= value <= MAX_STEPS_PER_EXECUTION):
            raise ValueError(f"must be 'auto' or a whole number from 1 to {MAX_STEPS_PER_EXECUTION}, got {value!r}")
        return value

    @field_validator("jit_compile", mode="before")
    @classmethod
    def _jit_compile(cls, value: Any) -> Any:
        if value != "auto" and not isinstance(value, bool):
            raise ValueError(f"must be 'auto', true or false, got {value!r}")
        return value

    @field_validator("class_weight", mode="before")
    @classmethod
    def _balanced_or_mapping(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = {str(name): weight for name, weight in value.items()}  # class folders 0, 1, 2 read as numbers
            for name, weight in value.items():
                try:
                    if isinstance(weight, bool):
                        raise TypeError  # yes/no is no weight, whatever YAML makes of it
                    float(weight)
                except (TypeError, ValueError):
                    raise ValueError(f"the weight of {name!r} must be a number, got {weight!r}") from None
            return value
        if value is None or value == "balanced":
            return value
        raise ValueError(f"must be `balanced` or a mapping of class name to weight, got {value!r}")

    @field_validator("class_weight")
    @classmethod
    def _positive_weights(cls, weights: str | dict[str, float] | None) -> str | dict[str, float] | None:
        if isinstance(weights, dict):
            if not weights:
                raise ValueError("give at least one class name and its weight, or `balanced`")
            if bad := [name for name, weight in weights.items() if not (math.isfinite(weight) and weight > 0)]:
                raise ValueError(f"weights must be positive finite numbers, got {weights[bad[0]]!r} for {bad[0]!r}")
        return weights

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, metrics: tuple[str, ...]) -> tuple[str, ...]:
        for metric in metrics:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", metric):
                raise ValueError(f"metric names are lower-case Keras names such as 'accuracy', got {metric!r}")
        return metrics


class CheckpointSpec(_Section):
    """When checkpoints are taken and how many are kept."""

    every_epochs: int = Field(
        default=1, strict=True, ge=1, description="checkpoint after every this many epochs (and after the last)"
    )
    every_minutes: float | None = Field(
        default=None, strict=True, gt=0, description="also checkpoint mid-epoch this often"
    )
    keep: int = Field(default=2, strict=True, ge=1, le=1000, description="committed checkpoints kept")
    keep_done: int = Field(
        default=1,
        strict=True,
        ge=0,
        le=1000,
        description="committed checkpoints kept once the job is done (0: none, final/ holds the model); at most keep",
    )

    @model_validator(mode="after")
    def _keep_done_within_keep(self) -> CheckpointSpec:
        if self.keep_done > self.keep:
            raise ValueError(
                f"checkpoint.keep_done ({self.keep_done}) is more than checkpoint.keep ({self.keep}): a done job has "
                f"at most keep checkpoints; set keep_done to {self.keep} or less"
            )
        return self


class ExportSpec(_Section):
    """What is exported when the job is done."""

    formats: tuple[ExportFormat, ...] = Field(
        default=("keras",), min_length=1, description="files written to final/ when the job is done"
    )
    optimizer: bool = Field(
        default=False,
        description="also the optimizer's state, compiled: with Adam 3x the size; only to train on from the export "
        "outside runner, whose checkpoints hold it",
    )
    best: bool = Field(
        default=False,
        strict=True,
        description="also final/best.keras, the best epoch's model (by early_stopping's monitor, else val_loss): its "
        "weights are then kept in every checkpoint",
    )

    @field_validator("formats")
    @classmethod
    def _unique(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(formats)) != len(formats):
            raise ValueError(f"formats must not repeat, got {list(formats)}")
        return formats


class JobSpec(_Section):
    """A training job: dataset, model, training, checkpoints and export."""

    name: str = Field(
        description="[a-z0-9][a-z0-9._-]{0,63}; also the job's folder name",
        # In the schema for editors; validated by _folder_safe, whose message says what is allowed.
        json_schema_extra={"pattern": NAME_PATTERN},
    )
    priority: int = Field(
        default=0, strict=True, ge=-1000, le=1000, description="higher runs first; ties by submission time"
    )
    dataset: DatasetSpec
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(builtin="simple_cnn"))
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)

    @field_validator("name")
    @classmethod
    def _folder_safe(cls, name: str) -> str:
        if not re.fullmatch(NAME_PATTERN, name) or ".." in name:
            raise ValueError(
                f"must be 1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit, "
                f"without '..', got {name!r}"
            )
        return name

    @model_validator(mode="after")
    def _loss_fits_labels(self) -> JobSpec:
        # Checked at submit, not only when a worker starts the job hours later on a GPU.
        if (problem := loss_label_problem(self.training.loss, self.dataset.label_mode)) is not None:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _schedule_and_monitors_fit(self) -> JobSpec:
        if (problem := training_problem(self)) is not None:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _builtin_params_fit(self) -> JobSpec:
        # At submit, not when the job starts: a wrong name or a fine-tune that never happens is found at once.
        if self.model.builtin is None:
            return self
        problem = params_problem(
            self.model.builtin,
            self.model.params,
            image_size=self.dataset.image_size,
            color_mode=self.dataset.color_mode,
            epochs=self.training.epochs,
            learning_rate=self.training.learning_rate,
        )
        if problem is not None:
            raise ValueError(problem)
        return self

    def to_yaml(self) -> str:
        """The spec as YAML with every field, defaults filled in."""
        # Python mode, not JSON mode: JSON mode would turn an infinite float in params into null.
        return yaml.dump(_plain(self.model_dump()), Dumper=_SpecDumper, sort_keys=False)


def _plain(value: Any) -> Any:
    """Tuples as lists, so that safe_dump can write them."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a job spec, for editors."""
    return JobSpec.model_json_schema()


def parse_spec(data: Any, *, source: str = "spec") -> JobSpec:
    """Validate parsed YAML/JSON; every problem becomes one line naming the field."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise SpecError(source, [f"the spec is {kind}; it must be a mapping with name, dataset, model, training, ..."])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(source, [_describe(problem) for problem in error.errors()]) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a spec file (YAML or JSON). A relative ``dataset.source`` is relative to the file."""
    path = Path(path)
    try:
        # Retried: a job's frozen spec lives on Drive, whose transient errors say nothing about the spec.
        text = storage.read_bytes(path).decode("utf-8")
    except StorageError as error:
        if error.errno_ == errno.ENOENT:
            raise SpecError(str(path), ["file not found"]) from None
        if error.transient:
            raise  # the mount kept failing: its own message, not "damaged"
        raise SpecError(str(path), [f"cannot read the file ({error})"]) from None
    except UnicodeDecodeError as error:
        raise SpecError(str(path), [f"cannot read the file ({error})"]) from None
    spec = parse_spec(_parse_text(text, str(path), json_only=path.suffix.lower() == ".json"), source=str(path))
    return _with_source_resolved(spec, base=path.parent)


def _with_source_resolved(spec: JobSpec, *, base: Path) -> JobSpec:
    source = spec.dataset.source
    if "://" in source or Path(source).expanduser().is_absolute():
        return spec
    resolved = str((base / source).resolve())
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"source": resolved})})


class _SpecLoader(yaml.SafeLoader):
    """YAML without aliases: a self-referencing alias makes a spec that never ends, and nested aliases turn a
    few hundred bytes into gigabytes once the frozen copy is written out."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not allowed in a job spec: write the value out",
                self.peek_event().start_mark,
            )
        return super().compose_node(parent, index)


class _SpecDumper(yaml.SafeDumper):
    """Writes the frozen spec so that :class:`_SpecLoader` reads back every value as it was."""


# YAML 1.1, which PyYAML reads, has no float without a dot and a signed exponent: `1e-3` and `5e-5` (how people
# write learning rates) would be strings, and refused as not a number. Read them as YAML 1.2 and JSON do; and
# write a string that looks like one (a job named `1e5`) quoted, so that the frozen copy reads back a string.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _side in (_SpecLoader, _SpecDumper):
    _side.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _parse_text(text: str, source: str, *, json_only: bool) -> Any:
    if json_only:
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(source, [f"line {error.lineno}, column {error.colno}: invalid JSON: {error.msg}"]) from None
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (a SafeLoader that also refuses aliases)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError(source, [f"{where}invalid YAML: {problem}"]) from None


def _describe(problem: Any) -> str:
    location = ".".join(_field(part) for part in problem["loc"]) or "(top level)"
    kind, message = problem["type"], problem["msg"]
    if not problem["loc"] and kind == "value_error":
        return message.removeprefix("Value error, ")  # a check across sections names its fields itself
    if kind == "extra_forbidden":
        allowed = _allowed_fields(problem["loc"][:-1])
        return f"{location}: unknown field; allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{location}: required field is missing"
    message = message.removeprefix("Value error, ")
    if kind not in ("value_error", "assertion_error") and "input" in problem:
        message = f"{message} (got {_short(problem['input'])})"
    return f"{location}: {message}"


def _field(part: Any) -> str:
    """A field name as shown: a name with newlines or terminal escapes is shown quoted, on one line."""
    text = str(part)
    return text if text and text.isprintable() else repr(text)


def _allowed_fields(location: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in location:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        # An optional section (`X | None`) is the section X here.
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        section = next((kind for kind in candidates if isinstance(kind, type) and issubclass(kind, BaseModel)), None)
        if section is None:
            break
        model = section
    return list(model.model_fields)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
