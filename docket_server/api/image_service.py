"""docket.v1.ImageService: decode, call the registry, encode. Errors map in the interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from docket_common.errors import Reason
from docket_common.pb import image_service_pb2 as pb
from docket_common.pb import image_service_pb2_grpc as pb_grpc
from docket_server.api.convert import descriptor_from_pb, image_to_pb, peer_to_pb, torrent_to_pb
from docket_server.domain.errors import InvalidArgument
from docket_server.domain.orders import PeerRef
from docket_server.domain.registry import Registry

# grpcio ships no types: a servicer context is grpc.aio.ServicerContext.
Context = Any


class ImageService(pb_grpc.ImageServiceServicer):
    def __init__(self, registry: Registry, peers: Callable[[str], list[PeerRef]]) -> None:
        """``peers(digest)`` names where a blob can be fetched: the seed, then agents."""
        self.registry = registry
        self.peers = peers

    async def StatBlobs(
        self, request: pb.StatBlobsRequest, context: Context
    ) -> pb.StatBlobsResponse:
        missing = await self.registry.stat_blobs(list(request.digests))
        return pb.StatBlobsResponse(missing_digests=missing)

    async def UploadBlob(
        self, request_iterator: AsyncIterator[pb.UploadBlobRequest], context: Context
    ) -> pb.UploadBlobResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument(
                Reason.UPLOAD_HEADER_MISSING,
                "an upload must start with a header naming the digest and size",
            )
        header = first.header
        trailer: list[str] = []  # the digest named after the bytes, when the header had none

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if trailer:
                    raise InvalidArgument(
                        Reason.UPLOAD_TRAILER_MISSING,
                        "the trailer must be an upload's last message",
                        digest=trailer[0],
                    )
                kind = message.WhichOneof("content")
                if kind == "header":
                    raise InvalidArgument(
                        Reason.UPLOAD_HEADER_MISSING,
                        "an upload carries one header, first",
                        digest=header.digest,
                    )
                if kind == "trailer":
                    if header.digest:
                        raise InvalidArgument(
                            Reason.UPLOAD_TRAILER_MISSING,
                            "a trailer comes only after a header without a digest",
                            digest=header.digest,
                        )
                    trailer.append(message.trailer.digest)
                    continue
                yield message.chunk

        def digest() -> str:
            return header.digest or (trailer[0] if trailer else "")

        result = await self.registry.upload_blob(header.digest, header.size_bytes, chunks(), digest)
        return pb.UploadBlobResponse(
            digest=result.blob.digest,
            size_bytes=result.blob.size,
            already_existed=result.already_existed,
        )

    async def PutImage(self, request: pb.PutImageRequest, context: Context) -> pb.PutImageResponse:
        image = await self.registry.put_image(
            request.name,
            descriptor_from_pb(request.config),
            [descriptor_from_pb(layer) for layer in request.layers],
        )
        return pb.PutImageResponse(image=image_to_pb(image))

    async def GetImage(self, request: pb.GetImageRequest, context: Context) -> pb.GetImageResponse:
        return pb.GetImageResponse(image=image_to_pb(await self.registry.get_image(request.name)))

    async def GetManifest(
        self, request: pb.GetManifestRequest, context: Context
    ) -> pb.GetManifestResponse:
        manifest = await self.registry.get_manifest(request.repository, request.reference)
        return pb.GetManifestResponse(
            digest=manifest.digest, media_type=manifest.media_type, content=manifest.content
        )

    async def ListTags(self, request: pb.ListTagsRequest, context: Context) -> pb.ListTagsResponse:
        tags, more = await self.registry.list_tags(
            request.repository, request.page_size, request.page_token
        )
        return pb.ListTagsResponse(tags=tags, next_page_token=tags[-1] if more and tags else "")

    async def ListImages(
        self, request: pb.ListImagesRequest, context: Context
    ) -> pb.ListImagesResponse:
        images, token = await self.registry.list_images(request.page_size, request.page_token)
        return pb.ListImagesResponse(images=[image_to_pb(i) for i in images], next_page_token=token)

    async def DeleteImage(
        self, request: pb.DeleteImageRequest, context: Context
    ) -> pb.DeleteImageResponse:
        names, digests = await self.registry.delete_image(request.name)
        return pb.DeleteImageResponse(deleted_names=names, deleted_digests=digests)

    async def ReadBlob(  # an async generator, as grpc.aio allows
        self, request: pb.ReadBlobRequest, context: Context
    ) -> AsyncIterator[pb.ReadBlobResponse]:
        chunks = await self.registry.read_blob(
            request.digest, request.offset_bytes, request.length_bytes
        )
        async for chunk in chunks:
            yield pb.ReadBlobResponse(chunk=chunk)

    async def CollectGarbage(
        self, request: pb.CollectGarbageRequest, context: Context
    ) -> pb.CollectGarbageResponse:
        grace = request.grace_period.ToTimedelta() if request.HasField("grace_period") else None
        result = await self.registry.collect_garbage(
            grace, dry_run=request.dry_run, untagged=request.untagged
        )
        return pb.CollectGarbageResponse(
            blobs=[pb.CollectedBlob(digest=g.digest, size_bytes=g.size) for g in result.blobs],
            freed_bytes=result.freed_bytes,
            dry_run=result.dry_run,
            kept_blobs=result.kept,
            removed_manifests=result.manifests,
        )

    async def GetTorrent(
        self, request: pb.GetTorrentRequest, context: Context
    ) -> pb.GetTorrentResponse:
        torrent = await self.registry.get_torrent(request.digest)
        return pb.GetTorrentResponse(
            torrent=torrent_to_pb(torrent),
            peers=[peer_to_pb(p) for p in self.peers(request.digest)],
        )
