"""Tenants: who is calling, and the one helper that limits every query to what they may see.

Every job, dataset and study row carries its tenant. A service never filters by tenant itself: it
passes its query through `scoped`, so the rule lives in one place.
"""

import uuid
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, bindparam, func, select
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


@dataclass(frozen=True)
class ScopedRead(Generic[_Row]):
    """A polled read, built once with the caller's tenant as a bound parameter.

    `scoped(select(...))` builds a new statement on every call, and SQLAlchemy then computes
    its cache key and adapts the cached result columns to the new objects: together about two
    thirds of a job GET's database time (profiled: 720 us against 185 us with the same
    statement object reused). Routes that dashboards poll run a ScopedRead instead; the rule
    stays the one `scoped` applies.
    """

    everyone: Select[_Row]  # for an admin
    own: Select[_Row]  # for anyone else: only the caller's tenant

    @classmethod
    def of(cls, query: Select[_Row], model: type[Job] | type[Study]) -> "ScopedRead[_Row]":
        return cls(query, query.where(model.tenant == bindparam("caller_tenant")))

    def for_caller(self, caller: Caller, **parameters: Any) -> tuple[Select[_Row], dict[str, Any]]:
        """The statement and parameters that give `caller` what they may see."""
        if caller.admin:
            return self.everyone, parameters
        return self.own, {**parameters, "caller_tenant": caller.tenant}


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
