"""Tenants: who is calling, and the one helper that limits every query to what they may see.

Every job, dataset and study row carries its tenant. A service never filters by tenant itself: it
passes its query through `scoped`, so the rule lives in one place.
"""

import uuid
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from app.core.models import DEFAULT_TENANT, Checkpoint, Dataset, Job, Study
from app.core.models.keys import ApiKey

_Row = TypeVar("_Row")


@dataclass(frozen=True)
class Caller:
    """Whoever made the request: their tenant, whether they are an admin, and their key."""

    tenant: str
    admin: bool = False
    key_id: uuid.UUID | None = None  # None when auth is off

    @classmethod
    def from_key(cls, key: ApiKey) -> "Caller":
        return cls(tenant=key.tenant, admin=key.admin, key_id=key.id)


# Auth off (`trainsvc up`, TRAINSVC_AUTH=off): one user, who owns everything.
UNAUTHENTICATED = Caller(tenant=DEFAULT_TENANT, admin=True)


def scoped(
    query: Select[_Row],
    model: type[Job] | type[Dataset] | type[Study],
    caller: Caller,
    tenant: str | None = None,
) -> Select[_Row]:
    """`query` limited to the caller's tenant; an admin sees every tenant, or only `tenant`."""
    if not caller.admin:
        query = query.where(model.tenant == caller.tenant)
    if tenant is not None:
        query = query.where(model.tenant == tenant)
    return query


def storage_bytes(session: Session, tenant: str) -> int:
    """What a tenant stores: its uploads plus its jobs' checkpoints, in bytes."""
    uploads = session.scalar(
        select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant == tenant)
    )
    checkpoints = session.scalar(
        select(func.coalesce(func.sum(Checkpoint.size_bytes), 0))
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Job.tenant == tenant)
    )
    return int(uploads or 0) + int(checkpoints or 0)
