"""docket.v1.AuditService: the audit log, newest first, a page at a time."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from docket_common.errors import Reason
from docket_common.pb import audit_service_pb2 as pb
from docket_common.pb import audit_service_pb2_grpc as pb_grpc
from docket_server.api.convert import timestamp
from docket_server.domain.errors import InvalidArgument
from docket_server.domain.security import Audit

# grpcio ships no types: a servicer context is grpc.aio.ServicerContext.
Context = Any
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class AuditService(pb_grpc.AuditServiceServicer):
    def __init__(self, audit: Audit) -> None:
        self.audit = audit

    async def ListAuditRecords(
        self, request: pb.ListAuditRecordsRequest, context: Context
    ) -> pb.ListAuditRecordsResponse:
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if request.page_size < 0:
            raise InvalidArgument(Reason.INVALID_PAGE_TOKEN, "page_size must not be negative")
        before = 0
        if request.page_token:
            if not request.page_token.isdigit() or len(request.page_token) > 18:
                raise InvalidArgument(
                    Reason.INVALID_PAGE_TOKEN, "page_token is not one ListAuditRecords returned"
                )
            before = int(request.page_token)
        since = (
            request.since_time.ToDatetime(tzinfo=UTC) if request.HasField("since_time") else None
        )
        entries = await self.audit.list(since, before, size + 1)
        page = entries[:size]
        return pb.ListAuditRecordsResponse(
            records=[
                pb.AuditRecord(
                    record_time=timestamp(e.time),
                    actor=e.actor,
                    action=e.action,
                    target=e.target,
                    outcome=e.outcome,
                    peer=e.peer,
                )
                for e in page
            ],
            next_page_token=str(page[-1].id) if len(entries) > size else "",
        )
