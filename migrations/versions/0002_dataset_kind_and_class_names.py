"""datasets: kind (tabular, sequence or image) and the class names of string labels

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # No rows can predate this revision (uploads arrive with it), so the default never has to
    # tell an old 2-D image from a table.
    with op.batch_alter_table("datasets") as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), server_default="tabular", nullable=False)
        )
        batch_op.add_column(sa.Column("class_names", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch_op:
        batch_op.drop_column("class_names")
        batch_op.drop_column("kind")
