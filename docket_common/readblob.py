"""Blob bytes over gRPC (ImageService.ReadBlob): the fallback when BitTorrent stalls."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from docket_common.fetch import BlobGoneError, FetchError, ReadRange
from docket_common.pb import image_service_pb2, image_service_pb2_grpc


def grpc_read_range(
    stub: image_service_pb2_grpc.ImageServiceStub, metadata: Sequence[tuple[str, str]] = ()
) -> ReadRange:
    """A ReadRange that fetches ``length`` bytes at ``offset`` of a blob from the server."""

    async def read(digest: str, offset: int, length: int) -> bytes:
        request = image_service_pb2.ReadBlobRequest(
            digest=digest, offset_bytes=offset, length_bytes=length
        )
        try:
            chunks = [r.chunk async for r in stub.ReadBlob(request, metadata=tuple(metadata))]
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise BlobGoneError(f"blob {digest} is gone from the server: {e.details()}") from e
            raise FetchError(f"ReadBlob {digest}: {e.code().name}: {e.details()}") from e
        return b"".join(chunks)

    return read
