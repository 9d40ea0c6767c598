"""The schema as the hand-written migrations left it (version 7), and those migrations.

Before Alembic, ``SqlMetadataStore.open()`` applied MIGRATIONS in order and recorded each in
``schema_migrations``. The first Alembic revision runs them (versions/rev0001_hand_written.py):
a new database gets all seven, an older one the ones it lacks. The tables here are a frozen
copy of version 7: the live schema (docket_server/store/sql.py) changes by later revisions,
never by editing these.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import sqlalchemy as sa

from docket_common.digest import sha256_digest
from docket_common.manifest import OCI_MANIFEST, oci_manifest
from docket_server.domain.models import Descriptor, Manifest

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

# Before migration 5 an image was a tag and its config and layers; it is now a tag pointing at a
# manifest. These two tables are what migration 1 made and migration 5 reads and drops.
_legacy = sa.MetaData()
legacy_images = sa.Table(
    "images",
    _legacy,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("repository", sa.String(255), nullable=False),
    sa.Column("tag", sa.String(128), nullable=False),
    sa.Column("digest", sa.String(71), nullable=False, index=True),
    sa.Column("config_digest", sa.String(71), nullable=False),
    sa.Column("config_size_bytes", sa.BigInteger, nullable=False),
    sa.Column("config_media_type", sa.String(255), nullable=False),
    sa.Column("diff_ids", sa.Text, nullable=False),
    sa.Column("build_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("platform", sa.String(64), nullable=False),
    sa.UniqueConstraint("repository", "tag", name="uq_images_name"),
)
legacy_image_layers = sa.Table(
    "image_layers",
    _legacy,
    sa.Column("image_id", sa.Integer, primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("digest", sa.String(71), nullable=False, index=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("media_type", sa.String(255), nullable=False),
)

# A manifest, stored in one repository: its exact bytes and what the registry read from them.
manifests = sa.Table(
    "manifests",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("repository", sa.String(255), nullable=False),
    sa.Column("digest", sa.String(71), nullable=False),
    sa.Column("media_type", sa.String(255), nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=False),
    sa.Column("config_digest", sa.String(71), sa.ForeignKey("blobs.digest"), nullable=True),
    sa.Column("config_size_bytes", sa.BigInteger, nullable=True),
    sa.Column("config_media_type", sa.String(255), nullable=True),
    sa.Column("diff_ids", sa.Text, nullable=False),
    sa.Column("build_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("platform", sa.String(128), nullable=False),
    sa.Column("artifact_type", sa.String(255), nullable=False),
    sa.Column("subject_digest", sa.String(71), nullable=True),
    sa.Column("subject_size_bytes", sa.BigInteger, nullable=True),
    sa.Column("subject_media_type", sa.String(255), nullable=True),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
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
    sa.Column("digest", sa.String(71), sa.ForeignKey("blobs.digest"), nullable=False, index=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("media_type", sa.String(255), nullable=False),
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
    sa.Column("digest", sa.String(71), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("media_type", sa.String(255), nullable=False),
    sa.Column("platform", sa.String(128), nullable=True),
    sa.Column("artifact_type", sa.String(255), nullable=False),
)

tags = sa.Table(
    "tags",
    meta,
    sa.Column("repository", sa.String(255), primary_key=True),
    sa.Column("tag", sa.String(128), primary_key=True),
    sa.Column("manifest_id", sa.Integer, sa.ForeignKey("manifests.id"), nullable=False, index=True),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
)

# Blobs no manifest uses any more but that a rollout in flight still fetched when their last
# manifest went: deleted once nothing needs them.
deferred_blob_deletes = sa.Table(
    "deferred_blob_deletes",
    meta,
    sa.Column("digest", sa.String(71), primary_key=True),
    sa.Column("defer_time", sa.DateTime(timezone=True), nullable=False),
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
    # Added by migration 5.
    sa.Column("platform", sa.String(128), nullable=False, server_default=""),
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
    # Added by migration 5: the image this host gets when it is not the rollout's own (the
    # platform's image of a multi-platform index), as JSON.
    sa.Column("image", sa.Text, nullable=True),
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


# Added by migration 6: pulls through the agents' registry faces (domain/pulls.py).
pulls = sa.Table(
    "pulls",
    meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("agent", sa.String(64), nullable=False, index=True),
    sa.Column("image_name", sa.Text, nullable=False),
    sa.Column("image", sa.Text, nullable=False),  # the image pulled (JSON): digests and sizes
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("cached_bytes", sa.BigInteger, nullable=False),
    sa.Column("bittorrent_bytes", sa.BigInteger, nullable=False),
    sa.Column("server_bytes", sa.BigInteger, nullable=False),
    sa.Column("first_piece_bytes", sa.BigInteger, nullable=False),
    sa.Column("fallback_bytes", sa.BigInteger, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
)


# Added by migration 7: who may call (domain/security.py).
tokens = sa.Table(
    "tokens",
    meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expire_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("max_uses", sa.Integer, nullable=False),
    sa.Column("uses", sa.Integer, nullable=False),
    sa.Column("groups", sa.Text, nullable=False),  # JSON
    sa.Column("labels", sa.Text, nullable=False),  # JSON
    sa.Column("revoked", sa.Boolean, nullable=False),
    sa.Column("creator", sa.String(64), nullable=False),
)

agent_identities = sa.Table(
    "agent_identities",
    meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("key_hash", sa.String(71), nullable=False),
    sa.Column("serials", sa.Text, nullable=False),  # JSON: the certificates issued to it
    sa.Column("groups", sa.Text, nullable=True),  # JSON; NULL: any
    sa.Column("labels", sa.Text, nullable=True),
    sa.Column("token_id", sa.String(32), nullable=False),
    sa.Column("enroll_time", sa.DateTime(timezone=True), nullable=False),
)

audit_records = sa.Table(
    "audit_records",
    meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("record_time", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(255), nullable=False),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("peer", sa.String(255), nullable=False),
)


def _migration_1(sync: sa.Connection) -> None:
    meta.create_all(sync, tables=[blobs])
    _legacy.create_all(sync, tables=[legacy_images, legacy_image_layers])


def _migration_2(sync: sa.Connection) -> None:
    meta.create_all(sync, tables=[agents])


def _migration_3(sync: sa.Connection) -> None:
    meta.create_all(sync, tables=[rollouts, rollout_tasks, rollout_records])


def _migration_4(sync: sa.Connection) -> None:
    """rollout_tasks.first_piece_bytes (migration 3 creates it on a new database)."""
    _add_column(sync, "rollout_tasks", "first_piece_bytes", "BIGINT NOT NULL DEFAULT 0")


def _add_column(sync: sa.Connection, table: str, column: str, ddl: str) -> None:
    if column not in {c["name"] for c in sa.inspect(sync).get_columns(table)}:
        sync.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))


def _migration_5(sync: sa.Connection) -> None:
    """Manifests: every image becomes the manifest Docket wrote for it (the same bytes, so the
    same digest) and a tag; agents get a platform, rollout tasks an image of their own."""
    meta.create_all(
        sync,
        tables=[manifests, manifest_layers, manifest_children, tags, deferred_blob_deletes],
    )
    _add_column(sync, "agents", "platform", "VARCHAR(128) NOT NULL DEFAULT ''")
    _add_column(sync, "rollout_tasks", "image", "TEXT")
    if not sa.inspect(sync).has_table("images"):
        return
    layer_rows: dict[int, list[Descriptor]] = {}
    for lr in sync.execute(
        legacy_image_layers.select().order_by(
            legacy_image_layers.c.image_id, legacy_image_layers.c.position
        )
    ):
        layer_rows.setdefault(lr.image_id, []).append(
            Descriptor(lr.digest, lr.size_bytes, lr.media_type)
        )
    ids: dict[tuple[str, str], int] = {}
    for row in sync.execute(legacy_images.select().order_by(legacy_images.c.id)):
        config = Descriptor(row.config_digest, row.config_size_bytes, row.config_media_type)
        layers = layer_rows.get(row.id, [])
        content = oci_manifest(config, layers)
        digest = sha256_digest(content)
        key = (row.repository, digest)
        if key not in ids:
            ids[key] = _insert_manifest(
                sync,
                Manifest(
                    repository=row.repository,
                    digest=digest,
                    media_type=OCI_MANIFEST,
                    content=content,
                    config=config,
                    layers=tuple(layers),
                    children=(),
                    subject=None,
                    artifact_type=config.media_type,
                    diff_ids=tuple(json.loads(row.diff_ids)),
                    build_time=row.build_time,
                    platform=row.platform,
                    create_time=row.create_time,
                ),
                {},
            )
        sync.execute(
            tags.insert().values(
                repository=row.repository,
                tag=row.tag,
                manifest_id=ids[key],
                update_time=row.create_time,
            )
        )
    legacy_image_layers.drop(sync)
    legacy_images.drop(sync)


def _migration_6(sync: sa.Connection) -> None:
    meta.create_all(sync, tables=[pulls])


def _migration_7(sync: sa.Connection) -> None:
    meta.create_all(sync, tables=[tokens, agent_identities, audit_records])


MIGRATIONS: list[Callable[[sa.Connection], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
]


def upgrade_to_7(sync: sa.Connection) -> int:
    """Applies the hand-written migrations this database lacks; returns the version it was at
    (0: a new database). Refuses one newer than version 7."""
    schema_migrations.create(sync, checkfirst=True)
    current = sync.execute(sa.select(sa.func.max(schema_migrations.c.version))).scalar() or 0
    if current > len(MIGRATIONS):
        raise RuntimeError(
            f"the database is at hand-written schema version {current}, newer than this "
            f"server knows ({len(MIGRATIONS)}): upgrade docket-server"
        )
    for version, migration in enumerate(MIGRATIONS[current:], start=current + 1):
        migration(sync)
        sync.execute(
            schema_migrations.insert().values(version=version, apply_time=datetime.now(UTC))
        )
    return int(current)


def _insert_manifest(sync: sa.Connection, m: Manifest, child_ids: dict[str, int]) -> int:
    """Inserts a manifest's rows; returns its id. ``child_ids`` maps an index's children's
    digests to their ids."""
    result = sync.execute(
        manifests.insert().values(
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
    )
    manifest_id = int(result.inserted_primary_key[0])  # type: ignore[index]
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
