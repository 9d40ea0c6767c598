"""`docketctl push`: an image from the local Docker engine or a `docker save` archive.

The CLI asks the server which blobs it lacks, uploads only those (streamed in 1 MiB chunks,
a few at a time), then records the image. Nothing is held in memory whole. An image from the
engine is exported to a temporary archive, and each blob the server lacks is uploaded from it
while the export is still writing it (engine_export.py); the finished archive is then checked
as a whole, anything not yet uploaded goes up, and the image is recorded.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from collections.abc import AsyncIterator, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import click
import grpc

from docket_cli.client import Connection, server_error
from docket_cli.command import output_option, with_connection
from docket_cli.engine_export import (
    PIPE_MIN_BYTES,
    ExportError,
    GrowingSpool,
    MemberPipe,
    SpooledMember,
    export_to_spool,
)
from docket_cli.progress import PushProgress
from docket_cli.render import human_size, image_json, print_json
from docket_common.archive import ArchiveBlob, ArchiveImage, ImageArchive
from docket_common.errors import Reason, error_info
from docket_common.pb import image_pb2
from docket_common.pb import image_service_pb2 as pb
from docket_common.reference import Reference, parse_tagged

CHUNK = 1024 * 1024
PARALLEL_UPLOADS = 3


class PushError(Exception):
    """A push that cannot go on; str() is the one line to show."""


class Progress(Protocol):
    def plan(self, uploads: list[ArchiveBlob], present: list[ArchiveBlob]) -> None: ...

    def streaming(self, blob: ArchiveBlob) -> None: ...

    def advance(self, blob: ArchiveBlob, nbytes: int) -> None: ...

    def done(self, blob: ArchiveBlob, already_existed: bool) -> None: ...


@dataclass
class PushResult:
    image: image_pb2.Image
    uploaded: list[ArchiveBlob]
    present: list[ArchiveBlob]
    streamed: set[str] = field(default_factory=set)  # uploaded while the engine exported


async def push_from_engine(
    conn: Connection, ref: str, target: Reference, spool_path: Path, progress: PushProgress
) -> PushResult:
    """Exports REF from the engine at DOCKER_HOST into ``spool_path`` and pushes it, uploading
    blobs the server lacks while the export runs.

    Raises PushError when the engine is unreachable, lacks the image or fails the export.
    """
    import docker  # imported here: `docketctl images` should not pay for it
    from docker.errors import DockerException, ImageNotFound

    try:
        client = docker.from_env()
    except DockerException as e:
        raise PushError(f"cannot reach the Docker engine (DOCKER_HOST): {e}") from e
    try:
        try:
            image = await asyncio.to_thread(client.images.get, ref)
        except ImageNotFound as e:
            raise PushError(f"image {ref} not found in the local Docker engine") from e
        progress.exporting(int(image.attrs.get("Size") or 0))
        # What the export holds under these names: the config (the image id) and the
        # uncompressed layers (the diff ids). Only those are uploaded before the archive is
        # complete: nothing the image does not use reaches the server.
        layers = list(image.attrs.get("RootFS", {}).get("Layers", []))
        missing = await _missing(conn, [image.id, *layers])
        # A legacy layer's digest is known only once it is read: stream those only when the
        # server lacks every layer, so that none is sent for nothing.
        spool = GrowingSpool(spool_path)
        streamer = _Streamer(conn, progress, spool, missing, unnamed=missing.issuperset(layers))

        def export() -> int:
            chunks = client.api.get_image(ref, chunk_size=CHUNK)
            return export_to_spool(chunks, spool, streamer.offer, progress.exported)

        try:
            size = await asyncio.to_thread(export)
        except (DockerException, ExportError, OSError) as e:
            await streamer.abandon()
            raise PushError(f"docker save {ref} failed: {e}") from e
        progress.export_done(size)
        streamed = await streamer.finish()
    finally:
        client.close()
    with ImageArchive(spool_path) as archive:
        return await push_archive(
            conn, archive, pick_image(archive, target), target, progress, streamed
        )


async def _missing(conn: Connection, digests: list[str]) -> set[str]:
    try:
        response = await conn.images.StatBlobs(
            pb.StatBlobsRequest(digests=digests), metadata=conn.metadata
        )
    except grpc.aio.AioRpcError as e:
        raise server_error(e, conn.target) from e
    return set(response.missing_digests)


class _Streamer:
    """Uploads the blobs the server lacks from the spool while the export writes them; with
    ``unnamed``, also the legacy layers, which the server names after their bytes."""

    def __init__(
        self,
        conn: Connection,
        progress: Progress,
        spool: GrowingSpool,
        missing: set[str],
        *,
        unnamed: bool,
    ) -> None:
        self.conn = conn
        self.progress = progress
        self.spool = spool
        self.missing = missing
        self.unnamed = unnamed
        self.loop = asyncio.get_running_loop()
        self.slots = asyncio.Semaphore(PARALLEL_UPLOADS)
        self.offered: set[str] = set()  # touched on the export's thread only
        self.tasks: dict[str, asyncio.Task[str]] = {}

    def offer(self, member: SpooledMember) -> MemberPipe | None:
        """On the export's thread, for each blob member: starts its upload if the server
        lacks it; the pipe its bytes should go to, for a big one."""
        key = member.digest or f"layer@{member.offset}"
        wanted = member.digest in self.missing or (not member.digest and self.unnamed)
        if not wanted or key in self.offered:
            return None
        self.offered.add(key)
        pipe = MemberPipe() if member.size >= PIPE_MIN_BYTES else None
        self.loop.call_soon_threadsafe(self._start, member, key, pipe)
        return pipe

    def _start(self, member: SpooledMember, key: str, pipe: MemberPipe | None) -> None:
        self.tasks[key] = asyncio.create_task(self._upload(member, key, pipe))

    async def _upload(self, member: SpooledMember, key: str, pipe: MemberPipe | None) -> str:
        blob = ArchiveBlob(key, member.size, "", "")
        try:
            async with self.slots:
                self.progress.streaming(blob)
                try:
                    response = await upload_blob(
                        self.conn,
                        _spooled_requests(self.spool, member, pipe, blob, self.progress),
                        member.digest,
                        member.size,
                    )
                except grpc.aio.AioRpcError as e:
                    raise server_error(e, self.conn.target) from e
                self.progress.done(blob, response.already_existed)
                return str(response.digest)
        finally:
            if pipe is not None:
                pipe.abandon()  # the export must not wait for an upload that ended

    async def finish(self) -> set[str]:
        """Waits for the uploads; the digests uploaded. The first failure is raised."""
        return {await task for task in self.tasks.values()}

    async def abandon(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def _spooled_requests(
    spool: GrowingSpool,
    member: SpooledMember,
    pipe: MemberPipe | None,
    blob: ArchiveBlob,
    progress: Progress,
) -> AsyncIterator[pb.UploadBlobRequest]:
    """The upload of a member, from the spool or (past what was in the spool when it was
    found) its pipe. Without a digest, the server names the blob after its bytes; the image
    is recorded only if that is the layer its manifest names."""
    yield pb.UploadBlobRequest(
        header=pb.UploadBlobHeader(digest=member.digest, size_bytes=member.size)
    )
    chunks: Iterator[bytes] = spool.read(member.offset, member.size)
    if pipe is not None:
        chunks = itertools.chain(spool.read(member.offset, member.in_file), iter(pipe.get, None))
    while chunk := await asyncio.to_thread(next, chunks, b""):
        progress.advance(blob, len(chunk))
        yield pb.UploadBlobRequest(chunk=chunk)


def pick_image(archive: ImageArchive, ref: Reference) -> ArchiveImage:
    """The archive's only image (pushed under REF whatever it was tagged), or the one tagged REF."""
    if len(archive.images) == 1:
        return archive.images[0]
    return archive.find(ref.name)


async def push_archive(
    conn: Connection,
    archive: ImageArchive,
    image: ArchiveImage,
    ref: Reference,
    progress: Progress,
    streamed: AbstractSet[str] = frozenset(),
) -> PushResult:
    """Uploads the image's blobs the server lacks and records the image. ``streamed``: blobs
    this push already uploaded (while exporting), reported as uploaded."""
    blobs = list({b.digest: b for b in (image.config, *image.layers)}.values())
    for attempt in (1, 2):
        try:
            missing = set(
                (
                    await conn.images.StatBlobs(
                        pb.StatBlobsRequest(digests=[b.digest for b in blobs]),
                        metadata=conn.metadata,
                    )
                ).missing_digests
            )
            uploads = [b for b in blobs if b.digest in missing]
            present = [b for b in blobs if b.digest not in missing and b.digest not in streamed]
            progress.plan(uploads, present)
            await _upload_all(conn, archive, uploads, progress)
            uploads += [b for b in blobs if b.digest in streamed and b.digest not in missing]
            response = await conn.images.PutImage(
                pb.PutImageRequest(
                    name=ref.name,
                    config=_descriptor(image.config),
                    layers=[_descriptor(layer) for layer in image.layers],
                ),
                metadata=conn.metadata,
            )
            return PushResult(response.image, uploads, present, set(streamed))
        except grpc.aio.AioRpcError as e:
            err = server_error(e, conn.target)
            # A blob the server had when asked was deleted (by `rm`) before the image was
            # recorded: ask again and upload it.
            if err.reason == Reason.BLOB_NOT_FOUND and attempt == 1:
                continue
            raise err from e
    raise AssertionError("unreachable")


async def _upload_all(
    conn: Connection, archive: ImageArchive, uploads: list[ArchiveBlob], progress: Progress
) -> None:
    slots = asyncio.Semaphore(PARALLEL_UPLOADS)

    async def upload(blob: ArchiveBlob) -> None:
        async with slots:
            response = await upload_blob(
                conn, _requests(archive, blob, progress), blob.digest, blob.size
            )
            progress.done(blob, response.already_existed)

    try:
        async with asyncio.TaskGroup() as group:
            for blob in uploads:
                group.create_task(upload(blob))
    except ExceptionGroup as eg:
        # Report the first failure as itself; the other uploads were cancelled because of it.
        raise eg.exceptions[0] from None


async def upload_blob(
    conn: Connection, requests: AsyncIterator[pb.UploadBlobRequest], digest: str, size: int
) -> pb.UploadBlobResponse:
    """UploadBlob. A server that refuses a blob while its chunks still go out (no room on
    its disk) may be reported by grpc.aio as INTERNAL "Internal error from Core" instead of
    what it said (grpc/grpc#36066): the header alone is then sent again to learn why."""
    try:
        response: pb.UploadBlobResponse = await conn.images.UploadBlob(
            requests, metadata=conn.metadata
        )
        return response
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.INTERNAL or size <= 0:
            raise
        header = pb.UploadBlobRequest(header=pb.UploadBlobHeader(digest=digest, size_bytes=size))
        try:
            await conn.images.UploadBlob(iter([header]), metadata=conn.metadata)
        except grpc.aio.AioRpcError as why:
            reason, _ = error_info(why.trailing_metadata())
            if reason and reason != Reason.SIZE_MISMATCH:  # not just "no bytes came"
                raise why from e
        raise


async def _requests(
    archive: ImageArchive, blob: ArchiveBlob, progress: Progress
) -> AsyncIterator[pb.UploadBlobRequest]:
    yield pb.UploadBlobRequest(header=pb.UploadBlobHeader(digest=blob.digest, size_bytes=blob.size))
    reader = archive.open_blob(blob)  # each reader reads at its own offsets: safe in threads
    try:
        while chunk := await asyncio.to_thread(reader.read, CHUNK):
            progress.advance(blob, len(chunk))
            yield pb.UploadBlobRequest(chunk=chunk)
    finally:
        reader.close()


def _descriptor(blob: ArchiveBlob) -> image_pb2.Descriptor:
    return image_pb2.Descriptor(
        digest=blob.digest, size_bytes=blob.size, media_type=blob.media_type
    )


def spool_dir() -> tempfile.TemporaryDirectory[str]:
    """Where an image exported from the engine waits to be uploaded ($TMPDIR)."""
    return tempfile.TemporaryDirectory(prefix="docketctl-push-")


@click.command("push")
@click.argument("ref")
@click.option(
    "--archive",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Push from a `docker save` tarball instead of the local Docker engine.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress, only the result.")
@output_option
def push_cmd(ref: str, archive: Path | None, quiet: bool, output: str) -> None:
    """Push an image to the server, uploading only the layers it lacks.

    \b
    From the Docker engine at $DOCKER_HOST (default: the local socket):
      docketctl push perl:5.40
    From a `docker save` tarball (legacy or OCI layout):
      docketctl push perl:5.40 --archive perl.tar
    The archive's image is pushed as REF; an archive with several images must hold REF.
    """
    target = parse_tagged(ref)
    with PushProgress(ref, quiet=quiet or output == "json") as progress, spool_dir() as tmp:
        result = _push(ref, archive, target, Path(tmp) / "image.tar", progress)
    _report(result, output)


@with_connection
async def _push(
    conn: Connection,
    ref: str,
    archive: Path | None,
    target: Reference,
    spool: Path,
    progress: PushProgress,
) -> PushResult:
    if archive is None:
        return await push_from_engine(conn, ref, target, spool, progress)
    with ImageArchive(archive) as opened:
        return await push_archive(conn, opened, pick_image(opened, target), target, progress)


def _report(result: PushResult, output: str) -> None:
    uploaded = sum(b.size for b in result.uploaded)
    reused = sum(b.size for b in result.present)
    if output == "json":
        print_json(
            {
                "image": image_json(result.image),
                "uploaded_digests": [b.digest for b in result.uploaded],
                "uploaded_bytes": uploaded,
                "streamed_digests": [
                    b.digest for b in result.uploaded if b.digest in result.streamed
                ],
                "reused_digests": [b.digest for b in result.present],
                "reused_bytes": reused,
            }
        )
        return
    click.echo(
        f"Pushed {result.image.name} {result.image.digest}: "
        f"{len(result.uploaded)} blobs uploaded ({human_size(uploaded)}), "
        f"{len(result.present)} already on the server ({human_size(reused)})"
    )
