"""docket.v1.RolloutService: decode, call the rollouts, encode."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from docket_common.errors import Reason
from docket_common.pb import rollout_pb2
from docket_common.pb import rollout_service_pb2 as pb
from docket_common.pb import rollout_service_pb2_grpc as pb_grpc
from docket_server.api.convert import rollout_event_to_pb, rollout_record_to_pb, rollout_to_pb
from docket_server.domain.errors import InvalidArgument
from docket_server.domain.rollouts import Rollouts

# grpcio ships no types: a servicer context is grpc.aio.ServicerContext.
Context = Any
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# The most bytes of events in one batched WatchRolloutResponse: about 350 host changes, so
# a round of 10,000 hosts' changes is some 30 messages, not 10,000 (a message costs the
# server far more than its bytes), while no one message holds up the stream (HTTP/2's first
# window is 64 KiB too). A single larger event (a snapshot of hundreds of hosts) goes alone.
MAX_WATCH_BATCH_BYTES = 64 * 1024


class RolloutService(pb_grpc.RolloutServiceServicer):
    def __init__(self, rollouts: Rollouts) -> None:
        self.rollouts = rollouts

    async def CreateRollout(
        self, request: pb.CreateRolloutRequest, context: Context
    ) -> pb.CreateRolloutResponse:
        timeout = request.timeout.ToTimedelta() if request.HasField("timeout") else None
        rollout = await self.rollouts.create(
            request.image_name,
            request.selector,
            prefetch_only=request.prefetch_only,
            canary=request.canary,
            max_parallel=request.max_parallel,
            max_failures=request.max_failures,
            time_limit=timeout or None,
        )
        return pb.CreateRolloutResponse(rollout=rollout_to_pb(rollout))

    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: Context
    ) -> pb.GetRolloutResponse:
        return pb.GetRolloutResponse(rollout=rollout_to_pb(await self.rollouts.get(request.id)))

    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: Context
    ) -> pb.ListRolloutsResponse:
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        try:
            offset = int(request.page_token or "0")
        except ValueError:
            offset = -1
        if offset < 0:
            raise InvalidArgument(
                Reason.INVALID_PAGE_TOKEN, "page_token is not one ListRollouts returned"
            )
        found = await self.rollouts.page(offset, size + 1)
        token = str(offset + size) if len(found) > size else ""
        return pb.ListRolloutsResponse(
            rollouts=[rollout_to_pb(r) for r in found[:size]], next_page_token=token
        )

    async def CancelRollout(
        self, request: pb.CancelRolloutRequest, context: Context
    ) -> pb.CancelRolloutResponse:
        return pb.CancelRolloutResponse(
            rollout=rollout_to_pb(await self.rollouts.cancel(request.id))
        )

    async def ListRolloutRecords(
        self, request: pb.ListRolloutRecordsRequest, context: Context
    ) -> pb.ListRolloutRecordsResponse:
        records = await self.rollouts.records(request.id)
        return pb.ListRolloutRecordsResponse(records=[rollout_record_to_pb(r) for r in records])

    async def WatchRollout(
        self, request: pb.WatchRolloutRequest, context: Context
    ) -> AsyncIterator[pb.WatchRolloutResponse]:
        async for events in self.rollouts.watch(request.id):
            # Encoded as they are sent: a host that changed meanwhile goes as it is now.
            encoded = (rollout_event_to_pb(e) for e in events)
            if request.batched:
                for batch in batches(encoded, MAX_WATCH_BATCH_BYTES):
                    yield pb.WatchRolloutResponse(events=batch)
            else:
                for event in encoded:
                    yield pb.WatchRolloutResponse(event=event)


def batches(
    events: Iterable[rollout_pb2.RolloutEvent], max_bytes: int
) -> Iterator[list[rollout_pb2.RolloutEvent]]:
    """The events, in order, in lists whose WatchRolloutResponse is at most ``max_bytes``
    encoded; an event larger than that alone. Takes from ``events`` only as it fills a
    list (and one event beyond, to know it is full), so events are encoded as they go out."""
    batch: list[rollout_pb2.RolloutEvent] = []
    size = 0
    for event in events:
        length = event.ByteSize()
        # As a repeated field: a one-byte tag, the length as a varint, the message.
        field = 1 + _varint_size(length) + length
        if batch and size + field > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(event)
        size += field
    if batch:
        yield batch


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)
