"""The SQL store's migrations on a real SQLite file: a database written by an older server
is brought up to date and keeps its rows."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from docket_server.store.sql import MIGRATIONS, SqlMetadataStore


def columns(db: Path, table: str) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def test_migration_4_adds_first_piece_bytes_to_a_version_3_database(tmp_path: Path) -> None:
    db = tmp_path / "docket.db"
    store = SqlMetadataStore(f"sqlite+aiosqlite:///{db}")
    asyncio.run(store.open())
    asyncio.run(store.close())
    # Make it the database a version-3 server left: no column, no record of migration 4.
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE rollout_tasks DROP COLUMN first_piece_bytes")
        conn.execute("DELETE FROM schema_migrations WHERE version >= 4")
        conn.execute(
            "INSERT INTO rollouts (id, image, selector, prefetch_only, canary, max_parallel,"
            " max_failures, deadline_time, state, reason, cancelled, create_time)"
            " VALUES ('r1', '{}', 'all', 1, 0, 0, 0, '2026-01-01', 'succeeded', '', 0,"
            " '2026-01-01')"
        )
        conn.execute(
            "INSERT INTO rollout_tasks (order_id, rollout_id, agent, load, state, error,"
            " image_id, cached_bytes, bittorrent_bytes, server_bytes, fallback_bytes)"
            " VALUES ('o1', 'r1', 'a1', 0, 'succeeded', '', '', 0, 5, 2, 0)"
        )
    assert "first_piece_bytes" not in columns(db, "rollout_tasks")

    asyncio.run(store.open())
    asyncio.run(store.close())
    assert "first_piece_bytes" in columns(db, "rollout_tasks")
    with sqlite3.connect(db) as conn:
        rows = list(
            conn.execute("SELECT order_id, bittorrent_bytes, first_piece_bytes FROM rollout_tasks")
        )
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
    assert rows == [("o1", 5, 0)]
    assert sorted(versions) == list(range(1, len(MIGRATIONS) + 1))
