"""Blob uploads of the registry protocol: started, sent in one or more chunks, committed.

An upload lives in the server's memory, with its bytes in a temporary file that is hashed as
it is written; committing checks the digest, as a gRPC upload does, and only then does the
blob appear under its name and get its torrent. A chunk that does not continue the upload
where it stands is refused and changes nothing; a chunk that breaks off (the client went
away, or sent fewer or more bytes than it said) ends the upload and drops its bytes, so no
half-known state is kept: the client starts again. After a server restart every upload is
unknown (the temporary files are removed at start-up). An upload that would eat into the
blob store's reserve of free disk is refused (INSUFFICIENT_STORAGE) and ended the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from docket_common.errors import Reason
from docket_server.domain.errors import InvalidArgument, NotFound, ResourceExhausted
from docket_server.domain.registry import Registry, UploadResult, valid_digest, write_chunks
from docket_server.store.blobs import BlobWriter

log = structlog.get_logger()

MAX_UPLOADS = 1000
IDLE_TIMEOUT = 3600.0  # seconds an upload may sit without a request before it is dropped


@dataclass
class Upload:
    id: str
    repository: str
    last_time: float = field(default_factory=time.monotonic)
    writer: BlobWriter | None = None  # made with the first bytes, when their size is known
    busy: bool = False

    @property
    def offset(self) -> int:
        return self.writer.written if self.writer is not None else 0


class Uploads:
    def __init__(
        self, registry: Registry, max_uploads: int = MAX_UPLOADS, idle_timeout: float = IDLE_TIMEOUT
    ) -> None:
        self.registry = registry
        self.max_uploads = max_uploads
        self.idle_timeout = idle_timeout
        self._uploads: dict[str, Upload] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def start_sweeping(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="upload-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for upload in list(self._uploads.values()):
            self._drop(upload)

    def start(self, repository: str) -> Upload:
        if len(self._uploads) >= self.max_uploads:
            raise ResourceExhausted(
                Reason.TOO_MANY_UPLOADS,
                f"{len(self._uploads)} uploads are open, the most the server takes: finish or "
                "cancel some, or try again later",
                open_uploads=len(self._uploads),
            )
        upload = Upload(uuid.uuid4().hex, repository)
        self._uploads[upload.id] = upload
        return upload

    def get(self, repository: str, upload_id: str) -> Upload:
        upload = self._uploads.get(upload_id)
        if upload is None or upload.repository != repository:
            raise NotFound(
                Reason.UPLOAD_NOT_FOUND,
                f"upload {upload_id} is not known (finished, cancelled, broken off, expired, "
                "or the server restarted): start again",
                upload=upload_id,
            )
        upload.last_time = time.monotonic()
        return upload

    async def append(
        self,
        upload: Upload,
        chunks: AsyncIterator[bytes],
        *,
        start: int | None = None,
        length: int | None = None,
    ) -> None:
        """Appends a chunk. ``start``, when the client names one, must be where the upload
        stands; ``length``, when known, is how many bytes the chunk must have."""
        self._claim(upload, start)
        try:
            await self._write(upload, chunks, length)
        finally:
            upload.busy = False
            upload.last_time = time.monotonic()

    async def finish(
        self, upload: Upload, digest: str, chunks: AsyncIterator[bytes], length: int | None = None
    ) -> UploadResult:
        """Writes the last chunk (maybe empty) and commits the blob under ``digest``; the
        upload is over either way."""
        try:
            valid_digest(digest)
        except InvalidArgument:
            self._drop(upload)
            raise
        self._claim(upload, None)
        try:
            await self._write(upload, chunks, length)
            writer = self._writer(upload, 0)
            self._uploads.pop(upload.id, None)
            return await self.registry.commit_blob(writer, digest)
        finally:
            self._drop(upload)

    def cancel(self, upload: Upload) -> None:
        self._drop(upload)
        log.info("upload cancelled", upload=upload.id, repository=upload.repository)

    def _claim(self, upload: Upload, start: int | None) -> None:
        if upload.busy:
            raise InvalidArgument(
                Reason.INVALID_UPLOAD,
                f"another request is writing to upload {upload.id}: chunks go one at a time",
                upload=upload.id,
            )
        if start is not None and start != upload.offset:
            raise InvalidArgument(
                Reason.INVALID_RANGE,
                f"the chunk starts at byte {start} but upload {upload.id} stands at "
                f"{upload.offset}: chunks go in order, without gaps or overlaps",
                upload=upload.id,
                offset_bytes=upload.offset,
            )
        upload.busy = True

    def _writer(self, upload: Upload, hint: int) -> BlobWriter:
        if upload.writer is None:
            upload.writer = self.registry.blobs.writer("", -1, hint)
        return upload.writer

    async def _write(
        self, upload: Upload, chunks: AsyncIterator[bytes], length: int | None
    ) -> None:
        before = upload.offset
        try:
            writer = self._writer(upload, length or 0)
            if length and before:  # a chunk of known length: refused up front if too big
                self.registry.blobs.check_space(length, written=before)
            await write_chunks(writer, chunks)
            _check_length(upload, length, writer.written - before)
        except BaseException as e:
            # Broken off: what the chunk left in the file cannot be told apart from what it
            # should have been, so the upload ends here.
            self._drop(upload)
            log.info(
                "upload broken off", upload=upload.id, repository=upload.repository, error=repr(e)
            )
            raise

    def _drop(self, upload: Upload) -> None:
        self._uploads.pop(upload.id, None)
        if upload.writer is not None:
            upload.writer.abort()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.idle_timeout / 2))
            now = time.monotonic()
            for upload in list(self._uploads.values()):
                if not upload.busy and now - upload.last_time > self.idle_timeout:
                    log.info("upload expired", upload=upload.id, repository=upload.repository)
                    self._drop(upload)


def _check_length(upload: Upload, length: int | None, sent: int) -> None:
    if length is not None and sent != length:
        raise InvalidArgument(
            Reason.INVALID_UPLOAD,
            f"the chunk was to be {length} bytes but {sent} came",
            upload=upload.id,
            expected=length,
            actual=sent,
        )
