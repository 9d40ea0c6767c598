"""The metadata store on SQLAlchemy: SQLite under the data dir today, PostgreSQL by URL later.

The schema is brought up to date at open by MIGRATIONS, applied in order and recorded in the
``schema_migrations`` table; a database newer than this code is refused.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from docket_common.torrent import TorrentInfo
from docket_server.domain.fleet import AgentInfo, AgentRecord, AgentState, FleetStore
from docket_server.domain.models import Blob, Descriptor, Image, image_from_dict, image_to_dict
from docket_server.domain.orders import Task, TaskState
from docket_server.domain.rollouts import Rollout, RolloutRecord, RolloutState, RolloutStore
from docket_server.store.metadata import DeleteResult, MetadataStore, MissingBlobsError

meta = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations",
    meta,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("apply_time", sa.DateTime(timezone=True), nullable=False),
)

blobs = sa.Table(
    "blobs",
    meta,
    sa.Column("digest", sa.String(71), primary_key=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("metainfo", sa.LargeBinary, nullable=True),
    sa.Column("info_hash", sa.String(40), nullable=True),
    sa.Column("piece_length", sa.Integer, nullable=True),
    sa.Column("piece_count", sa.Integer, nullable=True),
)

images = sa.Table(
    "images",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("repository", sa.String(255), nullable=False),
    sa.Column("tag", sa.String(128), nullable=False),
    sa.Column("digest", sa.String(71), nullable=False, index=True),
    sa.Column("config_digest", sa.String(71), sa.ForeignKey("blobs.digest"), nullable=False),
    sa.Column("config_size_bytes", sa.BigInteger, nullable=False),
    sa.Column("config_media_type", sa.String(255), nullable=False),
    sa.Column("diff_ids", sa.Text, nullable=False),
    sa.Column("build_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("platform", sa.String(64), nullable=False),
    sa.UniqueConstraint("repository", "tag", name="uq_images_name"),
)

image_layers = sa.Table(
    "image_layers",
    meta,
    sa.Column(
        "image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("digest", sa.String(71), sa.ForeignKey("blobs.digest"), nullable=False, index=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("media_type", sa.String(255), nullable=False),
)


agents = sa.Table(
    "agents",
    meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("agent_id", sa.String(64), nullable=False),
    sa.Column("groups", sa.Text, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("peer_address", sa.String(255), nullable=False),
    sa.Column("bt_endpoint", sa.String(255), nullable=False),
    sa.Column("docker_version", sa.String(64), nullable=False),
    sa.Column("docker_error", sa.Text, nullable=False),
    sa.Column("disk_free_bytes", sa.BigInteger, nullable=False),
    sa.Column("cached_digests", sa.Text, nullable=False),
    sa.Column("connect_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_seen_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)


rollouts = sa.Table(
    "rollouts",
    meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("image", sa.Text, nullable=False),  # the image as it was (JSON)
    sa.Column("selector", sa.Text, nullable=False),
    sa.Column("prefetch_only", sa.Boolean, nullable=False),
    sa.Column("canary", sa.Integer, nullable=False),
    sa.Column("max_parallel", sa.Integer, nullable=False),
    sa.Column("max_failures", sa.Integer, nullable=False),
    sa.Column("deadline_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("cancelled", sa.Boolean, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
)

rollout_tasks = sa.Table(
    "rollout_tasks",
    meta,
    sa.Column("order_id", sa.String(32), primary_key=True),
    sa.Column(
        "rollout_id", sa.String(32), sa.ForeignKey("rollouts.id"), nullable=False, index=True
    ),
    sa.Column("agent", sa.String(64), nullable=False),
    sa.Column("load", sa.Boolean, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("image_id", sa.String(71), nullable=False),
    sa.Column("cached_bytes", sa.BigInteger, nullable=False),
    sa.Column("bittorrent_bytes", sa.BigInteger, nullable=False),
    sa.Column("server_bytes", sa.BigInteger, nullable=False),
    sa.Column("fallback_bytes", sa.BigInteger, nullable=False),
    sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
    # Added by migration 4.
    sa.Column("first_piece_bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
)

rollout_records = sa.Table(
    "rollout_records",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "rollout_id", sa.String(32), sa.ForeignKey("rollouts.id"), nullable=False, index=True
    ),
    sa.Column("record_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("agent", sa.String(64), nullable=False),
    sa.Column("task_state", sa.String(16), nullable=True),
    sa.Column("rollout_state", sa.String(16), nullable=True),
    sa.Column("message", sa.Text, nullable=False),
)


async def _migration_1(conn: AsyncConnection) -> None:
    await conn.run_sync(lambda sync: meta.create_all(sync, tables=[blobs, images, image_layers]))


async def _migration_2(conn: AsyncConnection) -> None:
    await conn.run_sync(lambda sync: meta.create_all(sync, tables=[agents]))


async def _migration_3(conn: AsyncConnection) -> None:
    await conn.run_sync(
        lambda sync: meta.create_all(sync, tables=[rollouts, rollout_tasks, rollout_records])
    )


async def _migration_4(conn: AsyncConnection) -> None:
    """rollout_tasks.first_piece_bytes (migration 3 creates it on a new database)."""

    def add(sync: sa.Connection) -> None:
        columns = {c["name"] for c in sa.inspect(sync).get_columns("rollout_tasks")}
        if "first_piece_bytes" not in columns:
            sync.execute(
                sa.text(
                    "ALTER TABLE rollout_tasks"
                    " ADD COLUMN first_piece_bytes BIGINT NOT NULL DEFAULT 0"
                )
            )

    await conn.run_sync(add)


Migration = Callable[[AsyncConnection], Awaitable[None]]
MIGRATIONS: list[Migration] = [_migration_1, _migration_2, _migration_3, _migration_4]


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: they were stored as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class SqlMetadataStore(MetadataStore, FleetStore, RolloutStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: AsyncEngine | None = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("store is not open")
        return self._engine

    async def open(self) -> None:
        self._engine = create_async_engine(self.url)
        if self.url.startswith("sqlite"):
            sa.event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)
        await self._migrate()

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def _migrate(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(lambda sync: schema_migrations.create(sync, checkfirst=True))
            current = (
                await conn.execute(sa.select(sa.func.max(schema_migrations.c.version)))
            ).scalar() or 0
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"the database is at schema version {current}, newer than this server "
                    f"({len(MIGRATIONS)}): upgrade docket-server"
                )
            for version, migration in enumerate(MIGRATIONS[current:], start=current + 1):
                await migration(conn)
                await conn.execute(
                    schema_migrations.insert().values(version=version, apply_time=_now())
                )

    async def _upsert(self, key: sa.Column[Any], value: str, values: dict[str, Any]) -> None:
        """Updates the row whose ``key`` is ``value``, or inserts it (portable: no ON CONFLICT)."""
        table = key.table
        async with self.engine.begin() as conn:
            updated = await conn.execute(table.update().where(key == value).values(**values))
            if not updated.rowcount:
                await conn.execute(table.insert().values({key.name: value, **values}))

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
            exists = await conn.execute(
                sa.select(blobs.c.digest).where(blobs.c.digest == blob.digest)
            )
            if exists.first() is None:
                await conn.execute(blobs.insert().values(**values))

    async def get_blob(self, digest: str) -> Blob | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(blobs.select().where(blobs.c.digest == digest))).first()
        return None if row is None else _blob_from_row(row)

    async def present_digests(self, digests: Sequence[str]) -> set[str]:
        if not digests:
            return set()
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(blobs.c.digest).where(blobs.c.digest.in_(list(set(digests))))
            )
            return {r.digest for r in rows}

    async def list_blobs(self) -> list[Blob]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(blobs.select().order_by(blobs.c.digest))
            return [_blob_from_row(r) for r in rows]

    # Images

    async def put_image(self, image: Image) -> None:
        async with self.engine.begin() as conn:
            wanted = image.blob_digests
            present = {
                r.digest
                for r in await conn.execute(
                    sa.select(blobs.c.digest).where(blobs.c.digest.in_(set(wanted)))
                )
            }
            missing = [d for d in dict.fromkeys(wanted) if d not in present]
            if missing:
                raise MissingBlobsError(missing)
            await conn.execute(
                images.delete().where(
                    (images.c.repository == image.repository) & (images.c.tag == image.tag)
                )
            )
            result = await conn.execute(
                images.insert().values(
                    repository=image.repository,
                    tag=image.tag,
                    digest=image.digest,
                    config_digest=image.config.digest,
                    config_size_bytes=image.config.size,
                    config_media_type=image.config.media_type,
                    diff_ids=json.dumps(list(image.diff_ids)),
                    build_time=image.build_time,
                    create_time=image.create_time,
                    platform=image.platform,
                )
            )
            image_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
            if image.layers:
                await conn.execute(
                    image_layers.insert(),
                    [
                        {
                            "image_id": image_id,
                            "position": i,
                            "digest": layer.digest,
                            "size_bytes": layer.size,
                            "media_type": layer.media_type,
                        }
                        for i, layer in enumerate(image.layers)
                    ],
                )

    async def get_image(self, repository: str, tag: str) -> Image | None:
        found = await self._select_images(
            (images.c.repository == repository) & (images.c.tag == tag), limit=1
        )
        return found[0] if found else None

    async def find_images_by_digest(self, repository: str, digest: str) -> list[Image]:
        return await self._select_images(
            (images.c.repository == repository) & (images.c.digest == digest)
        )

    async def list_images(self, after: tuple[str, str] | None, limit: int) -> list[Image]:
        where: sa.ColumnElement[bool] = sa.true()
        if after is not None:
            where = sa.tuple_(images.c.repository, images.c.tag) > sa.tuple_(*after)
        return await self._select_images(where, limit=limit)

    async def _select_images(
        self, where: sa.ColumnElement[bool], limit: int | None = None
    ) -> list[Image]:
        query = images.select().where(where).order_by(images.c.repository, images.c.tag)
        if limit is not None:
            query = query.limit(limit)
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(query))
            if not rows:
                return []
            layer_rows = await conn.execute(
                image_layers.select()
                .where(image_layers.c.image_id.in_([r.id for r in rows]))
                .order_by(image_layers.c.image_id, image_layers.c.position)
            )
        layers: dict[int, list[Descriptor]] = {}
        for lr in layer_rows:
            layers.setdefault(lr.image_id, []).append(
                Descriptor(lr.digest, lr.size_bytes, lr.media_type)
            )
        return [
            Image(
                repository=r.repository,
                tag=r.tag,
                config=Descriptor(r.config_digest, r.config_size_bytes, r.config_media_type),
                layers=tuple(layers.get(r.id, [])),
                diff_ids=tuple(json.loads(r.diff_ids)),
                build_time=_utc(r.build_time),
                create_time=_utc(r.create_time) or _now(),
                platform=r.platform,
            )
            for r in rows
        ]

    async def delete_images(self, names: Sequence[tuple[str, str]]) -> DeleteResult:
        deleted: list[str] = []
        candidates: set[str] = set()
        async with self.engine.begin() as conn:
            for repository, tag in names:
                name_match = (images.c.repository == repository) & (images.c.tag == tag)
                row = (await conn.execute(images.select().where(name_match))).first()
                if row is None:
                    continue
                candidates.add(row.config_digest)
                candidates.update(
                    r.digest
                    for r in await conn.execute(
                        sa.select(image_layers.c.digest).where(image_layers.c.image_id == row.id)
                    )
                )
                await conn.execute(image_layers.delete().where(image_layers.c.image_id == row.id))
                await conn.execute(images.delete().where(images.c.id == row.id))
                deleted.append(f"{repository}:{tag}")
            # Only blobs the deleted images used are candidates: a blob uploaded for a push
            # that has not recorded its image yet must not vanish under it.
            still_used = {
                r.digest
                for r in await conn.execute(
                    sa.union(
                        sa.select(images.c.config_digest.label("digest")).where(
                            images.c.config_digest.in_(candidates)
                        ),
                        sa.select(image_layers.c.digest.label("digest")).where(
                            image_layers.c.digest.in_(candidates)
                        ),
                    )
                )
            }
            orphans = sorted(candidates - still_used)
            if orphans:
                await conn.execute(blobs.delete().where(blobs.c.digest.in_(orphans)))
        return DeleteResult(names=deleted, orphaned_digests=orphans)

    # Agents

    async def upsert_agent(self, record: AgentRecord) -> None:
        info = record.info
        values = {
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
            "connect_time": record.connect_time,
            "last_seen_time": record.last_seen_time,
            "create_time": record.create_time,
        }
        await self._upsert(agents.c.name, info.name, values)

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
        values = {
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
        await self._upsert(rollouts.c.id, rollout.id, values)

    async def save_task(self, task: Task) -> None:
        values = {
            "rollout_id": task.rollout_id,
            "agent": task.agent,
            "load": task.load,
            "state": str(task.state),
            "error": task.error,
            "image_id": task.image_id,
            "cached_bytes": task.cached_bytes,
            "bittorrent_bytes": task.bittorrent_bytes,
            "server_bytes": task.server_bytes,
            "fallback_bytes": task.fallback_bytes,
            "first_piece_bytes": task.first_piece_bytes,
            "start_time": task.start_time,
            "end_time": task.end_time,
        }
        await self._upsert(rollout_tasks.c.order_id, task.order_id, values)

    async def add_record(self, rollout_id: str, record: RolloutRecord) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                rollout_records.insert().values(
                    rollout_id=rollout_id,
                    record_time=record.time,
                    agent=record.agent,
                    task_state=str(record.task_state) if record.task_state else None,
                    rollout_state=str(record.rollout_state) if record.rollout_state else None,
                    message=record.message,
                )
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
                image=image,
                blobs={},
                load=t.load,
                state=TaskState(t.state),
                error=t.error,
                image_id=t.image_id,
                cached_bytes=t.cached_bytes,
                bittorrent_bytes=t.bittorrent_bytes,
                server_bytes=t.server_bytes,
                fallback_bytes=t.fallback_bytes,
                first_piece_bytes=t.first_piece_bytes,
                start_time=_utc(t.start_time),
                end_time=_utc(t.end_time),
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
                .order_by(rollouts.c.create_time)
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
