"""studies: a grid of job specs; jobs.study_id and jobs.grid_point

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.core.models.base

revision: str = "0005"
# Written beside 0003-0005 on other branches; the merge re-chains it after the last of them.
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant", sa.String(length=100), server_default="default", nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("preset", sa.String(length=64), nullable=True),
        sa.Column("base", sa.JSON(), nullable=False),
        sa.Column("grid", sa.JSON(), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column(
            "created_at", app.core.models.base.UTCDateTime(timezone=True), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint(
            "tenant", "idempotency_key", name=op.f("uq_studies_tenant_idempotency_key")
        ),
    )
    with op.batch_alter_table("studies") as batch_op:
        batch_op.create_index(
            "ix_studies_tenant_created_at_id", ["tenant", "created_at", "id"], unique=False
        )
    # SQLite cannot add a foreign key in place: batch mode rebuilds the table.
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("study_id", sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column("grid_point", sa.JSON(), nullable=True))
        batch_op.create_foreign_key(
            op.f("fk_jobs_study_id_studies"), "studies", ["study_id"], ["id"], ondelete="CASCADE"
        )
        batch_op.create_index(
            "ix_jobs_study_id_created_at_id", ["study_id", "created_at", "id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_study_id_created_at_id")
        batch_op.drop_constraint(op.f("fk_jobs_study_id_studies"), type_="foreignkey")
        batch_op.drop_column("grid_point")
        batch_op.drop_column("study_id")
    with op.batch_alter_table("studies") as batch_op:
        batch_op.drop_index("ix_studies_tenant_created_at_id")
    op.drop_table("studies")
