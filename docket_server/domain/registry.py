"""The registry: blobs in, images recorded over them, blobs out, torrents seeded.

Takes and returns the dataclasses of domain.models; raises the errors of domain.errors.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from docket_common.digest import InvalidDigestError, check_digest
from docket_common.errors import Reason
from docket_common.reference import InvalidReferenceError, Reference, parse_reference
from docket_common.timefmt import parse_rfc3339
from docket_common.torrent import TorrentInfo, make_torrent, piece_length_for
from docket_server.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from docket_server.domain.models import Blob, Descriptor, Image
from docket_server.store.blobs import BlobStore
from docket_server.store.metadata import MetadataStore, MissingBlobsError

log = structlog.get_logger()

MAX_CONFIG_BYTES = 16 * 1024 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


class BlobSeeder(Protocol):
    """What the registry needs of the BitTorrent side."""

    def seed(self, blob: Blob) -> None: ...

    def unseed(self, digest: str) -> None: ...


@dataclass(frozen=True)
class UploadResult:
    blob: Blob
    already_existed: bool


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
        # Serialises what one process does to one digest: the commit of an upload against the
        # deletion of the same blob.
        self._blob_locks = _KeyedLocks()

    async def reseed_all(self) -> int:
        """Seeds every stored blob again, as after a restart: no hashing up front."""
        count = 0
        for blob in await self.metadata.list_blobs():
            if not self.blobs.exists(blob.digest):
                log.error("blob recorded but missing on disk: not seeded", digest=blob.digest)
                continue
            if blob.torrent is not None:
                self.seeder.seed(blob)
                count += 1
        return count

    # Blobs

    async def stat_blobs(self, digests: Sequence[str]) -> list[str]:
        for d in digests:
            _digest(d)
        present = await self.metadata.present_digests(digests)
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
            _digest(digest)
        if size < 0:
            raise InvalidArgument(
                Reason.SIZE_MISMATCH,
                f"negative size {size} for blob {digest or '(named later)'}",
                digest=digest,
            )
        piece_length = piece_length_for(size)
        writer = self.blobs.writer(digest, size, piece_length)
        writing: asyncio.Future[None] | None = None
        try:
            # Chunk n is hashed and written (in a thread) while chunk n + 1 comes in.
            async for chunk in chunks:
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(writer.write(chunk))
            if writing is not None:
                await writing
            if not digest and named_after is not None:
                digest = named_after()
                digest = _digest(digest) if digest else writer.content_digest()
            async with self._blob_locks.hold(digest):
                pieces = await writer.commit(digest)
                existing = await self.metadata.get_blob(digest)
                if existing is not None:
                    return UploadResult(existing, already_existed=True)
                torrent = (
                    make_torrent(digest, size, piece_length, pieces, self.announce_url)
                    if size > 0
                    else None
                )
                blob = Blob(digest, size, datetime.now(UTC), torrent)
                await self.metadata.add_blob(blob)
        except BaseException:
            if writing is not None and not writing.done():
                # Let the chunk in hand finish (its thread would run on anyway), then drop all.
                with contextlib.suppress(BaseException):
                    await asyncio.shield(writing)
            writer.abort()
            raise
        if torrent is not None:
            self.seeder.seed(blob)
        log.info("blob stored", digest=digest, size_bytes=size, pieces=len(pieces) // 20)
        return UploadResult(blob, already_existed=False)

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
        out: list[bytes] = []
        try:
            for index in pieces:
                chunks = self.blobs.read(torrent.digest, index * length, length)
                out.append(b"".join([chunk async for chunk in chunks]))
        except FileNotFoundError as e:
            raise NotFound(
                Reason.BLOB_NOT_FOUND,
                f"blob {torrent.digest} was deleted",
                digest=torrent.digest,
            ) from e
        return out

    async def get_torrent(self, digest: str) -> TorrentInfo:
        blob = await self._blob(digest)
        if blob.torrent is None:
            raise NotFound(
                Reason.BLOB_NOT_FOUND, f"blob {digest} is empty and has no torrent", digest=digest
            )
        return blob.torrent

    async def _blob(self, digest: str) -> Blob:
        blob = await self.metadata.get_blob(_digest(digest))
        if blob is None:
            raise NotFound(Reason.BLOB_NOT_FOUND, f"blob {digest} not found", digest=digest)
        return blob

    # Images

    async def put_image(self, name: str, config: Descriptor, layers: Sequence[Descriptor]) -> Image:
        ref = _reference(name)
        if ref.digest is not None or ref.tag is None:
            raise InvalidArgument(
                Reason.INVALID_REFERENCE,
                f"an image is recorded under a tag, not {name!r}",
                name=name,
            )
        for d in (config, *layers):
            _digest(d.digest)
        parsed = await self._read_config(config)
        rootfs = parsed.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise InvalidArgument(
                Reason.INVALID_IMAGE,
                f"the config lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'} "
                f"layer diff_ids but the image names {len(layers)} layers",
                config=config.digest,
            )
        image = Image(
            repository=ref.repository,
            tag=ref.tag,
            config=Descriptor(config.digest, config.size, config.media_type or OCI_CONFIG),
            layers=tuple(layers),
            diff_ids=tuple(str(d) for d in diff_ids),
            build_time=parse_rfc3339(parsed.get("created")),
            create_time=datetime.now(UTC),
            platform="/".join(
                str(parsed[k]) for k in ("os", "architecture", "variant") if parsed.get(k)
            ),
        )
        await self._check_sizes(image)
        try:
            await self.metadata.put_image(image)
        except MissingBlobsError as e:
            raise FailedPrecondition(
                Reason.BLOB_NOT_FOUND,
                f"image {image.name} names blobs the server does not hold: {', '.join(e.digests)}",
                digests=",".join(e.digests),
            ) from e
        log.info("image recorded", image=image.name, digest=image.digest, size_bytes=image.size)
        return image

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

    async def _check_sizes(self, image: Image) -> None:
        for d in (image.config, *image.layers):
            blob = await self.metadata.get_blob(d.digest)
            if blob is not None and blob.size != d.size:
                raise InvalidArgument(
                    Reason.SIZE_MISMATCH,
                    f"blob {d.digest} is {blob.size} bytes, not {d.size}",
                    digest=d.digest,
                    expected=blob.size,
                    actual=d.size,
                )

    async def get_image(self, name: str) -> Image:
        return (await self._images(name))[0]

    async def _images(self, name: str) -> list[Image]:
        ref = _reference(name)
        if ref.digest is not None:
            found = await self.metadata.find_images_by_digest(ref.repository, ref.digest)
        else:
            image = await self.metadata.get_image(ref.repository, ref.tag or "latest")
            found = [image] if image else []
        if not found:
            raise NotFound(Reason.IMAGE_NOT_FOUND, f"image {ref.name} not found", name=ref.name)
        return found

    async def list_images(self, page_size: int, page_token: str) -> tuple[list[Image], str]:
        if page_size < 0:
            raise InvalidArgument(Reason.INVALID_PAGE_TOKEN, f"negative page_size {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token) if page_token else None
        found = await self.metadata.list_images(after, size + 1)
        page = found[:size]
        next_token = _encode_token(page[-1]) if len(found) > size else ""
        return page, next_token

    async def delete_image(self, name: str) -> tuple[list[str], list[str]]:
        images = await self._images(name)
        result = await self.metadata.delete_images([(i.repository, i.tag) for i in images])
        for digest in result.orphaned_digests:
            async with self._blob_locks.hold(digest):
                if await self.metadata.get_blob(digest) is not None:
                    continue  # uploaded again meanwhile: keep it
                self.seeder.unseed(digest)
                await self.blobs.delete(digest)
        log.info("image deleted", names=result.names, blobs_deleted=len(result.orphaned_digests))
        return result.names, result.orphaned_digests


def _digest(value: str) -> str:
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
