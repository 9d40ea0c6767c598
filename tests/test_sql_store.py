"""The SQL store on real databases: SQLite files and a private PostgreSQL (each test taking
``database_url`` runs on both). A database written by an older server is brought up to date
and keeps its rows; the Alembic revisions make the schema the code declares; concurrent
writers lose nothing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import socket
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
import structlog
import structlog.testing
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import create_async_engine

from docket_common.digest import sha256_digest
from docket_common.manifest import DOCKER_CONFIG, OCI_MANIFEST, oci_manifest
from docket_server.domain.fleet import AgentInfo, AgentRecord, AgentState, Fleet
from docket_server.domain.models import Blob, Descriptor, Image, Manifest
from docket_server.domain.orders import OrderBook, Task, TaskReport, TaskState
from docket_server.domain.registry import Registry
from docket_server.domain.rollouts import Rollout, RolloutRecord, Rollouts, RolloutState
from docket_server.domain.security import AgentIdentity, AuditEntry, Role, TokenRecord
from docket_server.store import migrations, sql
from docket_server.store.migrations import legacy
from docket_server.store.sql import SqlMetadataStore, StoreOpenError

DATA = Path(__file__).parent / "data"
# What schema_migrations holds once Alembic has a database: the hand-written 1-7, then 8.
ADOPTED = list(range(1, len(legacy.MIGRATIONS) + 2))


def columns(db: Path, table: str) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def hand_written_db(db: Path, version: int) -> None:
    """A SQLite database as a server from before Alembic left it at schema ``version``: the
    hand-written migrations up to it, each recorded in schema_migrations."""
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        legacy.schema_migrations.create(conn)
        for number, migration in enumerate(legacy.MIGRATIONS[:version], start=1):
            migration(conn)
            conn.execute(legacy.schema_migrations.insert().values(version=number, apply_time=now()))
    engine.dispose()


def head() -> str:
    script = ScriptDirectory(str(migrations.DIRECTORY))
    revision = script.get_current_head()
    assert revision is not None
    return revision


def now() -> datetime:
    return datetime.now(UTC)


def test_migration_4_adds_first_piece_bytes_to_a_version_3_database(tmp_path: Path) -> None:
    db = tmp_path / "docket.db"
    hand_written_db(db, 3)
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO rollouts (id, image, selector, prefetch_only, canary, max_parallel,"
            " max_failures, deadline_time, state, reason, cancelled, create_time)"
            " VALUES ('r1', '{}', 'all', 1, 0, 0, 0, '2026-01-01', 'succeeded', '', 0,"
            " '2026-01-01')"
        )
        conn.execute(
            "INSERT INTO rollout_tasks (order_id, rollout_id, agent, load, state, error,"
            " image_id, cached_bytes, bittorrent_bytes, server_bytes, fallback_bytes,"
            " first_piece_bytes) VALUES ('o1', 'r1', 'a1', 0, 'succeeded', '', '', 0, 5, 2, 0, 0)"
        )
        # Made by a version-3 server: no such column yet.
        conn.execute("ALTER TABLE rollout_tasks DROP COLUMN first_piece_bytes")
    assert "first_piece_bytes" not in columns(db, "rollout_tasks")

    asyncio.run(_open_close(f"sqlite+aiosqlite:///{db}"))
    assert "first_piece_bytes" in columns(db, "rollout_tasks")
    with sqlite3.connect(db) as conn:
        rows = list(
            conn.execute("SELECT order_id, bittorrent_bytes, first_piece_bytes FROM rollout_tasks")
        )
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
        revisions = [r for (r,) in conn.execute("SELECT version_num FROM alembic_version")]
    assert rows == [("o1", 5, 0)]
    assert sorted(versions) == ADOPTED
    assert revisions == [head()]


def test_migration_5_turns_images_into_manifests_with_the_same_digests(tmp_path: Path) -> None:
    """A database of a version-4 server (images as a tag, a config and layers) opens with
    every image as a tag pointing at the manifest Docket wrote for it: the same digest as
    before, the same layers; rollouts recorded then still load."""
    db = tmp_path / "docket.db"
    url = f"sqlite+aiosqlite:///{db}"
    hand_written_db(db, 4)
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
    assert versions == ADOPTED
    assert "platform" in columns(db, "agents")
    assert "image" in columns(db, "rollout_tasks")


async def _open_close(url: str) -> None:
    store = SqlMetadataStore(url)
    await store.open()
    await store.close()


def test_a_version_7_database_is_adopted_by_alembic_with_its_rows(tmp_path: Path) -> None:
    """The database the last server before Alembic wrote (tests/data/docket-v7.sql: an image
    tagged twice, a finished rollout, a token, an enrolled agent, an agent, an audit entry, a
    pull) opens with every row as it was, at Alembic's newest revision, and with the schema
    the code declares."""
    db = tmp_path / "docket.db"
    with sqlite3.connect(db) as conn:
        conn.executescript((DATA / "docket-v7.sql").read_text())
    conn.close()
    url = f"sqlite+aiosqlite:///{db}"
    when = datetime(2026, 11, 30, 12, 0, 0, 250000, tzinfo=UTC)

    async def check() -> None:
        store = SqlMetadataStore(url)
        await store.open()
        try:
            found = await store.resolve_tag("app", "latest")
            assert found is not None
            assert [d.digest for d in found.layers] == ["sha256:" + "a" * 64]
            assert sha256_digest(found.content) == found.digest
            assert (found.create_time, found.build_time) == (when, when - timedelta(days=1))
            assert await store.tags_of("app", found.digest) == ["1", "latest"]
            assert len(await store.list_blobs()) == 2
            rollout = await store.load_rollout("r1")
            assert rollout is not None
            assert (rollout.state, rollout.create_time) == (RolloutState.SUCCEEDED, when)
            assert rollout.image.digest == found.digest
            [task] = rollout.tasks.values()
            assert (task.agent, task.state, task.bittorrent_bytes) == (
                "h1",
                TaskState.SUCCEEDED,
                2 * 1024 * 1024,
            )
            records = await store.list_records("r1")
            assert [(r.agent, r.task_state, r.rollout_state) for r in records] == [
                ("", None, RolloutState.RUNNING),
                ("h1", TaskState.PENDING, None),
                ("h1", TaskState.SUCCEEDED, None),
                ("", None, RolloutState.SUCCEEDED),
            ]
            [token] = await store.list_tokens()
            assert (token.id, token.role, token.uses, token.groups) == (
                "0123456789ab",
                Role.AGENT,
                1,
                ("web",),
            )
            assert token.expire_time == when + timedelta(days=7)
            [identity] = await store.list_identities()
            assert (identity.name, identity.groups, identity.labels) == ("h1", ("web",), None)
            [agent] = await store.list_agents()
            assert (agent.name, agent.state, agent.info.platform) == (
                "h1",
                AgentState.OFFLINE,
                "linux/amd64",
            )
            [entry] = await store.list_audit(None, 0, 10)
            assert (entry.actor, entry.target, entry.time) == ("admin", "app:1", when)
            [pull] = await store.list_pulls(None, 0, 10)
            assert (pull.id, pull.image_name, pull.task.server_bytes) == ("p1", "app:1", 10)
            async with store.engine.connect() as conn:
                diffs = await conn.run_sync(
                    lambda sync: compare_metadata(MigrationContext.configure(sync), sql.meta)
                )
            assert diffs == []
        finally:
            await store.close()

    asyncio.run(check())
    with sqlite3.connect(db) as conn:
        versions = sorted(v for (v,) in conn.execute("SELECT version FROM schema_migrations"))
        revisions = [r for (r,) in conn.execute("SELECT version_num FROM alembic_version")]
    conn.close()
    assert versions == ADOPTED
    assert revisions == [head()]


def test_a_version_8_database_is_refused_by_a_server_from_before_alembic(tmp_path: Path) -> None:
    """What schema_migrations says once Alembic has a database: an older server's check
    (newest version above its 7) refuses it."""
    db = tmp_path / "docket.db"
    asyncio.run(_open_close(f"sqlite+aiosqlite:///{db}"))
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn, pytest.raises(RuntimeError, match="newer than this server"):
        legacy.upgrade_to_7(conn)
    engine.dispose()


async def test_the_revisions_make_the_schema_the_code_declares(database_url: str) -> None:
    """Alembic's autogenerate finds nothing to change between the migrated database and the
    tables in sql.py: a new database is the schema the queries are written for."""
    store = SqlMetadataStore(database_url)
    await store.open()
    try:
        async with store.engine.connect() as conn:
            diffs = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), sql.meta)
            )
            revisions = await conn.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_heads()
            )
    finally:
        await store.close()
    assert diffs == []
    assert revisions == (head(),)


async def test_servers_starting_at_once_on_a_new_postgresql_database_both_serve(
    postgres_url: str,
) -> None:
    """Two stores opening one new database together: one migrates while the other waits
    (an advisory lock), then finds it at head; neither fails on the other's tables."""
    stores = [SqlMetadataStore(postgres_url) for _ in range(3)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        for store in stores:
            assert await store.list_agents() == []
    finally:
        for store in stores:
            await store.close()
    assert await rows_of(postgres_url, "SELECT version_num FROM alembic_version") == [(head(),)]


async def rows_of(url: str, query: str) -> list[tuple[Any, ...]]:
    """The rows of one query, read on a connection of its own."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(r) for r in await conn.execute(sa.text(query))]
    finally:
        await engine.dispose()


async def test_a_database_of_a_newer_server_is_refused(database_url: str) -> None:
    await _open_close(database_url)
    store = SqlMetadataStore(database_url)
    store._engine = create_async_engine(database_url)
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    await store.close()
    with pytest.raises(StoreOpenError, match=r"revision f00dfeed, newer than this server knows"):
        await _open_close(database_url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql+aiomysql://u:secret@db/docket", "unsupported database URL"),
        ("postgresql+psycopg2://u@db/docket", "unsupported database driver"),
        ("not a url", "invalid database URL"),
        ("sqlite+aiosqlite:////nonexistent/docket.db", "no directory /nonexistent"),
    ],
)
async def test_a_database_url_it_cannot_use_is_refused(url: str, message: str) -> None:
    with pytest.raises(StoreOpenError, match=message) as caught:
        await _open_close(url)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("query", ["?ssl=disable", "?sslmode=disable"])
async def test_a_postgresql_url_as_libpq_writes_it_is_understood(
    postgres_url: str, query: str
) -> None:
    """No driver named (postgresql://) means asyncpg; libpq's sslmode means asyncpg's ssl."""
    await _open_close(postgres_url.replace("postgresql+asyncpg://", "postgresql://") + query)


async def test_a_postgresql_that_never_answers_is_given_up_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A port that takes the connection and says nothing (a hung server, a half-open
    firewall): open() gives up after CONNECT_TIMEOUT with that reason."""
    monkeypatch.setattr(sql, "CONNECT_TIMEOUT", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(StoreOpenError, match=r"no answer within 0.5 s"):
            await _open_close(f"postgresql+asyncpg://docket:pw@127.0.0.1:{port}/docket")


async def test_a_wrong_password_is_refused_in_the_servers_own_words(postgres_url: str) -> None:
    url = sa.make_url(postgres_url).set(password="wrong")
    with pytest.raises(StoreOpenError, match="password authentication failed") as caught:
        await _open_close(url.render_as_string(hide_password=False))
    assert "wrong" not in str(caught.value)


# The same behaviour on both databases


def _manifest(repository: str, tag: str = "1") -> tuple[Manifest, list[Blob]]:
    config = Descriptor("sha256:" + hashlib.sha256(repository.encode()).hexdigest(), 10, "c")
    layer = Descriptor("sha256:" + "a" * 64, 1000, "application/vnd.oci.image.layer.v1.tar")
    content = oci_manifest(config, [layer])
    manifest = Manifest(
        repository=repository,
        digest=sha256_digest(content),
        media_type=OCI_MANIFEST,
        content=content,
        config=config,
        layers=(layer,),
        children=(),
        subject=None,
        artifact_type=config.media_type,
        diff_ids=("sha256:" + "d" * 64,),
        build_time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        platform="linux/amd64",
        create_time=now(),
    )
    return manifest, [Blob(d.digest, d.size, now(), None) for d in (config, layer)]


def _rollout(rollout_id: str, manifest: Manifest) -> Rollout:
    assert manifest.config is not None
    image = Image(
        manifest.repository,
        "1",
        manifest.config,
        manifest.layers,
        manifest.diff_ids,
        None,
        now(),
        "linux/amd64",
    )
    task = Task(
        order_id=f"{rollout_id}-o1",
        rollout_id=rollout_id,
        agent="h1",
        image=image,
        blobs={},
        load=False,
        state=TaskState.SUCCEEDED,
        bittorrent_bytes=1000,
    )
    return Rollout(
        id=rollout_id,
        image=image,
        selector="all",
        prefetch_only=True,
        tasks={"h1": task},
        state=RolloutState.SUCCEEDED,
    )


def _agent(name: str) -> AgentRecord:
    t = now()
    return AgentRecord(AgentInfo(name, f"id-{name}"), AgentState.ONLINE, "peer", t, t, t)


async def test_times_come_back_as_the_same_instant_in_utc(database_url: str) -> None:
    """A time in another zone is stored as its instant: it reads back equal, in UTC (SQLite
    keeps no offset; PostgreSQL's timestamptz does)."""
    store = SqlMetadataStore(database_url)
    await store.open()
    try:
        manifest, _ = _manifest("app")
        rollout = _rollout("r1", manifest)
        east = timezone(timedelta(hours=5, minutes=30))
        rollout.create_time = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=east)
        rollout.end_time = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
        await store.save_rollout(rollout)
        loaded = await store.load_rollout("r1")
        assert loaded is not None
        assert loaded.create_time == rollout.create_time
        assert loaded.create_time.utcoffset() == timedelta(0)
        assert loaded.end_time == rollout.end_time
        since = datetime(2026, 3, 1, 12, 0, tzinfo=east)  # 06:30 UTC
        await store.add_audit(
            AuditEntry(datetime(2026, 3, 1, 7, 0, tzinfo=UTC), "a", "x", "", "", "")
        )
        await store.add_audit(
            AuditEntry(datetime(2026, 3, 1, 6, 0, tzinfo=UTC), "a", "y", "", "", "")
        )
        assert [e.action for e in await store.list_audit(since, 0, 10)] == ["x"]
    finally:
        await store.close()


async def test_a_write_whose_caller_is_cancelled_ends_and_leaves_no_lock(tmp_path: Path) -> None:
    """A store call cancelled while its statement waits for SQLite's write lock still ends:
    it commits, the caller hears CancelledError, and the next write gets the lock. (Cut short,
    the transaction stayed open on a connection nobody held, and the next write waited out
    busy_timeout and failed with 'database is locked': a server stopping mid-write did.)"""
    db = tmp_path / "docket.db"
    store = SqlMetadataStore(f"sqlite+aiosqlite:///{db}")
    await store.open()
    try:
        agents = [_agent(f"h{i:03d}") for i in range(50)]
        await store.save_agents(agents)
        seen = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held outside the store
        touch = asyncio.create_task(store.touch_agents({a.name: seen for a in agents}))
        await asyncio.sleep(0.3)  # its UPDATE is in aiosqlite's thread, waiting for the lock
        assert not touch.done()
        touch.cancel()
        await asyncio.sleep(0)
        holder.execute("COMMIT")
        holder.close()
        with pytest.raises(asyncio.CancelledError):
            await touch
        gone = dataclasses.replace(agents[0], state=AgentState.OFFLINE, last_seen_time=seen)
        await store.save_agents([gone])
        stored = {a.name: a for a in await store.list_agents()}
        assert stored["h000"].state is AgentState.OFFLINE
        assert {a.last_seen_time for a in stored.values()} == {seen}  # the touch committed
        # Cancels at points through a statement running, not waiting: one of them cut the
        # old store's transaction short, and the write after it failed.
        many = [_agent(f"m{i:03d}") for i in range(300)]
        await store.save_agents(many)
        for step in range(40):
            touch = asyncio.create_task(store.touch_agents({a.name: seen for a in many}))
            await asyncio.sleep(step * 0.00025)
            touch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await touch
            await store.save_agents(many[:1])
        assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await store.close()


class _RefusingAgentsStore(SqlMetadataStore):
    async def save_agents(self, records: Any) -> None:
        raise sqlite3.OperationalError("database is locked (injected)")


async def test_the_fleets_last_write_failing_does_not_stop_the_shutdown(tmp_path: Path) -> None:
    """A server stopping writes its agents' last states; a database that refuses that write
    is logged, and the shutdown goes on (it raised, and the server aborted)."""
    store = _RefusingAgentsStore(f"sqlite+aiosqlite:///{tmp_path / 'docket.db'}")
    await store.open()
    try:
        fleet = Fleet(store, 60.0, lambda _interval: None)
        await fleet.start()
        fleet.connect(AgentInfo("h1", "id1"), "peer")
        with structlog.testing.capture_logs() as logs:
            await fleet.stop()
        assert [e["event"] for e in logs if e["log_level"] == "error"] == [
            "cannot write the agents table at shutdown: the last changes are lost"
        ]
        assert await store.list_agents() == []  # nothing half-written
    finally:
        await store.close()


async def test_manifests_tags_and_blobs(database_url: str) -> None:
    store = SqlMetadataStore(database_url)
    await store.open()
    try:
        manifest, blobs = _manifest("app")
        for blob in [*blobs, *blobs]:  # the second time changes nothing
            await store.add_blob(blob)
        await store.put_manifest(manifest, "1")
        await store.put_manifest(manifest, "latest")
        await store.put_manifest(manifest, "1")  # the same again: one manifest, two tags
        other, _ = _manifest("web")
        await store.add_blob(Blob(other.config.digest, 10, now(), None))  # type: ignore[union-attr]
        await store.put_manifest(other, "2")
        assert await store.tags_of("app", manifest.digest) == ["1", "latest"]
        assert await store.list_repositories(None, 10) == ["app", "web"]
        found = await store.resolve_tag("app", "latest")
        assert found is not None
        assert found.content == manifest.content
        assert found.build_time == manifest.build_time
        assert [(t.repository, t.tag) for t in await store.list_tagged(("app", "1"), 10)] == [
            ("app", "latest"),
            ("web", "2"),
        ]
        result = await store.delete_manifest("app", manifest.digest)
        assert result is not None
        assert result.names == ["app:1", "app:latest"]
        # The layer is still web's; app's config is no one's.
        assert result.orphaned_digests == [manifest.config.digest]  # type: ignore[union-attr]
        await store.defer_blob_deletes(["sha256:x", "sha256:x", "sha256:y"])
        await store.defer_blob_deletes(["sha256:y"])
        assert await store.deferred_blob_deletes() == ["sha256:x", "sha256:y"]
    finally:
        await store.close()


async def test_long_names_media_types_and_versions_are_kept_whole(database_url: str) -> None:
    """Strings longer than the columns were first sized for: SQLite always kept them, and
    PostgreSQL must too (it enforces VARCHAR lengths, so they are TEXT there)."""
    store = SqlMetadataStore(database_url)
    await store.open()
    try:
        repository = "/".join(["team"] * 80)  # 399 characters: no limit in the spec
        manifest, blobs = _manifest(repository)
        manifest = dataclasses.replace(manifest, artifact_type="application/" + "x" * 300)
        for blob in blobs:
            await store.add_blob(blob)
        await store.put_manifest(manifest, "1")
        found = await store.resolve_tag(repository, "1")
        assert found is not None
        assert found.artifact_type == manifest.artifact_type
        agent = _agent("h1")
        info = dataclasses.replace(agent.info, version="1.0+" + "b" * 200, platform="p" * 200)
        await store.upsert_agent(dataclasses.replace(agent, info=info))
        [stored] = await store.list_agents()
        assert (stored.info.version, stored.info.platform) == (info.version, info.platform)
        action = "/docket.v1.ImageService/" + "A" * 300
        await store.add_audit(AuditEntry(now(), "u" * 200, action, "", "", "p" * 300))
        [entry] = await store.list_audit(None, 0, 10)
        assert (len(entry.actor), entry.action, len(entry.peer)) == (200, action, 300)
    finally:
        await store.close()


async def test_concurrent_puts_of_one_manifest_and_tag_all_succeed(database_url: str) -> None:
    """Pushes of the same image at once (CI jobs): each put succeeds, one manifest results."""
    store = SqlMetadataStore(database_url)
    await store.open()
    try:
        manifest, blobs = _manifest("app")
        await asyncio.gather(*(store.add_blob(b) for b in blobs for _ in range(4)))
        await asyncio.gather(*(store.put_manifest(manifest, "1") for _ in range(8)))
        assert len(await store.get_manifests("app", [manifest.digest])) == 1
        assert await store.tags_of("app", manifest.digest) == ["1"]
    finally:
        await store.close()


async def test_tokens_identities_and_pulls_round_trip(database_url: str) -> None:
    store = SqlMetadataStore(database_url)
    await store.open()
    try:
        expire = now() + timedelta(days=1)
        token = TokenRecord("t1", "h" * 64, Role.AGENT, "join", now(), expire, max_uses=3)
        await store.save_token(token)
        await store.save_token(dataclasses.replace(token, uses=1, revoked=True))
        [stored] = await store.list_tokens()
        assert (stored.uses, stored.revoked, stored.expire_time) == (1, True, expire)
        for name in ("b", "a"):
            await store.save_identity(
                AgentIdentity(name, "sha256:k", ("01",), None, ("k=v",), "t1", now())
            )
        assert [(i.name, i.groups, i.labels) for i in await store.list_identities()] == [
            ("a", None, ("k=v",)),
            ("b", None, ("k=v",)),
        ]
        assert await store.delete_identity("a")
        assert not await store.delete_identity("a")
    finally:
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


async def test_every_change_lands_with_two_writers_at_once(database_url: str) -> None:
    """A rollout to 600 hosts whose changes the rollouts' writer batches while the fleet's
    writer writes the same 600 agents connecting and going away: every host's row and every
    record lands, in order, also through failed transactions."""
    count = 600
    now = datetime.now(UTC)
    config = Descriptor("sha256:" + "c" * 64, 10, DOCKER_CONFIG)
    image = Image("app", "1", config, (), (), None, now, "linux/amd64")
    store = _FlakyStore(database_url)
    await store.open()
    try:
        fleet = Fleet(store, 60.0, lambda _interval: None)
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


async def test_two_stores_writing_one_rollout_at_once_lose_no_record(database_url: str) -> None:
    """Two servers' worth of writers (two engines, two pools) upserting the same tasks, in
    opposite orders, while each adds records of its own: every transaction commits (no
    deadlock, no unique violation) and every record lands, in each writer's order."""
    manifest, _ = _manifest("app")
    rollout = _rollout("r1", manifest)
    base = next(iter(rollout.tasks.values()))
    tasks = [dataclasses.replace(base, order_id=f"o{i:02d}", agent=f"h{i:02d}") for i in range(20)]
    stores = [SqlMetadataStore(database_url) for _ in range(2)]
    for store in stores:
        await store.open()
    try:

        async def write(n: int, store: SqlMetadataStore) -> None:
            for step in range(15):
                mine = tasks if n == 0 else tasks[::-1]
                changed = [dataclasses.replace(t, bittorrent_bytes=step) for t in mine]
                record = RolloutRecord(now(), f"w{n}", None, None, str(step))
                await store.save_rollout_changes([], changed, [("r1", record)] * 3)

        await stores[0].save_rollout(rollout)
        await asyncio.gather(*(write(n, s) for n, s in enumerate(stores)))
        records = await stores[0].list_records("r1")
        for n in range(2):
            mine = [int(r.message) for r in records if r.agent == f"w{n}"]
            assert mine == [step for step in range(15) for _ in range(3)]
        loaded = await stores[1].load_rollout("r1")
        assert loaded is not None
        assert len(loaded.tasks) == 20
        assert {t.bittorrent_bytes for t in loaded.tasks.values()} == {14}
    finally:
        for store in stores:
            await store.close()


async def test_a_blob_a_manifest_takes_while_it_is_deleted_stays(database_url: str) -> None:
    collector, pusher = SqlMetadataStore(database_url), SqlMetadataStore(database_url)
    await collector.open()
    await pusher.open()
    try:
        manifest, blobs = _manifest("app")
        for blob in blobs:
            await collector.add_blob(blob)
        digests = [b.digest for b in blobs]
        async with pusher.engine.connect() as conn:
            push = await conn.begin()
            await conn.run_sync(lambda sync: sql._insert_manifest(sync, manifest, {}))
            # The collector read no manifest naming them (the push is not committed), and
            # waits to delete until the push commits.
            deleting = asyncio.create_task(collector.delete_unused_blobs(digests))
            await asyncio.sleep(0.5)
            await push.commit()
        assert await deleting == []
        assert await collector.present_digests(digests) == set(digests)
        found = await collector.get_manifest("app", manifest.digest)
        assert found is not None
    finally:
        await collector.close()
        await pusher.close()
