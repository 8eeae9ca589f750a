"""What goes over the wire for studies."""

import uuid
from datetime import datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.core.models import JobStatus


class StudyCreate(BaseModel):
    """A grid over a base spec, or a preset (whose dataset, architecture, epochs and seeds
    may be overridden)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    base: dict[str, Any] | None = Field(
        None, description="a job spec; the grid's values are set into it"
    )
    grid: dict[str, list[Any]] | None = Field(
        None,
        description="dotted spec path -> values; one job per point of the cartesian product",
        examples=[{"model.normalization.type": ["none", "batch_norm"], "seed": [0, 1, 2]}],
    )
    preset: str | None = Field(None, description="a named study; see GET /v1/studies/presets")
    dataset: str | None = Field(None, description="preset only: the dataset to use")
    architecture: Literal["mlp", "cnn", "resnet"] | None = Field(
        None, description="preset only: the one architecture to use"
    )
    epochs: int | None = Field(None, ge=1, description="preset only")
    seeds: list[int] | None = Field(None, min_length=1, description="preset only")

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
