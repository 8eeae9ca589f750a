"""What goes over the wire for studies."""

import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.core.models import JobStatus
from app.core.spec import Name, unstorable

# A job spec nests four levels at most (model.dropout.rate's list), and a grid adds two. The
# base and the grid's values are free-form JSON until a study expands them, and expanding
# copies them: past a few hundred levels that would exhaust Python's recursion limit (a 500).
MAX_NESTING = 8


def _walk(value: Any) -> Iterator[tuple[Any, int]]:
    """Every key and value of a JSON value with its depth (objects and lists count one level),
    without recursing."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        yield item, depth
        if isinstance(item, dict):
            pending.extend((key, depth + 1) for key in item)
            item = list(item.values())
        if isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)


def nesting(value: Any) -> int:
    """How deep objects and lists nest in a JSON value (a scalar is 0)."""
    return max(
        (depth + 1 for item, depth in _walk(value) if isinstance(item, dict | list)), default=0
    )


def _check_json(value: dict[str, Any]) -> None:
    if (depth := nesting(value)) > MAX_NESTING:
        raise ValueError(f"nested {depth} levels deep; a study's JSON nests at most {MAX_NESTING}")
    for item, _ in _walk(value):
        if isinstance(item, str) and (reason := unstorable(item)) is not None:
            raise ValueError(f"a key or string value {reason}")


class StudyCreate(BaseModel):
    """A grid over a base spec, or a preset (whose dataset, architecture, epochs and seeds
    may be overridden)."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    base: dict[str, Any] | None = Field(
        None, description="a job spec; the grid's values are set into it"
    )
    grid: dict[str, list[Any]] | None = Field(
        None,
        description="dotted spec path -> values; one job per point of the cartesian product",
        examples=[{"model.normalization.type": ["none", "batch_norm"], "seed": [0, 1, 2]}],
    )
    preset: Name | None = Field(None, description="a named study; see GET /v1/studies/presets")
    dataset: Name | None = Field(None, description="preset only: the dataset to use")
    architecture: Literal["mlp", "cnn", "resnet"] | None = Field(
        None, description="preset only: the one architecture to use"
    )
    epochs: int | None = Field(None, ge=1, strict=True, description="preset only")
    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1, strict=True)]] | None = Field(
        None, min_length=1, description="preset only"
    )

    @field_validator("base", "grid")
    @classmethod
    def _storable_json(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            _check_json(value)
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int] | None) -> list[int] | None:
        # Checked here, not as the grid's seed axis, so that the 422 names what was sent.
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a seed is listed twice")
        return value

    @model_validator(mode="after")
    def _either_grid_or_preset(self) -> Self:
        if self.preset is None:
            if self.base is None or not self.grid:
                raise ValueError("give base and a non-empty grid, or a preset")
            options = ("dataset", "architecture", "epochs", "seeds")
            given = [name for name in options if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} apply to presets only")
        elif self.base is not None or self.grid is not None:
            raise ValueError("a preset brings its own base and grid; give one or the other")
        return self


class StudyJob(BaseModel):
    id: uuid.UUID
    status: JobStatus
    grid_point: dict[str, Any]


class StudySummary(BaseModel):
    id: uuid.UUID
    name: str | None
    preset: str | None
    created_at: datetime
    ended: bool = Field(description="true once no job is queued or running")
    counts: dict[str, int] = Field(description="jobs by status")


class StudyRead(StudySummary):
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    jobs: list[StudyJob]


class StudyPage(BaseModel):
    items: list[StudySummary]
    next_cursor: str | None


class PresetRead(BaseModel):
    name: str
    description: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]


class PresetList(BaseModel):
    items: list[PresetRead]


# -- the report (app/core/studies/report.py builds it; these models are its contract) --------


class Aggregate(BaseModel):
    """A figure over a configuration's succeeded seeds."""

    mean: float | None
    std: float | None = Field(description="sample standard deviation; null below two values")
    n: int


class EpochsToTarget(Aggregate):
    never_reached: int = Field(description="succeeded seeds that never reached the target")


class Interval(BaseModel):
    """An estimate with its bootstrap 95% interval, over n values (or pairs)."""

    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


class ProbeFigure(BaseModel):
    over_epochs: Interval = Field(description="the mean over seeds of each seed's epoch mean")
    final_epoch: Interval = Field(description="the mean over seeds of each seed's last epoch")


class ConfigurationReport(BaseModel):
    configuration: dict[str, Any] = Field(description="the grid point without the seed")
    jobs: int
    succeeded: int
    diverged: int
    pending: int = Field(description="queued or running")
    best_val_accuracy: Aggregate
    final_val_accuracy: Aggregate
    final_val_loss: Aggregate
    generalization_gap_final: Aggregate
    generalization_gap_at_best: Aggregate
    epochs_to_target: EpochsToTarget
    step_loss_roughness: Aggregate
    seconds_per_epoch: Aggregate
    packed: int = Field(description="succeeded jobs that trained in a pack (see seconds_note)")
    probes: dict[str, ProbeFigure] | None = Field(
        None, description="present where its jobs asked for probes (spec.diagnostics)"
    )


class Effect(Interval):
    kind: str = Field(description="what the estimate is: a difference or a ratio, of what")
    reading: str = Field(description="the estimate in words, claiming no more than its interval")


class EffectReport(BaseModel):
    """One axis value against its baseline, paired over the other axes and the seeds."""

    axis: str
    value: Any
    baseline: Any
    pairs: int
    epochs_to_target: Effect
    best_val_accuracy: Effect
    generalization_gap: Effect
    probes: dict[str, Effect] | None = Field(None, description="present where jobs had probes")


class LearningRateVerdict(BaseModel):
    lr: float
    stable: bool
    reason: str


class StableLearningRate(BaseModel):
    configuration: dict[str, Any]
    max_stable_lr: float | None
    by_lr: list[LearningRateVerdict]


class MaxStableLearningRate(BaseModel):
    chance_margin: float
    configurations: list[StableLearningRate]


class ReportTarget(BaseModel):
    val_accuracy: float | None
    source: str


class StudyReport(BaseModel):
    study_id: uuid.UUID
    name: str | None
    complete: bool = Field(description="no job is queued or running")
    counts: dict[str, int] = Field(description="jobs by status")
    note: str | None = Field(description="what the report does not cover yet, while jobs run")
    seconds_note: str | None = Field(
        description="set where jobs trained packed: what their seconds_per_epoch measure"
    )
    target: ReportTarget
    axes: list[str]
    configurations: list[ConfigurationReport]
    max_stable_lr: MaxStableLearningRate | None = Field(
        description="null unless optimizer.lr is an axis"
    )
    effects: list[EffectReport]
    plots: dict[str, str] = Field(description="plot name -> its PNG's URL")
