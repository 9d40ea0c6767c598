"""The schema of the hand-written migrations (version 7), from nothing or any older version.

A database made before Alembic keeps its rows: the hand-written migrations it lacks run as
they always did. ``schema_migrations`` then records a version 8, which servers from before
Alembic refuse ("newer than this server"), so none of them writes to a database whose
schema Alembic now moves on.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op

from docket_server.store.migrations import legacy

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# What schema_migrations records once Alembic has the database.
ALEMBIC_VERSION = len(legacy.MIGRATIONS) + 1


def upgrade() -> None:
    connection = op.get_bind()
    legacy.upgrade_to_7(connection)
    connection.execute(
        legacy.schema_migrations.insert().values(
            version=ALEMBIC_VERSION, apply_time=datetime.now(UTC)
        )
    )


def downgrade() -> None:
    raise NotImplementedError("the schema is never downgraded: restore a backup instead")
