"""The SQL store's migrations on a real SQLite file: a database written by an older server
is brought up to date and keeps its rows."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from docket_common.manifest import DOCKER_CONFIG, oci_manifest
from docket_server.domain.fleet import AgentInfo, AgentState, Fleet
from docket_server.domain.models import Blob, Descriptor, Image
from docket_server.domain.orders import OrderBook, TaskReport, TaskState
from docket_server.domain.registry import Registry
from docket_server.domain.rollouts import Rollouts, RolloutState
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


# Batched writes: the fleet's and the rollouts' writers


class _Registry:
    """What Rollouts.create asks of the registry: one image, its one blob."""

    def __init__(self, image: Image, blob: Blob) -> None:
        self.image = image
        self.blob = blob
        self.metadata = self

    async def get_image(self, name: str) -> Image:
        return self.image

    async def get_blob(self, digest: str) -> Blob | None:
        return self.blob if digest == self.blob.digest else None


class _FlakyStore(SqlMetadataStore):
    """Fails two rollout transactions after the first (CreateRollout's, which would fail
    the call), as a locked database would."""

    calls = 0
    failures = 2

    async def save_rollout_changes(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        if self.calls > 1 and self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked (injected)")
        await super().save_rollout_changes(*args, **kwargs)


async def test_every_change_lands_with_two_writers_at_once(tmp_path: Path) -> None:
    """A rollout to 600 hosts whose changes the rollouts' writer batches while the fleet's
    writer writes the same 600 agents connecting and going away: every host's row and every
    record lands, in order, also through failed transactions."""
    count = 600
    now = datetime.now(UTC)
    config = Descriptor("sha256:" + "c" * 64, 10, DOCKER_CONFIG)
    image = Image("app", "1", config, (), (), None, now, "linux/amd64")
    store = _FlakyStore(f"sqlite+aiosqlite:///{tmp_path / 'docket.db'}")
    await store.open()
    try:
        fleet = Fleet(store, 60.0, lambda: None)
        await fleet.start()
        orders = OrderBook(fleet, "server:6881")
        registry = _Registry(image, Blob(config.digest, 10, now, None))
        rollouts = Rollouts(cast(Registry, registry), fleet, orders, store)
        await rollouts.start()
        sessions = [fleet.connect(AgentInfo(f"h{i:04d}", f"id{i}"), "peer") for i in range(count)]
        rollout = await rollouts.create("app:1", "all", prefetch_only=True)
        assert len(rollout.tasks) == count
        steps = [TaskState.ACCEPTED, TaskState.DOWNLOADING, TaskState.VERIFYING]
        for step in [*steps, TaskState.SUCCEEDED]:
            for task in rollout.tasks.values():
                orders.on_update(task.agent, TaskReport(task.order_id, step))
            await asyncio.sleep(0)  # the writers run meanwhile, batch after batch
            for session in sessions[: count // 4]:
                fleet.heard(session)
        for session in sessions[: count // 2]:
            fleet.disconnect(session, "gone")
        records = await rollouts.records(rollout.id)  # waits for what was queued
        await fleet.flush()
        assert store.failures == 0  # the injected failures happened, and were retried
        assert rollout.state is RolloutState.SUCCEEDED
        by_host: dict[str, list[TaskState | None]] = {}
        for record in records:
            by_host.setdefault(record.agent, []).append(record.task_state)
        want = [TaskState.PENDING, *steps, TaskState.SUCCEEDED]
        assert len(by_host) == count + 1  # and the rollout's own ("")
        assert all(by_host[t.agent] == want for t in rollout.tasks.values())
        assert [r.rollout_state for r in records if not r.agent] == [
            RolloutState.RUNNING,
            RolloutState.SUCCEEDED,
        ]
        stored = await store.load_rollout(rollout.id)
        assert stored is not None
        assert stored.state is RolloutState.SUCCEEDED
        assert {t.state for t in stored.tasks.values()} == {TaskState.SUCCEEDED}
        assert len(stored.tasks) == count
        agents = {a.name: a.state for a in await store.list_agents()}
        assert len(agents) == count
        assert sum(1 for s in agents.values() if s is AgentState.OFFLINE) == count // 2
        await rollouts.stop()
        await fleet.stop()
    finally:
        await store.close()
