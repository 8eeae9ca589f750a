"""What goes over the wire for datasets."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel


class DatasetRead(BaseModel):
    name: str  # what a spec's dataset.name says: a built-in name, or upload:<id>
    source: Literal["builtin", "upload"]
    kind: Literal["tabular", "sequence", "image"]
    input_shape: list[int]
    num_classes: int
    n_samples: int
    synthetic: bool
    description: str
    created_at: datetime | None = None


class DatasetList(BaseModel):
    items: list[DatasetRead]
