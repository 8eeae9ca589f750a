"""jobs.spec on SQLite: rewrite specs stored with \\uXXXX escapes as plain UTF-8 text

SQLite's json_extract matches a path's key against the stored text, so the tag filter never
found a non-ASCII tag key written as an escape (app/core/db.py json_dumps now writes the
characters themselves). PostgreSQL decodes either form; its rows are left as they are.

Revision ID: 0010
Revises: 0009
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name != "sqlite":
        return
    escaped = connection.execute(
        sa.text("SELECT id, spec FROM jobs WHERE instr(spec, '\\u') > 0")
    ).all()
    for job_id, spec in escaped:
        connection.execute(
            sa.text("UPDATE jobs SET spec = :spec WHERE id = :id"),
            {"spec": json.dumps(json.loads(spec), ensure_ascii=False), "id": job_id},
        )


def downgrade() -> None:
    pass  # the same JSON values either way; nothing to undo
