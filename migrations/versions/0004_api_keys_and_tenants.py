"""API keys, and the tenant of every job and dataset; idempotency keys unique per tenant

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.core.models.base import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("description", sa.String(length=200), nullable=True),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    op.create_index(op.f("ix_api_keys_tenant"), "api_keys", ["tenant"], unique=False)

    # Rows from before keys existed belong to the default tenant, which auth-off requests act as.
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(
            sa.Column("tenant", sa.String(length=100), server_default="default", nullable=False)
        )
        batch_op.drop_constraint("uq_jobs_idempotency_key", type_="unique")
        batch_op.create_unique_constraint(
            "uq_jobs_tenant_idempotency_key", ["tenant", "idempotency_key"]
        )
        batch_op.create_index("ix_jobs_tenant_created_at_id", ["tenant", "created_at", "id"])
        batch_op.create_index("ix_jobs_tenant_status", ["tenant", "status"])
    with op.batch_alter_table("datasets") as batch_op:
        batch_op.add_column(
            sa.Column("tenant", sa.String(length=100), server_default="default", nullable=False)
        )
        batch_op.create_index("ix_datasets_tenant", ["tenant"])


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch_op:
        batch_op.drop_index("ix_datasets_tenant")
        batch_op.drop_column("tenant")
    # Going back to one global namespace fails if two tenants used the same key: the error
    # says so, and no data is dropped silently.
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_tenant_status")
        batch_op.drop_index("ix_jobs_tenant_created_at_id")
        batch_op.drop_constraint("uq_jobs_tenant_idempotency_key", type_="unique")
        batch_op.create_unique_constraint("uq_jobs_idempotency_key", ["idempotency_key"])
        batch_op.drop_column("tenant")
    op.drop_index(op.f("ix_api_keys_tenant"), table_name="api_keys")
    op.drop_table("api_keys")
