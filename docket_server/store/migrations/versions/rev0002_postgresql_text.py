"""PostgreSQL: every VARCHAR(n) column becomes TEXT, as long as SQLite's always were.

SQLite enforces no VARCHAR length, PostgreSQL does: a repository name, a media type or an
agent's version longer than the hand-written schema guessed was stored on SQLite and refused
on PostgreSQL. From here both keep them whole. SQLite: nothing to do.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    inspector = sa.inspect(bind)
    for table in sorted(inspector.get_table_names()):
        if table == "alembic_version":
            continue
        for column in inspector.get_columns(table):
            if isinstance(column["type"], sa.VARCHAR):
                op.alter_column(
                    table,
                    column["name"],
                    type_=sa.Text(),
                    existing_type=column["type"],
                    existing_nullable=column["nullable"],
                )


def downgrade() -> None:
    raise NotImplementedError("the schema is never downgraded: restore a backup instead")
