"""The registry: blobs in, images recorded over them, blobs out, torrents seeded.

Takes and returns the dataclasses of domain.models; raises the errors of domain.errors.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import structlog

from docket_common.digest import InvalidDigestError, check_digest, is_digest, sha256_digest
from docket_common.errors import Reason
from docket_common.manifest import (
    IMAGE_CONFIG_TYPES,
    OCI_CONFIG,
    OCI_LAYER,
    ManifestError,
    ParsedManifest,
    oci_manifest,
    parse_manifest,
)
from docket_common.reference import (
    InvalidReferenceError,
    Reference,
    is_repository,
    is_tag,
    parse_reference,
)
from docket_common.timefmt import parse_rfc3339
from docket_common.torrent import TorrentInfo, make_torrent, remake_torrent, torrent_ssl_cert
from docket_server.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from docket_server.domain.models import Blob, Descriptor, Image, Manifest
from docket_server.store.blobs import BlobStore, BlobWriter
from docket_server.store.metadata import (
    DeleteResult,
    ManifestInUseError,
    MetadataStore,
    MissingBlobsError,
    MissingManifestsError,
)

log = structlog.get_logger()

MAX_CONFIG_BYTES = 16 * 1024 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_GC_GRACE = timedelta(hours=1)
_PRESENT_BATCH = 500  # digests looked up in one query


class BlobSeeder(Protocol):
    """What the registry needs of the BitTorrent side."""

    def seed(self, blob: Blob) -> None: ...

    def unseed(self, digest: str) -> None: ...


@dataclass(frozen=True)
class UploadResult:
    blob: Blob
    already_existed: bool


@dataclass(frozen=True)
class Garbage:
    """A blob garbage collection deleted, or (a dry run) would delete."""

    digest: str
    size: int


@dataclass(frozen=True)
class Collection:
    """What one garbage collection did."""

    blobs: list[Garbage]  # deleted, or (dry_run) to be deleted
    dry_run: bool
    manifests: list[str]  # "repository@digest" of the untagged manifests removed (or to be)
    kept: int  # blobs no image uses that were kept: too young, in use, or needed in flight

    @property
    def freed_bytes(self) -> int:
        return sum(g.size for g in self.blobs)


class _KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._users: defaultdict[str, int] = defaultdict(int)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        self._users[key] += 1
        try:
            async with self._locks[key]:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]


class Registry:
    def __init__(
        self,
        metadata: MetadataStore,
        blobs: BlobStore,
        seeder: BlobSeeder,
        announce_url: str | None = None,
    ) -> None:
        self.metadata = metadata
        self.blobs = blobs
        self.seeder = seeder
        self.announce_url = announce_url
        # The fleet CA when TLS is on: every torrent is then an SSL torrent rooted in it.
        self.ssl_cert: bytes | None = None
        # Serialises what one process does to one digest: the commit of an upload against the
        # deletion of the same blob.
        self._blob_locks = _KeyedLocks()
        # The blobs that rollouts in flight fetch (the order book says): not deleted under
        # them when their last manifest goes, but once they are done.
        self.needed_blobs: Callable[[], set[str]] = set
        self._deferred: set[str] = set()
        self._collecting = asyncio.Lock()
        self._collector: asyncio.Future[None] | None = None
        # Garbage collection: blobs no image uses go once they are older than the grace (a
        # push uploads its blobs before its manifest) and were not asked for by a push
        # within it (found present, mounted, uploaded again: its manifest may follow).
        self.gc_grace = DEFAULT_GC_GRACE
        self.gc_untagged = True  # also remove image manifests no tag or index names
        self._asked_for: dict[str, float] = {}  # digest -> when (time.time())
        # Told of every upload's end: "stored", "existed" or "refused", and its bytes (metrics).
        self.on_upload: Callable[[str, int], None] = lambda _result, _size: None

    async def reseed_all(self) -> int:
        """Seeds every stored blob again, as after a restart: no hashing up front. Torrents
        made for another CA (or none: TLS was off) are made again for this one."""
        count = 0
        remade: list[Blob] = []
        for blob in await self.metadata.list_blobs():
            if not self.blobs.exists(blob.digest):
                log.error("blob recorded but missing on disk: not seeded", digest=blob.digest)
                continue
            if blob.torrent is None:
                continue
            torrent = self._for_this_ca(blob.torrent)
            if torrent is not blob.torrent:
                blob = replace(blob, torrent=torrent)
                remade.append(blob)
            self.seeder.seed(blob)
            count += 1
        if remade:
            await self.metadata.set_torrents([b.torrent for b in remade if b.torrent])
            log.info(
                "torrents made again for the fleet CA", count=len(remade), ssl=bool(self.ssl_cert)
            )
        return count

    def _for_this_ca(self, torrent: TorrentInfo) -> TorrentInfo:
        if torrent_ssl_cert(torrent.metainfo) == self.ssl_cert:
            return torrent
        return remake_torrent(torrent, self.announce_url, self.ssl_cert)

    # Blobs

    async def stat_blobs(self, digests: Sequence[str]) -> list[str]:
        for d in digests:
            valid_digest(d)
        present = await self.metadata.present_digests(digests)
        self._asked(present)
        return [d for d in dict.fromkeys(digests) if d not in present or not self.blobs.exists(d)]

    async def upload_blob(
        self,
        digest: str,
        size: int,
        chunks: AsyncIterator[bytes],
        named_after: Callable[[], str] | None = None,
    ) -> UploadResult:
        """Stores the bytes under ``digest`` only if they match it and ``size``. An empty
        ``digest`` is taken from ``named_after()`` once the bytes are in; if that is empty
        too, the blob is stored under the sha256 of its bytes."""
        if digest or named_after is None:
            valid_digest(digest)
            self._asked([digest])
        if size < 0:
            raise InvalidArgument(
                Reason.SIZE_MISMATCH,
                f"negative size {size} for blob {digest or '(named later)'}",
                digest=digest,
            )
        writer = self.blobs.writer(digest, size)
        try:
            await write_chunks(writer, chunks)
            if not digest and named_after is not None:
                digest = named_after()
                digest = valid_digest(digest) if digest else writer.content_digest()
        except BaseException:
            self.on_upload("refused", writer.written)
            writer.abort()
            raise
        return await self.commit_blob(writer, digest)

    async def commit_blob(self, writer: BlobWriter, digest: str) -> UploadResult:
        """Stores what ``writer`` holds under ``digest`` if its bytes hash to it, records the
        blob and seeds it; drops the bytes otherwise."""
        try:
            async with self._blob_locks.hold(digest):
                piece_length, pieces = await writer.commit(digest)
                existing = await self.metadata.get_blob(digest)
                if existing is not None:
                    self._asked([digest])
                    self.on_upload("existed", writer.written)
                    return UploadResult(existing, already_existed=True)
                size = writer.written
                torrent = (
                    make_torrent(
                        digest, size, piece_length, pieces, self.announce_url, self.ssl_cert
                    )
                    if size > 0
                    else None
                )
                blob = Blob(digest, size, datetime.now(UTC), torrent)
                await self.metadata.add_blob(blob)
        except BaseException:
            self.on_upload("refused", writer.written)
            writer.abort()
            raise
        self._asked([digest])
        if torrent is not None:
            self.seeder.seed(blob)
        self.on_upload("stored", size)
        log.info("blob stored", digest=digest, size_bytes=size, pieces=len(pieces) // 20)
        return UploadResult(blob, already_existed=False)

    async def mountable_blob(self, digest: str) -> str | None:
        """The digest, when the server holds that blob: blobs are shared by every repository,
        so a registry "mount" from another repository is a lookup."""
        if not is_digest(digest):
            return None
        blob = await self.metadata.get_blob(digest)
        if blob is None or not self.blobs.exists(digest):
            return None
        self._asked([digest])
        return digest

    @staticmethod
    def check_repository(name: str) -> str:
        """``name`` when it is a repository name; else INVALID_ARGUMENT (INVALID_REFERENCE)."""
        return _repository(name)

    async def blob_file(self, digest: str) -> tuple[Blob, Path]:
        """A stored blob and the file that holds it, for serving it as it is."""
        blob = await self._blob(digest)
        path = self.blobs.local_path(digest)
        if not path.is_file():
            raise NotFound(Reason.BLOB_NOT_FOUND, f"blob {digest} not found", digest=digest)
        self._asked([digest])  # `docker push` asks with HEAD whether to upload a layer
        return blob, path

    async def read_blob(self, digest: str, offset: int, length: int) -> AsyncIterator[bytes]:
        blob = await self._blob(digest)
        if offset < 0 or offset > blob.size or length < 0:
            raise InvalidArgument(
                Reason.INVALID_RANGE,
                f"cannot read {length} bytes at offset {offset} of a {blob.size}-byte blob",
                digest=digest,
                offset_bytes=offset,
                size_bytes=blob.size,
            )
        return self.blobs.read(digest, offset, length)

    async def read_pieces(self, torrent: TorrentInfo, pieces: Sequence[int]) -> list[bytes]:
        """The bytes of some of a blob's pieces, given its torrent (from ``get_torrent``):
        straight from the store, without asking the database again for every piece."""
        length = torrent.piece_length
        path = self.blobs.local_path(torrent.digest)
        try:
            return await asyncio.to_thread(_read_pieces, path, length, list(pieces))
        except FileNotFoundError as e:
            raise NotFound(
                Reason.BLOB_NOT_FOUND,
                f"blob {torrent.digest} was deleted",
                digest=torrent.digest,
            ) from e

    async def get_torrent(self, digest: str) -> TorrentInfo:
        blob = await self._blob(digest)
        if blob.torrent is None:
            raise NotFound(
                Reason.BLOB_NOT_FOUND, f"blob {digest} is empty and has no torrent", digest=digest
            )
        return blob.torrent

    async def _blob(self, digest: str) -> Blob:
        blob = await self.metadata.get_blob(valid_digest(digest))
        if blob is None:
            raise NotFound(Reason.BLOB_NOT_FOUND, f"blob {digest} not found", digest=digest)
        return blob

    # Manifests, as the registry protocol has them

    async def put_manifest(
        self, repository: str, reference: str, content: bytes, content_type: str = ""
    ) -> Manifest:
        """Stores a manifest (or index) as pushed, in ``repository``, under ``reference``: a
        tag, which then points at it, or its digest. Everything it names must be stored:
        blobs for an image manifest, manifests of the same repository for an index."""
        _repository(repository)
        tag = None
        if is_digest(reference) or ":" in reference:
            valid_digest(reference)
        else:
            tag = _tag(reference)
        try:
            parsed = parse_manifest(content, content_type)
        except ManifestError as e:
            raise InvalidArgument(Reason.INVALID_MANIFEST, str(e), name=repository) from e
        digest = sha256_digest(content)
        if tag is None and digest != reference:
            raise InvalidArgument(
                Reason.DIGEST_MISMATCH,
                f"the manifest's bytes hash to {digest}, not {reference}",
                expected=reference,
                actual=digest,
            )
        manifest = await self._manifest_of(repository, digest, content, parsed)
        return await self._record(manifest, tag)

    async def _manifest_of(
        self, repository: str, digest: str, content: bytes, parsed: ParsedManifest
    ) -> Manifest:
        diff_ids: tuple[str, ...] = ()
        build_time = None
        platform = ""
        if parsed.config is not None:
            await self._check_blob_sizes((parsed.config, *parsed.layers))
            if parsed.config.media_type in IMAGE_CONFIG_TYPES:
                config = await self._read_config(parsed.config)
                rootfs = config.get("rootfs")
                ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
                if not isinstance(ids, list) or len(ids) != len(parsed.layers):
                    raise InvalidArgument(
                        Reason.INVALID_IMAGE,
                        f"the config lists {len(ids) if isinstance(ids, list) else 'no'} "
                        f"layer diff_ids but the manifest names {len(parsed.layers)} layers",
                        config=parsed.config.digest,
                    )
                diff_ids = tuple(str(d) for d in ids)
                build_time = parse_rfc3339(config.get("created"))
                platform = "/".join(
                    str(config[k]) for k in ("os", "architecture", "variant") if config.get(k)
                )
        if parsed.manifests:
            children = {
                m.digest: m
                for m in await self.metadata.get_manifests(
                    repository, [c.digest for c in parsed.manifests]
                )
            }
            missing = [c.digest for c in parsed.manifests if c.digest not in children]
            if missing:
                raise FailedPrecondition(
                    Reason.IMAGE_NOT_FOUND,
                    f"the index names manifests {repository} does not hold: {', '.join(missing)}",
                    digests=",".join(missing),
                )
            for i, entry in enumerate(parsed.manifests):
                child = children[entry.digest]
                if entry.size != len(child.content) or entry.media_type != child.media_type:
                    raise InvalidArgument(
                        Reason.INVALID_MANIFEST,
                        f"manifests[{i}] says {entry.media_type}, {entry.size} bytes, but "
                        f"{entry.digest} is {child.media_type}, {len(child.content)} bytes",
                        digest=entry.digest,
                    )
        return Manifest(
            repository=repository,
            digest=digest,
            media_type=parsed.media_type,
            content=content,
            config=parsed.config,
            layers=parsed.layers,
            children=parsed.manifests,
            subject=parsed.subject,
            artifact_type=parsed.referrer_type,
            diff_ids=diff_ids,
            build_time=build_time,
            platform=platform,
            create_time=datetime.now(UTC),
        )

    async def _record(self, manifest: Manifest, tag: str | None) -> Manifest:
        try:
            await self.metadata.put_manifest(manifest, tag)
        except MissingBlobsError as e:
            raise FailedPrecondition(
                Reason.BLOB_NOT_FOUND,
                f"the manifest names blobs the server does not hold: {', '.join(e.digests)}",
                digests=",".join(e.digests),
            ) from e
        except MissingManifestsError as e:
            raise FailedPrecondition(
                Reason.IMAGE_NOT_FOUND,
                f"the index names manifests {manifest.repository} does not hold: "
                f"{', '.join(e.digests)}",
                digests=",".join(e.digests),
            ) from e
        log.info(
            "manifest recorded",
            repository=manifest.repository,
            tag=tag,
            digest=manifest.digest,
            media_type=manifest.media_type,
        )
        return manifest

    async def get_manifest(self, repository: str, reference: str) -> Manifest:
        """A manifest of ``repository`` by tag or by digest."""
        _repository(repository)
        if is_digest(reference) or ":" in reference:
            found = await self.metadata.get_manifest(repository, valid_digest(reference))
        else:
            found = await self.metadata.resolve_tag(repository, _tag(reference))
        if found is None:
            raise NotFound(
                Reason.IMAGE_NOT_FOUND,
                f"manifest {reference} not found in {repository}",
                name=f"{repository}{'@' if ':' in reference else ':'}{reference}",
            )
        return found

    async def list_tags(self, repository: str, limit: int, last: str) -> tuple[list[str], bool]:
        """A page of a repository's tags in lexical order, after ``last``; whether there are
        more."""
        _repository(repository)
        limit = _page_size(limit)
        found = await self.metadata.list_tags(repository, last or None, limit + 1)
        if not found and not last and not await self.metadata.repository_exists(repository):
            raise NotFound(
                Reason.REPOSITORY_NOT_FOUND,
                f"repository {repository} not found",
                name=repository,
            )
        return found[:limit], len(found) > limit

    async def list_repositories(self, limit: int, last: str) -> tuple[list[str], bool]:
        limit = _page_size(limit)
        found = await self.metadata.list_repositories(last or None, limit + 1)
        return found[:limit], len(found) > limit

    async def referrers(
        self, repository: str, digest: str, artifact_type: str = ""
    ) -> list[Manifest]:
        """The manifests of a repository whose subject is ``digest`` (signatures, SBOMs), of
        one artifact type when one is given; the subject need not exist."""
        _repository(repository)
        found = await self.metadata.referrers(repository, valid_digest(digest))
        return [m for m in found if not artifact_type or m.artifact_type == artifact_type]

    async def delete_tag(self, repository: str, tag: str) -> None:
        """Removes a tag; its manifest stays, by digest (the registry protocol's meaning)."""
        _repository(repository)
        if not await self.metadata.delete_tag(repository, _tag(tag)):
            raise NotFound(
                Reason.IMAGE_NOT_FOUND,
                f"tag {repository}:{tag} not found",
                name=f"{repository}:{tag}",
            )
        log.info("tag deleted", repository=repository, tag=tag)

    async def delete_manifest(self, repository: str, digest: str) -> DeleteResult:
        """Removes a manifest and its tags (an index takes its untagged platform manifests
        with it); then the blobs nothing uses any more, once no rollout needs them."""
        _repository(repository)
        try:
            result = await self.metadata.delete_manifest(repository, valid_digest(digest))
        except ManifestInUseError as e:
            raise FailedPrecondition(
                Reason.MANIFEST_IN_USE,
                f"{repository}@{digest} is part of the index {', '.join(e.parents)}: delete "
                "the index first",
                digest=digest,
                parents=",".join(e.parents),
            ) from e
        if result is None:
            raise NotFound(
                Reason.IMAGE_NOT_FOUND,
                f"manifest {digest} not found in {repository}",
                name=f"{repository}@{digest}",
            )
        deleted = await self._delete_orphans(result.orphaned_digests)
        log.info(
            "manifest deleted",
            repository=repository,
            digest=digest,
            tags=result.names,
            manifests=len(result.manifests),
            blobs_deleted=len(deleted),
        )
        return DeleteResult(result.names, result.manifests, deleted)

    # Orphaned blobs

    async def _delete_orphans(self, digests: Sequence[str]) -> list[str]:
        """Deletes the blobs no manifest uses, but not those a rollout in flight still
        fetches: they are remembered and deleted once it is done (collect_deferred)."""
        needed = self.needed_blobs()
        later = sorted(d for d in digests if d in needed)
        if later:
            await self.metadata.defer_blob_deletes(later)
            self._deferred.update(later)
            log.info("blobs kept while rollouts need them", digests=later)
        deleted = []
        for digest in await self.metadata.delete_unused_blobs(
            [d for d in digests if d not in needed]
        ):
            async with self._blob_locks.hold(digest):
                if await self.metadata.get_blob(digest) is not None:
                    continue  # uploaded again meanwhile: keep it
                self.seeder.unseed(digest)
                await self.blobs.delete(digest)
                deleted.append(digest)
        return deleted

    async def collect_deferred(self) -> list[str]:
        """Deletes the deferred blobs that nothing needs now (run when a rollout's host is
        done, and at start-up); a blob a manifest uses again is kept and forgotten."""
        async with self._collecting:
            deferred = await self.metadata.deferred_blob_deletes()
            self._deferred = set(deferred)
            needed = self.needed_blobs()
            ready = [d for d in deferred if d not in needed]
            if not ready:
                return []
            deleted = await self._delete_orphans(ready)
            await self.metadata.forget_blob_deletes(ready)
            self._deferred.difference_update(ready)
            if deleted:
                log.info("deferred blobs deleted", digests=deleted)
            return deleted

    def schedule_collect(self) -> None:
        """Runs collect_deferred soon, when any blob waits for it."""
        if self._deferred and (self._collector is None or self._collector.done()):
            self._collector = asyncio.ensure_future(self._collect_logged())

    async def _collect_logged(self) -> None:
        try:
            await self.collect_deferred()
        except Exception:
            log.exception("cannot delete deferred blobs")

    # Garbage collection

    def _asked(self, digests: Iterable[str]) -> None:
        now = time.time()
        for digest in digests:
            self._asked_for[digest] = now

    async def collect_garbage(
        self, grace: timedelta | None = None, dry_run: bool = False, untagged: bool | None = None
    ) -> Collection:
        """Deletes the blobs no image uses that are older than ``grace`` (default: gc_grace)
        and that no push asked for within it, except those a rollout or pull in flight
        fetches; and blob files with no record (left by a crash between deleting a blob's
        record and its file). With ``dry_run``, deletes nothing and says what it would.

        With ``untagged`` (default: gc_untagged), image manifests that no tag points at and
        no index includes (what a retag leaves), older than the grace and not fetched in
        flight, go first, and with them the blobs only they used (what a retag leaves
        behind would otherwise fill the disk: CI pushes app:latest many times a day).

        A blob's record goes first, in a transaction that checks again that no manifest uses
        it (a manifest put meanwhile keeps it; one put after is refused as naming a blob the
        server does not hold), then its torrent and its file, under the blob's lock (an
        upload of the same bytes meanwhile keeps them)."""
        grace = self.gc_grace if grace is None else grace
        untagged = self.gc_untagged if untagged is None else untagged
        if grace < timedelta(0):
            raise InvalidArgument(
                Reason.INVALID_GRACE_PERIOD,
                f"a negative grace period ({grace.total_seconds():g} s) for garbage collection",
            )
        async with self._collecting:
            now = time.time()
            cutoff = now - grace.total_seconds()
            keep_since = min(cutoff, now - self.gc_grace.total_seconds())
            self._asked_for = {d: t for d, t in self._asked_for.items() if t >= keep_since}
            needed = self.needed_blobs()

            def young(digest: str) -> bool:
                return self._asked_for.get(digest, 0.0) >= cutoff

            manifests: list[tuple[str, str]] = []
            if untagged:
                manifests = await self._collect_untagged(cutoff, needed, dry_run)
            garbage: list[Garbage] = []
            kept = 0
            # A dry run removed no manifest: it asks what their removal would leave unused.
            for blob in await self.metadata.unused_blobs(manifests if dry_run else ()):
                recent = blob.create_time.timestamp() >= cutoff or young(blob.digest)
                if recent or blob.digest in needed:
                    kept += 1
                else:
                    garbage.append(Garbage(blob.digest, blob.size))
            strays = await self._stray_files(cutoff)
            if dry_run:
                collected = garbage + strays
            else:
                deleted = set(
                    await self._delete_orphans([g.digest for g in garbage if not young(g.digest)])
                )
                collected = [g for g in garbage if g.digest in deleted]
                collected += [g for g in strays if await self._delete_stray(g.digest)]
                kept += len(garbage) - len(deleted)
        names = [f"{repository}@{digest}" for repository, digest in manifests]
        result = Collection(collected, dry_run, names, kept)
        log.info(
            "garbage collected" if not dry_run else "garbage found (dry run)",
            manifests=names,
            blobs=len(collected),
            freed_bytes=result.freed_bytes,
            kept=kept,
            grace_seconds=grace.total_seconds(),
            digests=[g.digest for g in collected[:100]],  # the first ones: a log line, not a list
        )
        return result

    async def _collect_untagged(
        self, cutoff: float, needed: set[str], dry_run: bool
    ) -> list[tuple[str, str]]:
        """Removes the untagged image manifests older than ``cutoff`` whose blobs are not
        fetched in flight; their (repository, digest). Their blobs are then unused, and old:
        collected next."""
        removed = []
        for m in await self.metadata.untagged_manifests():
            if m.create_time.timestamp() >= cutoff or needed.intersection(m.blob_digests):
                continue
            if dry_run or (
                await self.metadata.delete_untagged_manifest(m.repository, m.digest) is not None
            ):
                removed.append((m.repository, m.digest))
        if removed and not dry_run:
            log.info("untagged manifests removed", manifests=removed)
        return removed

    async def _stray_files(self, cutoff: float) -> list[Garbage]:
        """Blob files older than ``cutoff`` with no record."""
        old = [f for f in await asyncio.to_thread(self.blobs.stored) if f.modify_time < cutoff]
        present: set[str] = set()
        for i in range(0, len(old), _PRESENT_BATCH):
            batch = [f.digest for f in old[i : i + _PRESENT_BATCH]]
            present |= await self.metadata.present_digests(batch)
        return [Garbage(f.digest, f.size) for f in old if f.digest not in present]

    async def _delete_stray(self, digest: str) -> bool:
        async with self._blob_locks.hold(digest):
            if await self.metadata.get_blob(digest) is not None:
                return False  # uploaded (and recorded) meanwhile
            self.seeder.unseed(digest)
            await self.blobs.delete(digest)
            log.info("blob file without a record deleted", digest=digest)
            return True

    async def collect_periodically(self, interval: timedelta) -> None:
        """Runs collect_garbage every ``interval``, until cancelled."""
        while True:
            await asyncio.sleep(interval.total_seconds())
            try:
                await self.collect_garbage()
            except Exception:
                log.exception("garbage collection failed")

    # Images, as the gRPC API and docketctl show them

    async def put_image(self, name: str, config: Descriptor, layers: Sequence[Descriptor]) -> Image:
        """Records the image under a tag with the OCI manifest Docket writes for it."""
        ref = _reference(name)
        if ref.digest is not None or ref.tag is None:
            raise InvalidArgument(
                Reason.INVALID_REFERENCE,
                f"an image is recorded under a tag, not {name!r}",
                name=name,
            )
        for d in (config, *layers):
            valid_digest(d.digest)
        config = Descriptor(config.digest, config.size, config.media_type or OCI_CONFIG)
        layers = [Descriptor(d.digest, d.size, d.media_type or OCI_LAYER) for d in layers]
        content = oci_manifest(config, layers)
        try:
            parsed = parse_manifest(content)
        except ManifestError as e:
            raise InvalidArgument(Reason.INVALID_IMAGE, str(e), name=name) from e
        await self._read_config(config)  # a missing config is BLOB_NOT_FOUND before the rest
        manifest = await self._manifest_of(ref.repository, sha256_digest(content), content, parsed)
        await self._record(manifest, ref.tag)
        return self._image(manifest, ref.tag, [])

    async def get_image(self, name: str) -> Image:
        return (await self._images(name))[0]

    async def _images(self, name: str) -> list[Image]:
        """The images a name means: one for a tag; for a digest, the manifest under each of
        its tags (or once, by digest, when it has none)."""
        ref = _reference(name)
        if ref.digest is not None:
            manifest = await self.metadata.get_manifest(ref.repository, ref.digest)
            tags = await self.metadata.tags_of(ref.repository, ref.digest) if manifest else []
        else:
            manifest = await self.metadata.resolve_tag(ref.repository, ref.tag or "latest")
            tags = [ref.tag or "latest"]
        if manifest is None:
            raise NotFound(Reason.IMAGE_NOT_FOUND, f"image {ref.name} not found", name=ref.name)
        children = await self._children(manifest)
        return [self._image(manifest, tag, children) for tag in tags or [""]]

    async def _children(self, manifest: Manifest) -> list[Manifest]:
        if not manifest.children:
            return []
        found = {
            m.digest: m
            for m in await self.metadata.get_manifests(
                manifest.repository, [c.digest for c in manifest.children]
            )
        }
        return [found[c.digest] for c in manifest.children if c.digest in found]

    def _image(
        self,
        manifest: Manifest,
        tag: str,
        children: Sequence[Manifest] = (),
        platform: str = "",
    ) -> Image:
        """The image view of a manifest: an index's children are images named by digest,
        with the platform the index gives them."""
        platforms = {c.digest: str(c.platform or "") for c in manifest.children}
        return Image(
            repository=manifest.repository,
            tag=tag,
            config=manifest.config,
            layers=manifest.layers,
            diff_ids=manifest.diff_ids,
            build_time=manifest.build_time,
            create_time=manifest.create_time,
            platform=platform or manifest.platform,
            digest=manifest.digest,
            media_type=manifest.media_type,
            artifact_type=manifest.artifact_type,
            manifests=tuple(
                self._image(child, "", platform=platforms.get(child.digest, ""))
                for child in children
            ),
        )

    async def list_images(self, page_size: int, page_token: str) -> tuple[list[Image], str]:
        if page_size < 0:
            raise InvalidArgument(Reason.INVALID_PAGE_TOKEN, f"negative page_size {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token) if page_token else None
        found = await self.metadata.list_tagged(after, size + 1)
        page = [
            self._image(t.manifest, t.tag, await self._children(t.manifest)) for t in found[:size]
        ]
        next_token = _encode_token(page[-1]) if len(found) > size else ""
        return page, next_token

    async def delete_image(self, name: str) -> tuple[list[str], list[str]]:
        """`docketctl rm`: a tag goes, and its manifest with it when no other tag names it (and
        no index includes it); a digest takes the manifest and all its tags. Returns the names
        removed and the blobs deleted."""
        ref = _reference(name)
        if ref.digest is None:
            tag = ref.tag or "latest"
            manifest = await self.metadata.resolve_tag(ref.repository, tag)
            if manifest is None:
                raise NotFound(Reason.IMAGE_NOT_FOUND, f"image {ref.name} not found", name=ref.name)
            others = await self.metadata.tags_of(ref.repository, manifest.digest)
            if others != [tag]:
                await self.delete_tag(ref.repository, tag)
                return [ref.name], []
            try:
                result = await self.delete_manifest(ref.repository, manifest.digest)
            except FailedPrecondition:  # part of an index: only the name goes
                await self.delete_tag(ref.repository, tag)
                return [ref.name], []
            return result.names, result.orphaned_digests
        try:
            result = await self.delete_manifest(ref.repository, ref.digest)
        except NotFound:
            raise NotFound(
                Reason.IMAGE_NOT_FOUND, f"image {ref.name} not found", name=ref.name
            ) from None
        return result.names or [ref.name], result.orphaned_digests

    async def _read_config(self, config: Descriptor) -> dict[str, object]:
        blob = await self.metadata.get_blob(config.digest)
        if blob is None:
            raise FailedPrecondition(
                Reason.BLOB_NOT_FOUND,
                f"config blob {config.digest} has not been uploaded",
                digests=config.digest,
            )
        if blob.size > MAX_CONFIG_BYTES:
            raise InvalidArgument(
                Reason.INVALID_IMAGE,
                f"config blob {config.digest} is {blob.size} bytes, over {MAX_CONFIG_BYTES}",
                config=config.digest,
            )
        data = b"".join([c async for c in self.blobs.read(config.digest)])
        try:
            parsed = json.loads(data)
        except ValueError as e:
            raise InvalidArgument(
                Reason.INVALID_IMAGE,
                f"config blob {config.digest} is not JSON: {e}",
                config=config.digest,
            ) from e
        if not isinstance(parsed, dict):
            raise InvalidArgument(
                Reason.INVALID_IMAGE,
                f"config blob {config.digest} is not a JSON object",
                config=config.digest,
            )
        return parsed

    async def _check_blob_sizes(self, descriptors: Sequence[Descriptor]) -> None:
        present = {}
        for d in descriptors:
            blob = await self.metadata.get_blob(d.digest)
            if blob is None:
                continue  # named in the error the store raises, with every other one missing
            present[d.digest] = blob
            if blob.size != d.size:
                raise InvalidArgument(
                    Reason.SIZE_MISMATCH,
                    f"blob {d.digest} is {blob.size} bytes, not {d.size}",
                    digest=d.digest,
                    expected=blob.size,
                    actual=d.size,
                )
        missing = [d.digest for d in descriptors if d.digest not in present]
        if missing:
            raise FailedPrecondition(
                Reason.BLOB_NOT_FOUND,
                f"the manifest names blobs the server does not hold: "
                f"{', '.join(dict.fromkeys(missing))}",
                digests=",".join(dict.fromkeys(missing)),
            )


def _read_pieces(path: Path, length: int, pieces: list[int]) -> list[bytes]:
    """Pieces of a blob file, each run of consecutive pieces in one read (claims hand out
    runs): one thread hop for a claim, not three for every piece."""
    out: list[bytes] = []
    with path.open("rb", buffering=0) as fh:
        i = 0
        while i < len(pieces):
            j = i
            while j + 1 < len(pieces) and pieces[j + 1] == pieces[j] + 1:
                j += 1
            data = os.pread(fh.fileno(), (j - i + 1) * length, pieces[i] * length)
            out += [data[k * length : (k + 1) * length] for k in range(j - i + 1)]
            i = j + 1
    return out


async def write_chunks(writer: BlobWriter, chunks: AsyncIterator[bytes]) -> None:
    """Writes chunks as they come: chunk n is hashed and written (in threads) while chunk
    n + 1 arrives. On an error the chunk in hand is let finish (its thread would run on
    anyway); the caller aborts the writer."""
    writing: asyncio.Future[None] | None = None
    try:
        async for chunk in chunks:
            if writing is not None:
                await writing
            writing = asyncio.ensure_future(writer.write(chunk))
        if writing is not None:
            await writing
    except BaseException:
        if writing is not None and not writing.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(writing)
        raise


def _repository(name: str) -> str:
    if not is_repository(name):
        raise InvalidArgument(
            Reason.INVALID_REFERENCE,
            f"invalid repository name {name!r}: lowercase letters, digits and separators "
            "(. _ - /), like 'perl' or 'team/app'",
            name=name,
            part="repository",
        )
    return name


def _tag(tag: str) -> str:
    if not is_tag(tag):
        raise InvalidArgument(
            Reason.INVALID_REFERENCE,
            f"invalid tag {tag!r}: 1-128 of [A-Za-z0-9_.-], not starting with . or -",
            name=tag,
            part="tag",
        )
    return tag


def _page_size(limit: int) -> int:
    if limit < 0:
        raise InvalidArgument(Reason.INVALID_PAGE_TOKEN, f"negative page size {limit}")
    return min(limit or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def valid_digest(value: str) -> str:
    """``value`` when it is a well-formed digest; else INVALID_ARGUMENT (INVALID_DIGEST)."""
    try:
        return check_digest(value)
    except InvalidDigestError as e:
        raise InvalidArgument(Reason.INVALID_DIGEST, str(e), digest=value) from e


def _reference(name: str) -> Reference:
    try:
        return parse_reference(name)
    except InvalidReferenceError as e:
        raise InvalidArgument(Reason.INVALID_REFERENCE, str(e), name=name) from e


def _encode_token(image: Image) -> str:
    return base64.urlsafe_b64encode(json.dumps([image.repository, image.tag]).encode()).decode()


def _decode_token(token: str) -> tuple[str, str]:
    try:
        repository, tag = json.loads(base64.urlsafe_b64decode(token.encode()))
        return str(repository), str(tag)
    except (ValueError, TypeError, binascii.Error) as e:
        raise InvalidArgument(
            Reason.INVALID_PAGE_TOKEN, "page_token is not one ListImages returned"
        ) from e
