"""The metadata store on SQLAlchemy: SQLite (aiosqlite) in the data dir by default, or
PostgreSQL (asyncpg) named by ``--database-url``; the same queries on both.

``open()`` brings the schema up to date with the Alembic revisions in migrations/versions
(the first one applies the hand-written migrations of servers from before Alembic); a
database at a revision this code does not know is refused. Writes that may meet another
writer's row (the same blob, tag, agent or rollout) are upserts in the database's own
``INSERT ... ON CONFLICT``, so no two transactions race between a read and an insert.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from docket_common.manifest import Platform
from docket_common.torrent import TorrentInfo
from docket_server.domain.fleet import AgentInfo, AgentRecord, AgentState, FleetStore
from docket_server.domain.models import (
    Blob,
    Descriptor,
    Manifest,
    image_from_dict,
    image_to_dict,
)
from docket_server.domain.orders import Task, TaskState
from docket_server.domain.pulls import Pull, PullStore
from docket_server.domain.rollouts import Rollout, RolloutRecord, RolloutState, RolloutStore
from docket_server.domain.security import (
    AgentIdentity,
    AuditEntry,
    Role,
    SecurityStore,
    TokenRecord,
)
from docket_server.store import migrations
from docket_server.store.metadata import (
    DeleteResult,
    ManifestInUseError,
    MetadataStore,
    MissingBlobsError,
    MissingManifestsError,
    Tagged,
)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A point in time, stored as UTC and read back aware (in UTC) on every database: SQLite
    keeps no offset (SQLAlchemy writes a datetime's wall time), PostgreSQL a timestamptz.
    A naive datetime is taken to be UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return _utc(value)


def _string(length: int) -> sa.types.TypeEngine[str]:
    """VARCHAR(length) on SQLite, which holds longer strings all the same; TEXT on PostgreSQL,
    which would refuse them (revision 0002): names, versions and media types that pushes and
    agents send are kept whole on both."""
    return sa.String(length).with_variant(sa.Text(), "postgresql")


DELETE_ATTEMPTS = 3  # delete_unused_blobs, when a writer meanwhile makes it look again

meta = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations",
    meta,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("apply_time", UtcDateTime(), nullable=False),
)

blobs = sa.Table(
    "blobs",
    meta,
    sa.Column("digest", _string(71), primary_key=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("create_time", UtcDateTime(), nullable=False),
    sa.Column("metainfo", sa.LargeBinary, nullable=True),
    sa.Column("info_hash", _string(40), nullable=True),
    sa.Column("piece_length", sa.Integer, nullable=True),
    sa.Column("piece_count", sa.Integer, nullable=True),
)

# A manifest, stored in one repository: its exact bytes and what the registry read from them.
manifests = sa.Table(
    "manifests",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("repository", _string(255), nullable=False),
    sa.Column("digest", _string(71), nullable=False),
    sa.Column("media_type", _string(255), nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=False),
    sa.Column("config_digest", _string(71), sa.ForeignKey("blobs.digest"), nullable=True),
    sa.Column("config_size_bytes", sa.BigInteger, nullable=True),
    sa.Column("config_media_type", _string(255), nullable=True),
    sa.Column("diff_ids", sa.Text, nullable=False),
    sa.Column("build_time", UtcDateTime(), nullable=True),
    sa.Column("platform", _string(128), nullable=False),
    sa.Column("artifact_type", _string(255), nullable=False),
    sa.Column("subject_digest", _string(71), nullable=True),
    sa.Column("subject_size_bytes", sa.BigInteger, nullable=True),
    sa.Column("subject_media_type", _string(255), nullable=True),
    sa.Column("create_time", UtcDateTime(), nullable=False),
    sa.UniqueConstraint("repository", "digest", name="uq_manifests_digest"),
    sa.Index("ix_manifests_subject", "repository", "subject_digest"),
    sa.Index("ix_manifests_config", "config_digest"),
)

manifest_layers = sa.Table(
    "manifest_layers",
    meta,
    sa.Column(
        "manifest_id",
        sa.Integer,
        sa.ForeignKey("manifests.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("digest", _string(71), sa.ForeignKey("blobs.digest"), nullable=False, index=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("media_type", _string(255), nullable=False),
)

# An index's entries: each names a manifest of the same repository (which must exist first).
manifest_children = sa.Table(
    "manifest_children",
    meta,
    sa.Column(
        "manifest_id",
        sa.Integer,
        sa.ForeignKey("manifests.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("child_id", sa.Integer, sa.ForeignKey("manifests.id"), nullable=False, index=True),
    sa.Column("digest", _string(71), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("media_type", _string(255), nullable=False),
    sa.Column("platform", _string(128), nullable=True),
    sa.Column("artifact_type", _string(255), nullable=False),
)

tags = sa.Table(
    "tags",
    meta,
    sa.Column("repository", _string(255), primary_key=True),
    sa.Column("tag", _string(128), primary_key=True),
    sa.Column("manifest_id", sa.Integer, sa.ForeignKey("manifests.id"), nullable=False, index=True),
    sa.Column("update_time", UtcDateTime(), nullable=False),
)

# Blobs no manifest uses any more but that a rollout in flight still fetched when their last
# manifest went: deleted once nothing needs them.
deferred_blob_deletes = sa.Table(
    "deferred_blob_deletes",
    meta,
    sa.Column("digest", _string(71), primary_key=True),
    sa.Column("defer_time", UtcDateTime(), nullable=False),
)


agents = sa.Table(
    "agents",
    meta,
    sa.Column("name", _string(64), primary_key=True),
    sa.Column("agent_id", _string(64), nullable=False),
    sa.Column("groups", sa.Text, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),
    sa.Column("state", _string(16), nullable=False),
    sa.Column("version", _string(64), nullable=False),
    sa.Column("peer_address", _string(255), nullable=False),
    sa.Column("bt_endpoint", _string(255), nullable=False),
    sa.Column("docker_version", _string(64), nullable=False),
    sa.Column("docker_error", sa.Text, nullable=False),
    sa.Column("disk_free_bytes", sa.BigInteger, nullable=False),
    sa.Column("cached_digests", sa.Text, nullable=False),
    sa.Column("connect_time", UtcDateTime(), nullable=False),
    sa.Column("last_seen_time", UtcDateTime(), nullable=False),
    sa.Column("create_time", UtcDateTime(), nullable=False),
    # Added by migration 5.
    sa.Column("platform", _string(128), nullable=False, server_default=""),
)


rollouts = sa.Table(
    "rollouts",
    meta,
    sa.Column("id", _string(32), primary_key=True),
    sa.Column("image", sa.Text, nullable=False),  # the image as it was (JSON)
    sa.Column("selector", sa.Text, nullable=False),
    sa.Column("prefetch_only", sa.Boolean, nullable=False),
    sa.Column("canary", sa.Integer, nullable=False),
    sa.Column("max_parallel", sa.Integer, nullable=False),
    sa.Column("max_failures", sa.Integer, nullable=False),
    sa.Column("deadline_time", UtcDateTime(), nullable=False),
    sa.Column("state", _string(16), nullable=False, index=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("cancelled", sa.Boolean, nullable=False),
    sa.Column("create_time", UtcDateTime(), nullable=False, index=True),
    sa.Column("end_time", UtcDateTime(), nullable=True),
)

rollout_tasks = sa.Table(
    "rollout_tasks",
    meta,
    sa.Column("order_id", _string(32), primary_key=True),
    sa.Column("rollout_id", _string(32), sa.ForeignKey("rollouts.id"), nullable=False, index=True),
    sa.Column("agent", _string(64), nullable=False),
    sa.Column("load", sa.Boolean, nullable=False),
    sa.Column("state", _string(16), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("image_id", _string(71), nullable=False),
    sa.Column("cached_bytes", sa.BigInteger, nullable=False),
    sa.Column("bittorrent_bytes", sa.BigInteger, nullable=False),
    sa.Column("server_bytes", sa.BigInteger, nullable=False),
    sa.Column("fallback_bytes", sa.BigInteger, nullable=False),
    sa.Column("start_time", UtcDateTime(), nullable=True),
    # Added by migration 4.
    sa.Column("first_piece_bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("end_time", UtcDateTime(), nullable=True),
    # Added by migration 5: the image this host gets when it is not the rollout's own (the
    # platform's image of a multi-platform index), as JSON.
    sa.Column("image", sa.Text, nullable=True),
)

rollout_records = sa.Table(
    "rollout_records",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rollout_id", _string(32), sa.ForeignKey("rollouts.id"), nullable=False, index=True),
    sa.Column("record_time", UtcDateTime(), nullable=False),
    sa.Column("agent", _string(64), nullable=False),
    sa.Column("task_state", _string(16), nullable=True),
    sa.Column("rollout_state", _string(16), nullable=True),
    sa.Column("message", sa.Text, nullable=False),
)


# Added by migration 6: pulls through the agents' registry faces (domain/pulls.py).
pulls = sa.Table(
    "pulls",
    meta,
    sa.Column("id", _string(32), primary_key=True),
    sa.Column("agent", _string(64), nullable=False, index=True),
    sa.Column("image_name", sa.Text, nullable=False),
    sa.Column("image", sa.Text, nullable=False),  # the image pulled (JSON): digests and sizes
    sa.Column("state", _string(16), nullable=False, index=True),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("cached_bytes", sa.BigInteger, nullable=False),
    sa.Column("bittorrent_bytes", sa.BigInteger, nullable=False),
    sa.Column("server_bytes", sa.BigInteger, nullable=False),
    sa.Column("first_piece_bytes", sa.BigInteger, nullable=False),
    sa.Column("fallback_bytes", sa.BigInteger, nullable=False),
    sa.Column("create_time", UtcDateTime(), nullable=False, index=True),
    sa.Column("start_time", UtcDateTime(), nullable=True),
    sa.Column("end_time", UtcDateTime(), nullable=True),
)


# Added by migration 7: who may call (domain/security.py).
tokens = sa.Table(
    "tokens",
    meta,
    sa.Column("id", _string(32), primary_key=True),
    sa.Column("secret_hash", _string(64), nullable=False),
    sa.Column("role", _string(16), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("create_time", UtcDateTime(), nullable=False),
    sa.Column("expire_time", UtcDateTime(), nullable=True),
    sa.Column("max_uses", sa.Integer, nullable=False),
    sa.Column("uses", sa.Integer, nullable=False),
    sa.Column("groups", sa.Text, nullable=False),  # JSON
    sa.Column("labels", sa.Text, nullable=False),  # JSON
    sa.Column("revoked", sa.Boolean, nullable=False),
    sa.Column("creator", _string(64), nullable=False),
)

agent_identities = sa.Table(
    "agent_identities",
    meta,
    sa.Column("name", _string(64), primary_key=True),
    sa.Column("key_hash", _string(71), nullable=False),
    sa.Column("serials", sa.Text, nullable=False),  # JSON: the certificates issued to it
    sa.Column("groups", sa.Text, nullable=True),  # JSON; NULL: any
    sa.Column("labels", sa.Text, nullable=True),
    sa.Column("token_id", _string(32), nullable=False),
    sa.Column("enroll_time", UtcDateTime(), nullable=False),
)

audit_records = sa.Table(
    "audit_records",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("record_time", UtcDateTime(), nullable=False, index=True),
    sa.Column("actor", _string(128), nullable=False),
    sa.Column("action", _string(255), nullable=False),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("peer", _string(255), nullable=False),
)


def _insert_manifest(sync: sa.Connection, m: Manifest, child_ids: dict[str, int]) -> int:
    """Inserts a manifest's rows unless its repository has it already (also when another
    writer puts it meanwhile); returns its id. ``child_ids`` maps an index's children's
    digests to their ids."""
    insert = _insert_for(sync.dialect, manifests)
    inserted = sync.execute(
        insert.values(
            repository=m.repository,
            digest=m.digest,
            media_type=m.media_type,
            content=m.content,
            config_digest=m.config.digest if m.config else None,
            config_size_bytes=m.config.size if m.config else None,
            config_media_type=m.config.media_type if m.config else None,
            diff_ids=json.dumps(list(m.diff_ids)),
            build_time=m.build_time,
            platform=m.platform,
            artifact_type=m.artifact_type,
            subject_digest=m.subject.digest if m.subject else None,
            subject_size_bytes=m.subject.size if m.subject else None,
            subject_media_type=m.subject.media_type if m.subject else None,
            create_time=m.create_time,
        )
        .on_conflict_do_nothing(index_elements=[manifests.c.repository, manifests.c.digest])
        .returning(manifests.c.id)
    ).first()
    if inserted is None:
        return int(
            sync.execute(
                sa.select(manifests.c.id).where(
                    (manifests.c.repository == m.repository) & (manifests.c.digest == m.digest)
                )
            ).scalar_one()
        )
    manifest_id = int(inserted.id)
    if m.layers:
        sync.execute(
            manifest_layers.insert(),
            [
                {
                    "manifest_id": manifest_id,
                    "position": i,
                    "digest": layer.digest,
                    "size_bytes": layer.size,
                    "media_type": layer.media_type,
                }
                for i, layer in enumerate(m.layers)
            ],
        )
    if m.children:
        sync.execute(
            manifest_children.insert(),
            [
                {
                    "manifest_id": manifest_id,
                    "position": i,
                    "child_id": child_ids[child.digest],
                    "digest": child.digest,
                    "size_bytes": child.size,
                    "media_type": child.media_type,
                    "platform": str(child.platform) if child.platform else None,
                    "artifact_type": child.artifact_type,
                }
                for i, child in enumerate(m.children)
            ],
        )
    return manifest_id


def _utc(value: datetime | None) -> datetime | None:
    """``value`` in UTC; a naive one (SQLite hands them back) was stored as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return None if value is None else value.astimezone(UTC)


# How long connecting to PostgreSQL may take before open() gives up.
CONNECT_TIMEOUT = 15.0
# The advisory lock PostgreSQL migrations hold (an arbitrary number: "dockt" in ASCII).
MIGRATION_LOCK = 0x646F636B74

# What --database-url may name: the backend, and the async driver used for it.
DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}


class StoreOpenError(RuntimeError):
    """The database cannot be used: a bad URL, unreachable, refused, or too new."""


def _async_url(text: str) -> sa.URL:
    """The URL, with the async driver where it names none (``postgresql://``) and asyncpg's
    ``ssl`` for libpq's ``sslmode``; refuses any other database or driver."""
    try:
        url = sa.make_url(text)
    except sa.exc.ArgumentError as e:
        shown = re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", text)  # no password in logs
        raise StoreOpenError(f"invalid database URL {shown!r}: {e}") from None
    backend = "postgresql" if url.get_backend_name() == "postgres" else url.get_backend_name()
    driver = DRIVERS.get(backend)
    if driver is None:
        raise StoreOpenError(
            f"unsupported database URL {url.render_as_string(hide_password=True)!r}: use "
            "sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    if url.drivername in (backend, url.get_backend_name()):
        url = url.set(drivername=f"{backend}+{driver}")
    elif url.get_driver_name() != driver:
        raise StoreOpenError(
            f"unsupported database driver {url.drivername!r}: use {backend}+{driver}://..."
        )
    if backend == "postgresql" and "sslmode" in url.query:
        # libpq's name (what most PostgreSQL URLs carry); asyncpg takes the same values as ssl.
        query = dict(url.query)
        query.setdefault("ssl", query.pop("sslmode"))
        url = url.set(query=query)
    return url


def _reason(error: BaseException) -> str:
    """The driver's own words for why a connection or statement failed, on one line."""
    if isinstance(error, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    cause: BaseException = error
    if isinstance(error, sa.exc.DBAPIError) and error.orig is not None:
        # asyncpg's and aiosqlite's errors come wrapped twice: take the innermost.
        cause = error.orig.__cause__ or error.orig
    text = str(cause).strip() or type(cause).__name__
    return " ".join(text.split())


def _upgrade_schema(sync: sa.Connection) -> None:
    """Upgrades the database on ``sync`` to the newest Alembic revision; refuses one at a
    revision this code does not have (a newer server wrote it).

    Alembic keeps the running migration in module globals (``alembic.context``, ``op``): one
    at a time per process. On PostgreSQL the advisory lock taken first sees to that; stores
    on SQLite are opened one after another."""
    config = Config()
    config.set_main_option("script_location", str(migrations.DIRECTORY))
    config.attributes["connection"] = sync
    script = ScriptDirectory.from_config(config)
    current = set(MigrationContext.configure(sync).get_current_heads())
    known = {r.revision for r in script.walk_revisions()}
    unknown = sorted(current - known)
    if unknown:
        raise StoreOpenError(
            f"the database's schema is at revision {', '.join(unknown)}, newer than this "
            f"server knows (its newest is {script.get_current_head()}): upgrade docket-server"
        )
    if current != set(script.get_heads()):
        command.upgrade(config, "head")


_T = TypeVar("_T")


def _run_to_end(method: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
    """The store call, which a cancel of its caller does not cut short: it runs to its end in
    a task of its own (its transaction commits or rolls back), and the caller, cancelled,
    hears of it once that end is reached. Cut short mid-statement, SQLAlchemy's asyncio
    adapter leaves the transaction open on a connection nobody holds until the garbage
    collector finds it, and with it SQLite's write lock: every other write waited out
    busy_timeout and failed (a server stopping while its fleet writer was mid-write)."""

    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> _T:
        task = asyncio.ensure_future(method(*args, **kwargs))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                await asyncio.wait({task})  # a second cancel stops this wait, not the call
            if not task.cancelled():
                task.exception()  # the caller was cancelled: that, not this, is what it hears
            raise

    return call


def _calls_run_to_end(cls: type[_T]) -> type[_T]:
    """Every public coroutine method of ``cls`` made _run_to_end."""
    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(value):
            setattr(cls, name, _run_to_end(value))
    return cls


def _insert_for(dialect: sa.Dialect, table: sa.Table) -> sqlite.Insert | postgresql.Insert:
    """An INSERT that can say ON CONFLICT, in the database's dialect."""
    if dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


@_calls_run_to_end
class SqlMetadataStore(MetadataStore, FleetStore, RolloutStore, PullStore, SecurityStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: AsyncEngine | None = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("store is not open")
        return self._engine

    async def open(self) -> None:
        """Connects and brings the schema up to date; a StoreOpenError says why it cannot."""
        url = _async_url(self.url)
        shown = url.render_as_string(hide_password=True)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            folder = Path(url.database).parent
            if not folder.is_dir():
                raise StoreOpenError(f"cannot open the database {shown}: no directory {folder}")
        options: dict[str, Any] = {}
        if url.get_backend_name() == "postgresql":
            # A connection PostgreSQL dropped (a restart, a failover) is replaced on checkout.
            options = {"connect_args": {"timeout": CONNECT_TIMEOUT}, "pool_pre_ping": True}
        self._engine = create_async_engine(url, **options)
        if url.get_backend_name() == "sqlite":
            sa.event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        try:
            await self._migrate()
        except (OSError, sa.exc.DBAPIError) as e:
            await self.close()
            raise StoreOpenError(f"cannot open the database {shown}: {_reason(e)}") from e
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def ping(self) -> None:
        """Raises unless the database answers a query."""
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def _migrate(self) -> None:
        async with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Servers starting together on one database migrate it one after another.
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            await conn.run_sync(_upgrade_schema)

    def _insert(self, table: sa.Table) -> sqlite.Insert | postgresql.Insert:
        return _insert_for(self.engine.dialect, table)

    async def _upsert(self, key: sa.Column[Any], value: str, values: dict[str, Any]) -> None:
        """Updates the row whose ``key`` is ``value``, or inserts it."""
        async with self.engine.begin() as conn:
            await self._upsert_many(conn, key, [{key.name: value, **values}])

    async def _upsert_many(
        self, conn: AsyncConnection, key: sa.Column[Any], rows: Sequence[dict[str, Any]]
    ) -> None:
        """Inserts each row (each naming ``key`` and the same columns) or, where its key
        exists, updates it: one executemany of ``INSERT ... ON CONFLICT DO UPDATE``."""
        if not rows:
            return
        # The last change to a key wins (PostgreSQL refuses one statement that updates a row
        # twice), and rows go in key order: two writers lock shared rows in the same order, so
        # neither waits for the other in a deadlock.
        by_key = {r[key.name]: r for r in rows}
        latest = [by_key[k] for k in sorted(by_key)]
        insert = self._insert(key.table)
        columns = [c for c in latest[0] if c != key.name]
        await conn.execute(
            insert.on_conflict_do_update(
                index_elements=[key], set_={c: insert.excluded[c] for c in columns}
            ),
            latest,
        )

    # Blobs

    async def add_blob(self, blob: Blob) -> None:
        values: dict[str, Any] = {
            "digest": blob.digest,
            "size_bytes": blob.size,
            "create_time": blob.create_time,
        }
        if blob.torrent is not None:
            values |= {
                "metainfo": blob.torrent.metainfo,
                "info_hash": blob.torrent.info_hash,
                "piece_length": blob.torrent.piece_length,
                "piece_count": blob.torrent.piece_count,
            }
        async with self.engine.begin() as conn:
            await conn.execute(
                self._insert(blobs)
                .values(**values)
                .on_conflict_do_nothing(index_elements=[blobs.c.digest])
            )

    async def set_torrents(self, torrents: Sequence[TorrentInfo]) -> None:
        async with self.engine.begin() as conn:
            for t in torrents:
                await conn.execute(
                    blobs.update()
                    .where(blobs.c.digest == t.digest)
                    .values(
                        metainfo=t.metainfo,
                        info_hash=t.info_hash,
                        piece_length=t.piece_length,
                        piece_count=t.piece_count,
                    )
                )

    async def get_blob(self, digest: str) -> Blob | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(blobs.select().where(blobs.c.digest == digest))).first()
        return None if row is None else _blob_from_row(row)

    async def present_digests(self, digests: Sequence[str]) -> set[str]:
        if not digests:
            return set()
        async with self.engine.connect() as conn:
            return await _present(conn, digests)

    async def list_blobs(self) -> list[Blob]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(blobs.select().order_by(blobs.c.digest))
            return [_blob_from_row(r) for r in rows]

    async def delete_unused_blobs(self, digests: Sequence[str]) -> list[str]:
        if not digests:
            return []
        for attempt in range(1, DELETE_ATTEMPTS + 1):
            try:
                async with self.engine.begin() as conn:
                    used = await _used_digests(conn, set(digests))
                    unused = sorted(set(digests) - used)
                    if unused:
                        await conn.execute(blobs.delete().where(blobs.c.digest.in_(unused)))
                    return unused
            except (sa.exc.IntegrityError, sa.exc.OperationalError):
                # A manifest naming one of them was written meanwhile: PostgreSQL refuses
                # the delete at its foreign key, SQLite the write after our read. Look again:
                # the manifest now keeps its blobs.
                if attempt == DELETE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def defer_blob_deletes(self, digests: Sequence[str]) -> None:
        if not digests:
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                self._insert(deferred_blob_deletes).on_conflict_do_nothing(
                    index_elements=[deferred_blob_deletes.c.digest]
                ),
                [{"digest": d, "defer_time": _now()} for d in sorted(set(digests))],
            )

    async def deferred_blob_deletes(self) -> list[str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(deferred_blob_deletes.c.digest).order_by(deferred_blob_deletes.c.digest)
            )
            return [r.digest for r in rows]

    async def forget_blob_deletes(self, digests: Sequence[str]) -> None:
        if digests:
            async with self.engine.begin() as conn:
                await conn.execute(
                    deferred_blob_deletes.delete().where(
                        deferred_blob_deletes.c.digest.in_(set(digests))
                    )
                )

    # Manifests and tags

    async def put_manifest(self, manifest: Manifest, tag: str | None) -> None:
        async with self.engine.begin() as conn:
            wanted = manifest.blob_digests
            if wanted:
                present = await _present(conn, wanted)
                missing = [d for d in dict.fromkeys(wanted) if d not in present]
                if missing:
                    raise MissingBlobsError(missing)
            child_ids: dict[str, int] = {}
            if manifest.children:
                child_ids = {
                    r.digest: r.id
                    for r in await conn.execute(
                        sa.select(manifests.c.id, manifests.c.digest).where(
                            (manifests.c.repository == manifest.repository)
                            & manifests.c.digest.in_({c.digest for c in manifest.children})
                        )
                    )
                }
                missing = [
                    d
                    for d in dict.fromkeys(c.digest for c in manifest.children)
                    if d not in child_ids
                ]
                if missing:
                    raise MissingManifestsError(missing)
            manifest_id = await conn.run_sync(
                lambda sync: _insert_manifest(sync, manifest, child_ids)
            )
            if tag is not None:
                insert = self._insert(tags).values(
                    repository=manifest.repository,
                    tag=tag,
                    manifest_id=manifest_id,
                    update_time=_now(),
                )
                await conn.execute(
                    insert.on_conflict_do_update(
                        index_elements=[tags.c.repository, tags.c.tag],
                        set_={
                            "manifest_id": insert.excluded.manifest_id,
                            "update_time": insert.excluded.update_time,
                        },
                    )
                )

    async def get_manifest(self, repository: str, digest: str) -> Manifest | None:
        found = await self.get_manifests(repository, [digest])
        return found[0] if found else None

    async def get_manifests(self, repository: str, digests: Sequence[str]) -> list[Manifest]:
        if not digests:
            return []
        async with self.engine.connect() as conn:
            return await _select_manifests(
                conn,
                (manifests.c.repository == repository) & manifests.c.digest.in_(set(digests)),
            )

    async def resolve_tag(self, repository: str, tag: str) -> Manifest | None:
        async with self.engine.connect() as conn:
            found = await _select_manifests(
                conn,
                manifests.c.id.in_(
                    sa.select(tags.c.manifest_id).where(
                        (tags.c.repository == repository) & (tags.c.tag == tag)
                    )
                ),
            )
        return found[0] if found else None

    async def tags_of(self, repository: str, digest: str) -> list[str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(tags.c.tag)
                .join(manifests, manifests.c.id == tags.c.manifest_id)
                .where((tags.c.repository == repository) & (manifests.c.digest == digest))
                .order_by(tags.c.tag)
            )
            return [r.tag for r in rows]

    async def list_tags(self, repository: str, after: str | None, limit: int) -> list[str]:
        query = sa.select(tags.c.tag).where(tags.c.repository == repository)
        if after is not None:
            query = query.where(tags.c.tag > after)
        async with self.engine.connect() as conn:
            rows = await conn.execute(query.order_by(tags.c.tag).limit(limit))
            return [r.tag for r in rows]

    async def repository_exists(self, repository: str) -> bool:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(manifests.c.id).where(manifests.c.repository == repository).limit(1)
                )
            ).first()
            return row is not None

    async def list_repositories(self, after: str | None, limit: int) -> list[str]:
        query = sa.select(manifests.c.repository).distinct()
        if after is not None:
            query = query.where(manifests.c.repository > after)
        async with self.engine.connect() as conn:
            rows = await conn.execute(query.order_by(manifests.c.repository).limit(limit))
            return [r.repository for r in rows]

    async def referrers(self, repository: str, subject: str) -> list[Manifest]:
        async with self.engine.connect() as conn:
            return await _select_manifests(
                conn,
                (manifests.c.repository == repository) & (manifests.c.subject_digest == subject),
            )

    async def list_tagged(self, after: tuple[str, str] | None, limit: int) -> list[Tagged]:
        query = sa.select(tags.c.repository, tags.c.tag, tags.c.manifest_id)
        if after is not None:
            query = query.where(sa.tuple_(tags.c.repository, tags.c.tag) > sa.tuple_(*after))
        async with self.engine.connect() as conn:
            rows = list(
                await conn.execute(query.order_by(tags.c.repository, tags.c.tag).limit(limit))
            )
            by_id = await _manifests_by_id(conn, manifests.c.id.in_({r.manifest_id for r in rows}))
        return [Tagged(r.repository, r.tag, by_id[r.manifest_id]) for r in rows]

    async def delete_tag(self, repository: str, tag: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                tags.delete().where((tags.c.repository == repository) & (tags.c.tag == tag))
            )
            return bool(result.rowcount)

    async def delete_manifest(self, repository: str, digest: str) -> DeleteResult | None:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(manifests.c.id).where(
                        (manifests.c.repository == repository) & (manifests.c.digest == digest)
                    )
                )
            ).first()
            if row is None:
                return None
            parents = [
                r.digest
                for r in await conn.execute(
                    sa.select(manifests.c.digest)
                    .join(manifest_children, manifest_children.c.manifest_id == manifests.c.id)
                    .where(manifest_children.c.child_id == row.id)
                    .order_by(manifests.c.digest)
                )
            ]
            if parents:
                raise ManifestInUseError(parents)
            names: list[str] = []
            removed: list[str] = []
            candidates: set[str] = set()
            pending = [row.id]
            while pending:
                manifest_id = pending.pop()
                names += [
                    f"{repository}:{r.tag}"
                    for r in await conn.execute(
                        sa.select(tags.c.tag).where(tags.c.manifest_id == manifest_id)
                    )
                ]
                await conn.execute(tags.delete().where(tags.c.manifest_id == manifest_id))
                current = (
                    await conn.execute(
                        sa.select(manifests.c.digest, manifests.c.config_digest).where(
                            manifests.c.id == manifest_id
                        )
                    )
                ).one()
                removed.append(current.digest)
                if current.config_digest:
                    candidates.add(current.config_digest)
                candidates.update(
                    r.digest
                    for r in await conn.execute(
                        sa.select(manifest_layers.c.digest).where(
                            manifest_layers.c.manifest_id == manifest_id
                        )
                    )
                )
                children = [
                    r.child_id
                    for r in await conn.execute(
                        sa.select(manifest_children.c.child_id).where(
                            manifest_children.c.manifest_id == manifest_id
                        )
                    )
                ]
                await conn.execute(manifests.delete().where(manifests.c.id == manifest_id))
                # Children go too, unless a tag or another index still names them.
                for child in dict.fromkeys(children):
                    tagged = (
                        await conn.execute(
                            sa.select(tags.c.tag).where(tags.c.manifest_id == child).limit(1)
                        )
                    ).first()
                    other = (
                        await conn.execute(
                            sa.select(manifest_children.c.manifest_id)
                            .where(manifest_children.c.child_id == child)
                            .limit(1)
                        )
                    ).first()
                    if tagged is None and other is None:
                        pending.append(child)
            # Only blobs the removed manifests used are candidates: a blob uploaded for a push
            # that has not put its manifest yet must not vanish under it.
            orphans = sorted(candidates - await _used_digests(conn, candidates))
        return DeleteResult(names=sorted(names), manifests=removed, orphaned_digests=orphans)

    # Pulls

    async def save_pull(self, pull: Pull) -> None:
        values = {
            "image_name": pull.image_name,
            "image": json.dumps(image_to_dict(pull.task.image)),
            "create_time": pull.create_time,
            **_outcome(pull.task),
        }
        await self._upsert(pulls.c.id, pull.id, values)

    async def list_pulls(self, agents: Sequence[str] | None, offset: int, limit: int) -> list[Pull]:
        query = pulls.select()
        if agents is not None:
            query = query.where(pulls.c.agent.in_(list(agents)))
        query = query.order_by(pulls.c.create_time.desc(), pulls.c.id).offset(offset).limit(limit)
        async with self.engine.connect() as conn:
            return [_pull_from_row(r) for r in await conn.execute(query)]

    async def fail_unfinished_pulls(self, reason: str) -> int:
        done = [str(s) for s in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)]
        async with self.engine.begin() as conn:
            result = await conn.execute(
                pulls.update()
                .where(pulls.c.state.not_in(done))
                .values(state=str(TaskState.FAILED), error=reason, end_time=_now())
            )
            return int(result.rowcount or 0)

    # Tokens, enrolled agents, audit

    async def save_token(self, token: TokenRecord) -> None:
        values = {
            "secret_hash": token.secret_hash,
            "role": str(token.role),
            "description": token.description,
            "create_time": token.create_time,
            "expire_time": token.expire_time,
            "max_uses": token.max_uses,
            "uses": token.uses,
            "groups": json.dumps(list(token.groups)),
            "labels": json.dumps(list(token.labels)),
            "revoked": token.revoked,
            "creator": token.creator,
        }
        await self._upsert(tokens.c.id, token.id, values)

    async def list_tokens(self) -> list[TokenRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(tokens.select().order_by(tokens.c.create_time, tokens.c.id))
            return [
                TokenRecord(
                    id=r.id,
                    secret_hash=r.secret_hash,
                    role=Role(r.role),
                    description=r.description,
                    create_time=_utc(r.create_time) or _now(),
                    expire_time=_utc(r.expire_time),
                    max_uses=r.max_uses,
                    uses=r.uses,
                    groups=tuple(json.loads(r.groups)),
                    labels=tuple(json.loads(r.labels)),
                    revoked=r.revoked,
                    creator=r.creator,
                )
                for r in rows
            ]

    async def save_identity(self, identity: AgentIdentity) -> None:
        values = {
            "key_hash": identity.key_hash,
            "serials": json.dumps(list(identity.serials)),
            "groups": json.dumps(list(identity.groups)) if identity.groups is not None else None,
            "labels": json.dumps(list(identity.labels)) if identity.labels is not None else None,
            "token_id": identity.token_id,
            "enroll_time": identity.enroll_time,
        }
        await self._upsert(agent_identities.c.name, identity.name, values)

    async def delete_identity(self, name: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                agent_identities.delete().where(agent_identities.c.name == name)
            )
            return bool(result.rowcount)

    async def delete_agent(self, name: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(agents.delete().where(agents.c.name == name))
            return bool(result.rowcount)

    async def list_identities(self) -> list[AgentIdentity]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(agent_identities.select().order_by(agent_identities.c.name))
            return [
                AgentIdentity(
                    name=r.name,
                    key_hash=r.key_hash,
                    serials=tuple(json.loads(r.serials)),
                    groups=tuple(json.loads(r.groups)) if r.groups is not None else None,
                    labels=tuple(json.loads(r.labels)) if r.labels is not None else None,
                    token_id=r.token_id,
                    enroll_time=_utc(r.enroll_time) or _now(),
                )
                for r in rows
            ]

    async def add_audit(self, entry: AuditEntry) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                audit_records.insert().values(
                    record_time=entry.time,
                    actor=entry.actor,
                    action=entry.action,
                    target=entry.target,
                    outcome=entry.outcome,
                    peer=entry.peer,
                )
            )

    async def list_audit(
        self, since: datetime | None, before_id: int, limit: int
    ) -> list[AuditEntry]:
        query = audit_records.select()
        if since is not None:
            query = query.where(audit_records.c.record_time >= since)
        if before_id:
            query = query.where(audit_records.c.id < before_id)
        query = query.order_by(audit_records.c.id.desc()).limit(limit)
        async with self.engine.connect() as conn:
            return [
                AuditEntry(
                    time=_utc(r.record_time) or _now(),
                    actor=r.actor,
                    action=r.action,
                    target=r.target,
                    outcome=r.outcome,
                    peer=r.peer,
                    id=r.id,
                )
                for r in await conn.execute(query)
            ]

    # Agents

    async def upsert_agent(self, record: AgentRecord) -> None:
        await self.save_agents([record])

    async def save_agents(self, records: Sequence[AgentRecord]) -> None:
        async with self.engine.begin() as conn:
            await self._upsert_many(conn, agents.c.name, [_agent_values(r) for r in records])

    async def get_agent(self, name: str) -> AgentRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(agents.select().where(agents.c.name == name))).first()
        return None if row is None else _agent_from_row(row)

    async def list_agents(self) -> list[AgentRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(agents.select().order_by(agents.c.name))
            return [_agent_from_row(r) for r in rows]

    async def touch_agents(self, last_seen: dict[str, datetime]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                agents.update()
                .where(agents.c.name == sa.bindparam("agent_name"))
                .values(last_seen_time=sa.bindparam("seen")),
                [{"agent_name": n, "seen": t} for n, t in last_seen.items()],
            )

    async def mark_all_offline(self) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                agents.update()
                .where(agents.c.state != str(AgentState.OFFLINE))
                .values(state=str(AgentState.OFFLINE))
            )
            return int(result.rowcount or 0)

    # Rollouts

    async def save_rollout(self, rollout: Rollout) -> None:
        await self.save_rollout_changes([rollout], [], [])

    async def save_task(self, task: Task) -> None:
        await self.save_rollout_changes([], [task], [])

    async def add_record(self, rollout_id: str, record: RolloutRecord) -> None:
        await self.save_rollout_changes([], [], [(rollout_id, record)])

    async def save_rollout_changes(
        self,
        rollouts_: Sequence[Rollout],
        tasks: Sequence[Task],
        records: Sequence[tuple[str, RolloutRecord]],
    ) -> None:
        async with self.engine.begin() as conn:
            await self._upsert_many(conn, rollouts.c.id, [_rollout_values(r) for r in rollouts_])
            await self._upsert_many(
                conn, rollout_tasks.c.order_id, [_task_values(t) for t in tasks]
            )
            if records:
                await conn.execute(
                    rollout_records.insert(), [_record_values(i, r) for i, r in records]
                )

    async def list_records(self, rollout_id: str) -> list[RolloutRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                rollout_records.select()
                .where(rollout_records.c.rollout_id == rollout_id)
                .order_by(rollout_records.c.id)
            )
            return [
                RolloutRecord(
                    time=_utc(r.record_time) or _now(),
                    agent=r.agent,
                    task_state=TaskState(r.task_state) if r.task_state else None,
                    rollout_state=RolloutState(r.rollout_state) if r.rollout_state else None,
                    message=r.message,
                )
                for r in rows
            ]

    async def load_rollout(self, rollout_id: str) -> Rollout | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(rollouts.select().where(rollouts.c.id == rollout_id))).first()
            if row is None:
                return None
            task_rows = list(
                await conn.execute(
                    rollout_tasks.select().where(rollout_tasks.c.rollout_id == rollout_id)
                )
            )
        image = image_from_dict(json.loads(row.image))
        tasks = {
            t.agent: Task(
                order_id=t.order_id,
                rollout_id=rollout_id,
                agent=t.agent,
                image=image_from_dict(json.loads(t.image)) if t.image else image,
                index_digest=image.digest if t.image else "",
                blobs={},
                load=t.load,
                image_id=t.image_id,
                **_outcome_of(t),
            )
            for t in task_rows
        }
        return Rollout(
            id=row.id,
            image=image,
            selector=row.selector,
            prefetch_only=row.prefetch_only,
            tasks=tasks,
            canary=row.canary,
            max_parallel=row.max_parallel,
            max_failures=row.max_failures,
            deadline=_utc(row.deadline_time) or _now(),
            state=RolloutState(row.state),
            reason=row.reason,
            cancelled=row.cancelled,
            create_time=_utc(row.create_time) or _now(),
            end_time=_utc(row.end_time),
        )

    async def running_rollout_ids(self) -> list[str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(rollouts.c.id)
                .where(rollouts.c.state == str(RolloutState.RUNNING))
                .order_by(rollouts.c.create_time, rollouts.c.id)
            )
            return [r.id for r in rows]

    async def list_rollout_ids(self, offset: int, limit: int) -> list[str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(rollouts.c.id)
                .order_by(rollouts.c.create_time.desc(), rollouts.c.id)
                .offset(offset)
                .limit(limit)
            )
            return [r.id for r in rows]

    # Garbage collection (issue 15)

    async def unused_blobs(self, ignoring: Sequence[tuple[str, str]] = ()) -> list[Blob]:
        used_as_config = manifests.c.config_digest == blobs.c.digest
        used_as_layer = manifest_layers.c.digest == blobs.c.digest
        if ignoring:  # as if these manifests were gone (what a dry run would free)
            gone_manifests = manifests.alias("gone")
            gone = sa.select(gone_manifests.c.id).where(
                sa.tuple_(gone_manifests.c.repository, gone_manifests.c.digest).in_(list(ignoring))
            )
            used_as_config = used_as_config & manifests.c.id.not_in(gone)
            used_as_layer = used_as_layer & manifest_layers.c.manifest_id.not_in(gone)
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                blobs.select()
                .where(~sa.exists().where(used_as_config), ~sa.exists().where(used_as_layer))
                .order_by(blobs.c.create_time, blobs.c.digest)
            )
            return [_blob_from_row(r) for r in rows]

    async def untagged_manifests(self) -> list[Manifest]:
        async with self.engine.connect() as conn:
            return await _select_manifests(conn, _untagged_image_manifest())

    async def delete_untagged_manifest(self, repository: str, digest: str) -> list[str] | None:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(manifests.c.id, manifests.c.config_digest).where(
                        (manifests.c.repository == repository)
                        & (manifests.c.digest == digest)
                        & _untagged_image_manifest()
                    )
                )
            ).first()
            if row is None:
                return None
            layers = await conn.execute(
                sa.select(manifest_layers.c.digest).where(manifest_layers.c.manifest_id == row.id)
            )
            used = {r.digest for r in layers}
            if row.config_digest:
                used.add(row.config_digest)
            await conn.execute(
                manifest_layers.delete().where(manifest_layers.c.manifest_id == row.id)
            )
            await conn.execute(manifests.delete().where(manifests.c.id == row.id))
            return sorted(used - await _used_digests(conn, used))


def _untagged_image_manifest() -> sa.ColumnElement[bool]:
    """An image manifest that no tag points at, no index includes, that is not an index
    itself and not a referrer (a signature or SBOM, kept for its subject)."""
    return sa.and_(
        ~sa.exists().where(tags.c.manifest_id == manifests.c.id),
        ~sa.exists().where(manifest_children.c.child_id == manifests.c.id),
        ~sa.exists().where(manifest_children.c.manifest_id == manifests.c.id),
        manifests.c.subject_digest.is_(None),
    )


async def _present(conn: AsyncConnection, digests: Sequence[str]) -> set[str]:
    rows = await conn.execute(sa.select(blobs.c.digest).where(blobs.c.digest.in_(set(digests))))
    return {r.digest for r in rows}


async def _used_digests(conn: AsyncConnection, digests: set[str]) -> set[str]:
    """Those of the blobs that some manifest uses, as its config or a layer."""
    if not digests:
        return set()
    rows = await conn.execute(
        sa.union(
            sa.select(manifests.c.config_digest.label("digest")).where(
                manifests.c.config_digest.in_(digests)
            ),
            sa.select(manifest_layers.c.digest.label("digest")).where(
                manifest_layers.c.digest.in_(digests)
            ),
        )
    )
    return {r.digest for r in rows}


async def _select_manifests(conn: AsyncConnection, where: sa.ColumnElement[bool]) -> list[Manifest]:
    return list((await _manifests_by_id(conn, where)).values())


async def _manifests_by_id(
    conn: AsyncConnection, where: sa.ColumnElement[bool]
) -> dict[int, Manifest]:
    """The manifests matching ``where`` with their layers and children, by id (oldest first)."""
    rows = list(await conn.execute(manifests.select().where(where).order_by(manifests.c.id)))
    if not rows:
        return {}
    ids = [r.id for r in rows]
    layers: dict[int, list[Descriptor]] = {}
    for lr in await conn.execute(
        manifest_layers.select()
        .where(manifest_layers.c.manifest_id.in_(ids))
        .order_by(manifest_layers.c.manifest_id, manifest_layers.c.position)
    ):
        layers.setdefault(lr.manifest_id, []).append(
            Descriptor(lr.digest, lr.size_bytes, lr.media_type)
        )
    children: dict[int, list[Descriptor]] = {}
    for cr in await conn.execute(
        manifest_children.select()
        .where(manifest_children.c.manifest_id.in_(ids))
        .order_by(manifest_children.c.manifest_id, manifest_children.c.position)
    ):
        children.setdefault(cr.manifest_id, []).append(
            Descriptor(
                cr.digest,
                cr.size_bytes,
                cr.media_type,
                Platform.parse(cr.platform) if cr.platform else None,
                cr.artifact_type,
            )
        )
    return {
        r.id: Manifest(
            repository=r.repository,
            digest=r.digest,
            media_type=r.media_type,
            content=r.content,
            config=(
                Descriptor(r.config_digest, r.config_size_bytes, r.config_media_type)
                if r.config_digest
                else None
            ),
            layers=tuple(layers.get(r.id, [])),
            children=tuple(children.get(r.id, [])),
            subject=(
                Descriptor(r.subject_digest, r.subject_size_bytes or 0, r.subject_media_type or "")
                if r.subject_digest
                else None
            ),
            artifact_type=r.artifact_type,
            diff_ids=tuple(json.loads(r.diff_ids)),
            build_time=_utc(r.build_time),
            platform=r.platform,
            create_time=_utc(r.create_time) or _now(),
        )
        for r in rows
    }


def _agent_values(record: AgentRecord) -> dict[str, Any]:
    info = record.info
    return {
        "name": info.name,
        "agent_id": info.agent_id,
        "groups": json.dumps(list(info.groups)),
        "labels": json.dumps(info.labels, sort_keys=True),
        "state": str(record.state),
        "version": info.version,
        "peer_address": record.peer_address,
        "bt_endpoint": info.bt_endpoint,
        "docker_version": info.docker_version,
        "docker_error": info.docker_error,
        "disk_free_bytes": info.disk_free_bytes,
        "cached_digests": json.dumps(list(info.cached_digests)),
        "platform": info.platform,
        "connect_time": record.connect_time,
        "last_seen_time": record.last_seen_time,
        "create_time": record.create_time,
    }


def _rollout_values(rollout: Rollout) -> dict[str, Any]:
    return {
        "id": rollout.id,
        "image": json.dumps(image_to_dict(rollout.image)),
        "selector": rollout.selector,
        "prefetch_only": rollout.prefetch_only,
        "canary": rollout.canary,
        "max_parallel": rollout.max_parallel,
        "max_failures": rollout.max_failures,
        "deadline_time": rollout.deadline,
        "state": str(rollout.state),
        "reason": rollout.reason,
        "cancelled": rollout.cancelled,
        "create_time": rollout.create_time,
        "end_time": rollout.end_time,
    }


def _task_values(task: Task) -> dict[str, Any]:
    return {
        "order_id": task.order_id,
        "rollout_id": task.rollout_id,
        "load": task.load,
        "image_id": task.image_id,
        "image": json.dumps(image_to_dict(task.image)) if task.index_digest else None,
        **_outcome(task),
    }


def _record_values(rollout_id: str, record: RolloutRecord) -> dict[str, Any]:
    return {
        "rollout_id": rollout_id,
        "record_time": record.time,
        "agent": record.agent,
        "task_state": str(record.task_state) if record.task_state else None,
        "rollout_state": str(record.rollout_state) if record.rollout_state else None,
        "message": record.message,
    }


def _outcome(task: Task) -> dict[str, Any]:
    """The columns a rollout's task and a pull share: its host, how it went, its bytes."""
    return {
        "agent": task.agent,
        "state": str(task.state),
        "error": task.error,
        "cached_bytes": task.cached_bytes,
        "bittorrent_bytes": task.bittorrent_bytes,
        "server_bytes": task.server_bytes,
        "fallback_bytes": task.fallback_bytes,
        "first_piece_bytes": task.first_piece_bytes,
        "start_time": task.start_time,
        "end_time": task.end_time,
    }


def _outcome_of(row: Any) -> dict[str, Any]:
    """Task fields from the columns of _outcome (except the agent, which the caller names)."""
    return {
        "state": TaskState(row.state),
        "error": row.error,
        "cached_bytes": row.cached_bytes,
        "bittorrent_bytes": row.bittorrent_bytes,
        "server_bytes": row.server_bytes,
        "fallback_bytes": row.fallback_bytes,
        "first_piece_bytes": row.first_piece_bytes,
        "start_time": _utc(row.start_time),
        "end_time": _utc(row.end_time),
    }


def _pull_from_row(row: Any) -> Pull:
    image = image_from_dict(json.loads(row.image))
    # The blobs as far as the record tells them (no torrents: the pull is over, or its
    # record is read for a list).
    when = _utc(row.create_time) or _now()
    descriptors = [*([image.config] if image.config else []), *image.layers]
    task = Task(
        order_id=row.id,
        rollout_id="",
        agent=row.agent,
        image=image,
        blobs={d.digest: Blob(d.digest, d.size, when, None) for d in descriptors},
        load=False,
        pull=True,
        **_outcome_of(row),
    )
    return Pull(row.id, row.image_name, task, when)


def _agent_from_row(row: Any) -> AgentRecord:
    return AgentRecord(
        info=AgentInfo(
            name=row.name,
            agent_id=row.agent_id,
            groups=tuple(json.loads(row.groups)),
            labels=json.loads(row.labels),
            version=row.version,
            bt_endpoint=row.bt_endpoint,
            docker_version=row.docker_version,
            docker_error=row.docker_error,
            disk_free_bytes=row.disk_free_bytes,
            cached_digests=tuple(json.loads(row.cached_digests)),
            platform=row.platform,
        ),
        state=AgentState(row.state),
        peer_address=row.peer_address,
        connect_time=_utc(row.connect_time) or _now(),
        last_seen_time=_utc(row.last_seen_time) or _now(),
        create_time=_utc(row.create_time) or _now(),
    )


def _blob_from_row(row: Any) -> Blob:
    torrent = None
    if row.metainfo is not None:
        torrent = TorrentInfo(
            digest=row.digest,
            metainfo=row.metainfo,
            info_hash=row.info_hash,
            piece_length=row.piece_length,
            piece_count=row.piece_count,
        )
    return Blob(
        digest=row.digest,
        size=row.size_bytes,
        create_time=_utc(row.create_time) or _now(),
        torrent=torrent,
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _now() -> datetime:
    return datetime.now(UTC)
