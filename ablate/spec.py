"""The study file's schema: frozen pydantic sections, and the helpers that name their fields.

Below `study` and `search` (both import it, it imports neither), so there is no import cycle.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)


class Strict(BaseModel):
    """Frozen, and unknown keys are errors (a typo must never be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(Strict):
    name: Literal["synthetic", "cifar10", "cifar100", "imagefolder"] = "synthetic"
    root: str | None = Field(None, description="folder or archive (default: $ABLATE_DATA); "
                                             "${VAR} expanded by the driver")
    download: bool = False
    image_size: PositiveInt | None = None
    num_classes: PositiveInt | None = Field(None, description="synthetic only (default 10)")
    channels: PositiveInt | None = Field(None, description="1 or 3; None keeps the source's")
    train_size: PositiveInt = Field(5000, description="synthetic only")
    test_size: PositiveInt = Field(1000, description="synthetic only")
    seed: int = Field(0, description="synthetic generator seed")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    allow_no_val: bool = Field(False, description="true: val_fraction 0 is intended (no "
                                                  "val metrics; nothing may select on them)")
    split_seed: int = 0
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    max_train: PositiveInt | None = None
    max_test: PositiveInt | None = None

    def known_image_size(self) -> int | None:
        if self.image_size is not None:
            return self.image_size
        return 32 if self.name in ("synthetic", "cifar10", "cifar100") else None


class MatchSpec(Strict):
    """Equal compute: the cost every cell is brought to by choosing its `by` field."""

    gmacs: float | None = Field(None, description="forward GMACs per image (give one key)")
    params: float | None = Field(None, description="parameter count")
    by: Literal["dim", "depth"] = "dim"
    tolerance: float = Field(0.05, gt=0.0, lt=1.0, description="relative distance allowed")

    def target(self) -> tuple[str, float] | None:
        """(cost key, target) when exactly one cost key is given."""
        given = [(k, v) for k, v in (("gmacs", self.gmacs), ("params", self.params))
                 if v is not None]
        return given[0] if len(given) == 1 else None


class ModelSpec(Strict):
    """The backbone's arguments; None means the model's default (the paper's baseline)."""

    arch: str = Field("backbone", description="backbone | a reference name | timm:<name>")
    mixer: str | None = None
    dim: PositiveInt | None = None
    depth: PositiveInt | None = None
    patch_size: PositiveInt | None = None
    heads: PositiveInt | None = Field(None, description="None: dim // 64 (ViT's 64-d heads)")
    mlp_ratio: PositiveFloat | None = None
    token_mlp_ratio: PositiveFloat | None = None
    kernel_size: PositiveInt | None = None
    window_size: PositiveInt | None = None
    drop_path: float | None = Field(None, ge=0.0, lt=1.0)
    tokens: PositiveInt | None = None
    token_learner_at: NonNegativeInt | None = None
    token_learner_version: Literal["1.0", "1.1"] | None = None
    token_fuser: bool | None = None
    pos_embed: Literal["learned", "cpe", "none"] | None = Field(
        None, description="None: the mixer's paper (attention learned, dual cpe, others none)")
    match: MatchSpec | None = Field(None, description="equal compute: pick dim or depth per cell")


class TrainSpec(Strict):
    epochs: PositiveInt = 10
    # epochs: `epochs` passes over the trial's own training subset (a smaller data fraction
    # takes fewer optimizer steps); steps: the optimizer steps of `epochs` full-data epochs,
    # whatever the fraction, so the data axis is not confounded with the training budget
    budget: Literal["epochs", "steps"] = "epochs"
    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 512
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["onecycle", "cosine"] = "cosine"
    warmup_epochs: NonNegativeFloat = 1.0
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    grad_clip: PositiveFloat | None = 1.0
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="auto: the fastest of fp32/bf16 on the device, by a probe")
    augment: tuple[Literal["crop", "flip"], ...] = ("crop", "flip")
    crop_padding: NonNegativeInt = 4
    precision_scope: Literal["study", "architecture"] = Field(
        "study", description="precision auto: study = one precision for every architecture "
                             "(the fastest in total by their probes); architecture = each "
                             "its own fastest (mixes precisions across the compared models)")
    channels_last: bool | Literal["auto"] = Field(
        False, description="auto: channels_last where the probe finds it faster")
    compile: bool = Field(False, description="torch.compile the model (CPU and CUDA)")
    max_minutes: PositiveFloat | None = None
    profile_batch_size: PositiveInt = 64
    profile_seconds: PositiveFloat = 0.5


class SearchSpec(Strict):
    method: Literal["grid", "optuna"] = "grid"
    sampler: Literal["tpe", "nsga2", "random", "cmaes"] = "tpe"
    n_trials: PositiveInt = 20
    objectives: dict[str, Literal["max", "min"]] = Field(default_factory=lambda: {"val_acc": "max"})
    space: dict[str, Any] = Field(default_factory=dict)
    storage: str | None = None


class TuneSpec(Strict):
    """Equal tuning: an Optuna search per level of `per` before the grid, on val_acc; every
    grid trial then takes its level's best values."""

    per: list[str] = Field(default_factory=list, description="factor keys; [] tunes once")
    space: dict[str, Any] = Field(default_factory=dict)
    n_trials: PositiveInt = 12
    epochs: PositiveInt | None = Field(None, description="per tuning trial (default: train's)")
    seeds: list[int] = Field(default_factory=lambda: [0])


class SchedulerSpec(Strict):
    name: Literal["fifo", "asha"] = "fifo"
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    grace_period: PositiveInt = 1
    reduction_factor: float = Field(3.0, gt=1.0)


class ResourcesSpec(Strict):
    cpus_per_trial: PositiveFloat = 1.0
    gpus_per_trial: NonNegativeFloat = 0.0
    max_concurrent: PositiveInt | None = None


class FailuresSpec(Strict):
    max_retries: NonNegativeInt = 1


class TrackingSpec(Strict):
    uri: str | None = None
    experiment: str | None = Field(None, description="default: the study name")


Levels = dict[str, list[Any]]


class StudySpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    dataset: DatasetSpec = DatasetSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    factors: Levels | list[Levels] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0])
    search: SearchSpec = SearchSpec()
    tune: TuneSpec | None = None
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourcesSpec = ResourcesSpec()
    failures: FailuresSpec = FailuresSpec()
    tracking: TrackingSpec = TrackingSpec()

    def grids(self) -> list[Levels]:
        return self.factors if isinstance(self.factors, list) else [self.factors]


SECTION_MODELS: dict[str, type[Strict]] = {
    "dataset": DatasetSpec, "model": ModelSpec, "train": TrainSpec,
}


def did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; known keys: {', '.join(options)}" if options else ""


NESTED: dict[tuple[str, str], type[Strict]] = {("model", "match"): MatchSpec}


# dataset fields that cannot be a factor or a search dimension: their levels would differ in
# more than the field (their reason, one line, ends with the fix)
NOT_A_FACTOR: dict[str, str] = {
    "dataset.train_size": "each size is a synthetic set of its own (other training images, "
    "another validation and test set), so its levels differ in more than their size; vary "
    "dataset.fraction for a data axis (nested subsets, one validation and test set)",
    "dataset.test_size": "each level scores on another test set; keep it fixed",
    "dataset.max_train": "the cap applies before the validation hold-out and sets the steps "
    "budget, so its levels differ in their validation set and steps too; vary "
    "dataset.fraction for a data axis (nested subsets, one validation and test set)",
}


def split_key(key: str) -> tuple[str, str] | str:
    """(section, field) of a dotted key, or the reason it names no field. A field of a nested
    section (`model.match.gmacs`) comes back as (`model`, `match.gmacs`)."""
    parts = key.split(".")
    if len(parts) == 3 and tuple(parts[:2]) in NESTED:
        fields = list(NESTED[parts[0], parts[1]].model_fields)
        if parts[2] not in fields:
            return f"{parts[0]}.{parts[1]} has no field '{parts[2]}'" + did_you_mean(parts[2],
                                                                                     fields)
        return parts[0], f"{parts[1]}.{parts[2]}"
    if len(parts) != 2 or parts[0] not in SECTION_MODELS:
        return ("not a dotted path into dataset, model or train, such as model.mixer or "
                "dataset.fraction")
    section, name = parts
    fields = list(SECTION_MODELS[section].model_fields)
    if name not in fields:
        return f"{section} has no field '{name}'" + did_you_mean(name, fields)
    return section, name


def set_field(values: dict[str, Any], name: str, value: Any) -> None:
    """Set `name` (a field, or `match.gmacs` for a nested one) in a section's dumped values."""
    outer, _, inner = name.partition(".")
    if not inner:
        values[outer] = value
        return
    values[outer] = {**(values.get(outer) or {}), inner: value}


def drop_scope(train: dict[str, Any], auto: bool) -> dict[str, Any]:
    """`train` (a dumped TrainSpec, changed in place) without `precision_scope` unless it is
    `study` and the precision may be `auto`: only `auto` with one precision for the study
    trains otherwise than before the field existed (then each architecture picked its own),
    so only it is a new trial or search, and the per-architecture runs of an older `auto`
    study keep their ids under `architecture`."""
    if not (auto and train.get("precision_scope") == "study"):
        train.pop("precision_scope", None)
    return train
