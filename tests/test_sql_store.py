"""The SQL store's migrations on a real SQLite file: a database written by an older server
is brought up to date and keeps its rows."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from docket_common.manifest import oci_manifest
from docket_server.domain.models import Descriptor, Image
from docket_server.store import sql
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


def test_migration_5_turns_images_into_manifests_with_the_same_digests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database of a version-4 server (images as a tag, a config and layers) opens with
    every image as a tag pointing at the manifest Docket wrote for it: the same digest as
    before, the same layers; rollouts recorded then still load."""
    db = tmp_path / "docket.db"
    url = f"sqlite+aiosqlite:///{db}"
    monkeypatch.setattr(sql, "MIGRATIONS", sql.MIGRATIONS[:4])
    asyncio.run(_open_close(url))
    monkeypatch.undo()
    config = json.dumps({"rootfs": {"diff_ids": ["sha256:" + "d" * 64]}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    layer_digest = "sha256:" + "a" * 64
    with sqlite3.connect(db) as conn:
        for digest, size in ((config_digest, len(config)), (layer_digest, 1000)):
            conn.execute(
                "INSERT INTO blobs (digest, size_bytes, create_time) VALUES (?, ?, '2026-01-01')",
                (digest, size),
            )
        for i, (repository, tag) in enumerate([("app", "1"), ("app", "latest"), ("web", "2")]):
            conn.execute(
                "INSERT INTO images (id, repository, tag, digest, config_digest,"
                " config_size_bytes, config_media_type, diff_ids, create_time, platform)"
                " VALUES (?, ?, ?, 'sha256:old', ?, ?, ?, ?, '2026-01-01', 'linux/amd64')",
                (
                    i + 1,
                    repository,
                    tag,
                    config_digest,
                    len(config),
                    "application/vnd.oci.image.config.v1+json",
                    json.dumps(["sha256:" + "d" * 64]),
                ),
            )
            conn.execute(
                "INSERT INTO image_layers (image_id, position, digest, size_bytes, media_type)"
                " VALUES (?, 0, ?, 1000, 'application/vnd.oci.image.layer.v1.tar')",
                (i + 1, layer_digest),
            )
        # A rollout recorded by that server: its image as the JSON of those days.
        old_image = {
            "repository": "app",
            "tag": "1",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": 1000,
                }
            ],
            "diff_ids": ["sha256:" + "d" * 64],
            "build_time": None,
            "create_time": "2026-01-01T00:00:00+00:00",
            "platform": "linux/amd64",
        }
        conn.execute(
            "INSERT INTO rollouts (id, image, selector, prefetch_only, canary, max_parallel,"
            " max_failures, deadline_time, state, reason, cancelled, create_time)"
            " VALUES ('r1', ?, 'all', 1, 0, 0, 0, '2026-01-01', 'succeeded', '', 0,"
            " '2026-01-01')",
            (json.dumps(old_image),),
        )
    old = Image(
        repository="app",
        tag="1",
        config=Descriptor(config_digest, len(config), "application/vnd.oci.image.config.v1+json"),
        layers=(Descriptor(layer_digest, 1000, "application/vnd.oci.image.layer.v1.tar"),),
        diff_ids=("sha256:" + "d" * 64,),
        build_time=None,
        create_time=datetime.now(UTC),
        platform="linux/amd64",
    )

    async def check() -> None:
        store = SqlMetadataStore(url)
        await store.open()
        try:
            tagged = await store.list_tagged(None, 10)
            assert [(t.repository, t.tag) for t in tagged] == [
                ("app", "1"),
                ("app", "latest"),
                ("web", "2"),
            ]
            for t in tagged:
                assert t.manifest.digest == old.digest  # what docketctl images showed
                assert t.manifest.content == oci_manifest(old.config, old.layers)  # type: ignore[arg-type]
                assert [d.digest for d in t.manifest.layers] == [layer_digest]
                assert t.manifest.diff_ids == old.diff_ids
            # One manifest per repository, tagged twice in "app".
            assert await store.tags_of("app", old.digest) == ["1", "latest"]
            rollout = await store.load_rollout("r1")
            assert rollout is not None
            assert rollout.image.digest == old.digest
        finally:
            await store.close()

    asyncio.run(check())
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        versions = sorted(v for (v,) in conn.execute("SELECT version FROM schema_migrations"))
    assert "images" not in tables
    assert "image_layers" not in tables
    assert versions == list(range(1, len(sql.MIGRATIONS) + 1))
    assert "platform" in columns(db, "agents")
    assert "image" in columns(db, "rollout_tasks")


async def _open_close(url: str) -> None:
    store = SqlMetadataStore(url)
    await store.open()
    await store.close()
