"""`docketctl push`: an image from the local Docker engine or a `docker save` archive.

The CLI asks the server which blobs it lacks, uploads only those (streamed in 1 MiB chunks,
a few at a time), then records the image. Nothing is held in memory whole: an image from the
engine is streamed to a temporary archive on disk first.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import click
import grpc

from docket_cli.client import Connection, server_error
from docket_cli.command import output_option, with_connection
from docket_cli.progress import PushProgress
from docket_cli.render import human_size, image_json, print_json
from docket_common.archive import ArchiveBlob, ArchiveImage, ImageArchive
from docket_common.errors import Reason
from docket_common.pb import image_pb2
from docket_common.pb import image_service_pb2 as pb
from docket_common.reference import Reference, parse_tagged

CHUNK = 1024 * 1024
PARALLEL_UPLOADS = 3


class PushError(Exception):
    """A push that cannot go on; str() is the one line to show."""


class Progress(Protocol):
    def plan(self, uploads: list[ArchiveBlob], present: list[ArchiveBlob]) -> None: ...

    def advance(self, blob: ArchiveBlob, nbytes: int) -> None: ...

    def done(self, blob: ArchiveBlob, already_existed: bool) -> None: ...


@dataclass
class PushResult:
    image: image_pb2.Image
    uploaded: list[ArchiveBlob]
    present: list[ArchiveBlob]


def export_from_engine(
    ref: str, dest: Path, on_start: Callable[[int], None], on_bytes: Callable[[int], None]
) -> int:
    """Streams `docker save REF` from the engine at DOCKER_HOST into ``dest``; returns its size.

    ``on_start`` gets the image's size once the engine has it; ``on_bytes`` each chunk's.

    Raises PushError when the engine is unreachable or lacks the image.
    """
    import docker  # imported here: `docketctl images` should not pay for it
    from docker.errors import DockerException, ImageNotFound

    try:
        client = docker.from_env()
    except DockerException as e:
        raise PushError(f"cannot reach the Docker engine (DOCKER_HOST): {e}") from e
    try:
        try:
            image = client.images.get(ref)
        except ImageNotFound as e:
            raise PushError(f"image {ref} not found in the local Docker engine") from e
        on_start(int(image.attrs.get("Size") or 0))
        total = 0
        with dest.open("wb") as out:
            for chunk in client.api.get_image(ref, chunk_size=CHUNK):
                out.write(chunk)
                total += len(chunk)
                on_bytes(len(chunk))
        return total
    except DockerException as e:
        raise PushError(f"docker save {ref} failed: {e}") from e
    finally:
        client.close()


def pick_image(archive: ImageArchive, ref: Reference) -> ArchiveImage:
    """The archive's only image (pushed under REF whatever it was tagged), or the one tagged REF."""
    if len(archive.images) == 1:
        return archive.images[0]
    return archive.find(ref.name)


async def push_archive(
    conn: Connection, archive: ImageArchive, image: ArchiveImage, ref: Reference, progress: Progress
) -> PushResult:
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
            present = [b for b in blobs if b.digest not in missing]
            progress.plan(uploads, present)
            await _upload_all(conn, archive, uploads, progress)
            response = await conn.images.PutImage(
                pb.PutImageRequest(
                    name=ref.name,
                    config=_descriptor(image.config),
                    layers=[_descriptor(layer) for layer in image.layers],
                ),
                metadata=conn.metadata,
            )
            return PushResult(response.image, uploads, present)
        except grpc.aio.AioRpcError as e:
            err = server_error(e, conn.server)
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
            response = await conn.images.UploadBlob(
                _requests(archive, blob, progress), metadata=conn.metadata
            )
            progress.done(blob, response.already_existed)

    try:
        async with asyncio.TaskGroup() as group:
            for blob in uploads:
                group.create_task(upload(blob))
    except ExceptionGroup as eg:
        # Report the first failure as itself; the other uploads were cancelled because of it.
        raise eg.exceptions[0] from None


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
        if archive is None:
            path = Path(tmp) / "image.tar"
            size = export_from_engine(ref, path, progress.exporting, progress.exported)
            progress.export_done(size)
        else:
            path = archive
        result = _push(path, target, progress)
    _report(result, output)


@with_connection
async def _push(conn: Connection, path: Path, ref: Reference, progress: PushProgress) -> PushResult:
    with ImageArchive(path) as archive:
        return await push_archive(conn, archive, pick_image(archive, ref), ref, progress)


def _report(result: PushResult, output: str) -> None:
    uploaded = sum(b.size for b in result.uploaded)
    reused = sum(b.size for b in result.present)
    if output == "json":
        print_json(
            {
                "image": image_json(result.image),
                "uploaded_digests": [b.digest for b in result.uploaded],
                "uploaded_bytes": uploaded,
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
