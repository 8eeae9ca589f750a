"""API keys: who may call the API, for which tenant; only a hash of each key is stored."""

import uuid
from datetime import datetime

from sqlalchemy import Boolean, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models.base import Base, UTCDateTime, utcnow

# The tenant of rows made without a key (auth off, or before keys existed).
DEFAULT_TENANT = "default"
TENANT_NAME_LENGTH = 100
DESCRIPTION_LENGTH = 200


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(TENANT_NAME_LENGTH), index=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    description: Mapped[str | None] = mapped_column(String(DESCRIPTION_LENGTH))
    # The key's first characters: not secret (too short to guess the rest from), shown by
    # `keys list`, and what a request's key is looked up by before its hash is compared.
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    # SHA-256 of the whole key, hex. The key is 256 random bits, so a fast hash is enough.
    key_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Written at most once a minute per key and API process, never once per request.
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
