"""What goes over the wire for datasets."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from app.core.catalog import DatasetInfo
from app.core.models import Dataset


class DatasetRead(BaseModel):
    name: str  # what a spec's dataset.name says: a built-in name, or upload:<id>
    # An upload's label, from the upload's `name` form field (or its file name): shown to
    # people, never accepted in a spec. None for built-in datasets.
    display_name: str | None = None
    source: Literal["builtin", "upload"]
    tenant: str | None = None  # an upload's owner; built-in datasets belong to everyone
    kind: Literal["tabular", "sequence", "image"]
    input_shape: list[int]
    num_classes: int
    n_samples: int
    synthetic: bool
    description: str
    # Uploads whose labels were strings: the label of each class index, in order.
    class_names: list[str] | None = None
    created_at: datetime | None = None

    @classmethod
    def from_info(cls, info: DatasetInfo, row: Dataset | None = None) -> "DatasetRead":
        """A built-in dataset from its catalog entry, or an upload from its info and row."""
        return cls(
            name=info.name,
            display_name=None if row is None else row.name,
            source="builtin" if row is None else "upload",
            kind=info.kind,
            input_shape=list(info.input_shape),
            num_classes=info.num_classes,
            n_samples=info.n_samples,
            synthetic=info.synthetic,
            description=info.description,
            tenant=None if row is None else row.tenant,
            class_names=None if row is None else row.class_names,
            created_at=None if row is None else row.created_at,
        )


class DatasetList(BaseModel):
    items: list[DatasetRead]
