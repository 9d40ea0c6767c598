"""Blob bytes over gRPC: ImageService.ReadBlob (the fallback when BitTorrent stalls) and
AgentService.ClaimFirstPieces (the first copies the server hands out in a rollout)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import grpc

from docket_common.errors import Reason, error_info
from docket_common.fetch import BlobGoneError, FetchError, ReadRange
from docket_common.pb import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
)

# (digest, order id, max bytes) -> [(piece index, bytes)]
ClaimForOrder = Callable[[str, str, int], Awaitable[list[tuple[int, bytes]]]]


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


def grpc_claim_first_pieces(
    stub: agent_service_pb2_grpc.AgentServiceStub, metadata: Sequence[tuple[str, str]] = ()
) -> ClaimForOrder:
    """A ClaimForOrder over AgentService.ClaimFirstPieces."""

    async def claim(digest: str, order_id: str, max_bytes: int) -> list[tuple[int, bytes]]:
        request = agent_service_pb2.ClaimFirstPiecesRequest(
            digest=digest, order_id=order_id, max_bytes=max_bytes
        )
        try:
            response = await stub.ClaimFirstPieces(request, metadata=tuple(metadata), timeout=60)
        except grpc.aio.AioRpcError as e:
            reason, _ = error_info(e.trailing_metadata())
            if reason == Reason.BLOB_NOT_FOUND:
                raise BlobGoneError(f"blob {digest} is gone from the server: {e.details()}") from e
            # Anything else (an order the server no longer knows, a server restarting, one
            # without this call): BitTorrent carries on without first pieces.
            raise FetchError(f"ClaimFirstPieces {digest}: {e.code().name}: {e.details()}") from e
        return [(p.index, p.data) for p in response.pieces]

    return claim
