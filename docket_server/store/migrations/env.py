"""Alembic's environment: the connection SqlMetadataStore.open() hands over, or (for a
developer's `alembic revision --autogenerate`) a database named by ``-x url=...``."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

from docket_server.store.sql import meta


def run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=meta,
        render_as_batch=True,  # SQLite alters a table by copying it
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_on_url(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    finally:
        await engine.dispose()


given = context.config.attributes.get("connection")
if given is not None:
    run(given)
else:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("name the database: alembic ... -x url=sqlite+aiosqlite:///docket.db")
    asyncio.run(run_on_url(url))
