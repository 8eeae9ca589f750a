"""Studies: a base spec and a grid of axes, expanded into one job per grid point."""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, String, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models.base import Base, UTCDateTime, utcnow
from app.core.models.keys import DEFAULT_TENANT, TENANT_NAME_LENGTH


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (
        # Listing: a tenant's newest first, with (created_at, id) as the keyset.
        Index("ix_studies_tenant_created_at_id", "tenant", "created_at", "id"),
        # Idempotency keys are per tenant, as for jobs.
        UniqueConstraint("tenant", "idempotency_key"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(
        String(TENANT_NAME_LENGTH), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT
    )
    name: Mapped[str | None] = mapped_column(String(200))
    # The preset it came from, if any; base and grid are stored expanded either way.
    preset: Mapped[str | None] = mapped_column(String(64))
    base: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Axis (a dotted spec path) -> the values it takes, in the order given.
    grid: Mapped[dict[str, list[Any]]] = mapped_column(JSON)
    # sha256 of the canonical request: an Idempotency-Key reused with another body is a 409.
    request_sha256: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
