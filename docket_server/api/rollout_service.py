"""docket.v1.RolloutService: decode, call the rollouts, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from docket_common.pb import rollout_service_pb2 as pb
from docket_common.pb import rollout_service_pb2_grpc as pb_grpc
from docket_server.api.convert import rollout_event_to_pb, rollout_to_pb
from docket_server.domain.rollouts import Rollouts

# grpcio ships no types: a servicer context is grpc.aio.ServicerContext.
Context = Any


class RolloutService(pb_grpc.RolloutServiceServicer):
    def __init__(self, rollouts: Rollouts) -> None:
        self.rollouts = rollouts

    async def CreateRollout(
        self, request: pb.CreateRolloutRequest, context: Context
    ) -> pb.CreateRolloutResponse:
        rollout = await self.rollouts.create(
            request.image_name, request.selector, request.prefetch_only
        )
        return pb.CreateRolloutResponse(rollout=rollout_to_pb(rollout))

    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: Context
    ) -> pb.GetRolloutResponse:
        return pb.GetRolloutResponse(rollout=rollout_to_pb(self.rollouts.get(request.id)))

    async def WatchRollout(
        self, request: pb.WatchRolloutRequest, context: Context
    ) -> AsyncIterator[pb.WatchRolloutResponse]:
        async for event in self.rollouts.watch(request.id):
            yield pb.WatchRolloutResponse(event=rollout_event_to_pb(event))
