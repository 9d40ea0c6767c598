"""docket.v1.PullService: decode, call the pulls, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from docket_common.pb import pull_service_pb2 as pb
from docket_common.pb import pull_service_pb2_grpc as pb_grpc
from docket_server.api.convert import pull_to_pb, timestamp
from docket_server.domain.pulls import Pulls

# grpcio ships no types: a servicer context is grpc.aio.ServicerContext.
Context = Any


class PullService(pb_grpc.PullServiceServicer):
    def __init__(self, pulls: Pulls) -> None:
        self.pulls = pulls

    async def ListPulls(
        self, request: pb.ListPullsRequest, context: Context
    ) -> pb.ListPullsResponse:
        found, token = await self.pulls.page(
            request.selector, request.page_size, request.page_token
        )
        return pb.ListPullsResponse(pulls=[pull_to_pb(p) for p in found], next_page_token=token)

    async def WatchPulls(  # an async generator, as grpc.aio allows
        self, request: pb.WatchPullsRequest, context: Context
    ) -> AsyncIterator[pb.WatchPullsResponse]:
        async for event in self.pulls.watch(request.selector):
            message = pb.WatchPullsResponse(event_time=timestamp(event.time))
            if event.snapshot is not None:
                message.snapshot.CopyFrom(
                    pb.PullSnapshot(pulls=[pull_to_pb(p) for p in event.snapshot])
                )
            elif event.pull is not None:
                message.pull.CopyFrom(pull_to_pb(event.pull))
            yield message
