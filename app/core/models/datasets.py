"""Uploaded datasets: validated arrays stored in the database, named by specs as upload:<id>."""

import uuid
from datetime import datetime

from sqlalchemy import JSON, Integer, LargeBinary, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models.base import Base, UTCDateTime, utcnow
from app.core.models.keys import DEFAULT_TENANT, TENANT_NAME_LENGTH


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(
        String(TENANT_NAME_LENGTH),
        default=DEFAULT_TENANT,
        server_default=DEFAULT_TENANT,
        index=True,
    )
    name: Mapped[str] = mapped_column(String(200))
    source_format: Mapped[str] = mapped_column(String(8))  # npz | csv
    # tabular | sequence | image (app.core.catalog.DataKind): a [n, L] upload may be either
    # a feature vector or a 1-D signal, and only the uploader knows which.
    kind: Mapped[str] = mapped_column(String(16), server_default="tabular")
    n_samples: Mapped[int] = mapped_column(Integer)
    # Per-sample shape: [features] for tabular data, [length] or [height, width] otherwise.
    input_shape: Mapped[list[int]] = mapped_column(JSON)
    num_classes: Mapped[int] = mapped_column(Integer)
    # The uploaded label of each class index, when the labels were strings; else null.
    class_names: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # Canonical .npz (x float32, y int64), written by us and read back with allow_pickle=False.
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
