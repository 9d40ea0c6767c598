"""Domain dataclasses to and from docket.v1 messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from docket_common.pb import agent_pb2, image_pb2, pull_service_pb2, rollout_pb2
from docket_common.torrent import TorrentInfo
from docket_server.domain.fleet import AgentInfo, AgentRecord, AgentState
from docket_server.domain.models import Blob, Descriptor, Image
from docket_server.domain.orders import (
    BlobProgress,
    OrderPlan,
    PeerRef,
    ProgressReport,
    Task,
    TaskReport,
    TaskState,
)
from docket_server.domain.pulls import Pull
from docket_server.domain.rollouts import Rollout, RolloutEvent, RolloutRecord, RolloutState

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> Timestamp:
    """``value`` as a Timestamp (a naive one taken as UTC, as Timestamp.FromDatetime does),
    by arithmetic rather than through a time tuple: a fifth of the time, and a watch of
    thousands of hosts encodes two or three a host change."""
    since = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
    return Timestamp(seconds=since.days * 86400 + since.seconds, nanos=since.microseconds * 1000)


def descriptor_to_pb(d: Descriptor) -> image_pb2.Descriptor:
    return image_pb2.Descriptor(digest=d.digest, size_bytes=d.size, media_type=d.media_type)


def descriptor_from_pb(d: image_pb2.Descriptor) -> Descriptor:
    return Descriptor(digest=d.digest, size=d.size_bytes, media_type=d.media_type)


def image_to_pb(image: Image) -> image_pb2.Image:
    msg = image_pb2.Image(
        name=image.name,
        repository=image.repository,
        tag=image.tag,
        digest=image.digest,
        layers=[descriptor_to_pb(layer) for layer in image.layers],
        diff_ids=list(image.diff_ids),
        size_bytes=image.size,
        create_time=timestamp(image.create_time),
        platform=image.platform,
        media_type=image.media_type,
        artifact_type=image.artifact_type,
        manifests=[image_to_pb(m) for m in image.manifests],
    )
    if image.config is not None:
        msg.config.CopyFrom(descriptor_to_pb(image.config))
    if image.build_time is not None:
        msg.build_time.CopyFrom(timestamp(image.build_time))
    return msg


def torrent_to_pb(t: TorrentInfo) -> image_pb2.Torrent:
    return image_pb2.Torrent(
        digest=t.digest,
        metainfo=t.metainfo,
        info_hash=t.info_hash,
        piece_length_bytes=t.piece_length,
        piece_count=t.piece_count,
    )


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromTimedelta(timedelta(seconds=seconds))
    return d


_AGENT_STATES = {
    AgentState.ONLINE: agent_pb2.AGENT_STATE_ONLINE,
    AgentState.STALE: agent_pb2.AGENT_STATE_STALE,
    AgentState.OFFLINE: agent_pb2.AGENT_STATE_OFFLINE,
}


def agent_info_from_pb(hello: agent_pb2.Hello) -> AgentInfo:
    return AgentInfo(
        name=hello.name,
        agent_id=hello.agent_id,
        groups=tuple(dict.fromkeys(hello.groups)),
        labels=dict(hello.labels),
        version=hello.version,
        bt_endpoint=hello.bt_endpoint,
        docker_version=hello.docker_version,
        docker_error=hello.docker_error,
        disk_free_bytes=hello.disk_free_bytes,
        cached_digests=tuple(hello.cached_digests),
        platform=hello.platform,
    )


def agent_to_pb(record: AgentRecord) -> agent_pb2.Agent:
    info = record.info
    return agent_pb2.Agent(
        name=info.name,
        agent_id=info.agent_id,
        groups=list(info.groups),
        labels=info.labels,
        state=_AGENT_STATES[record.state],
        version=info.version,
        peer_address=record.peer_address,
        bt_endpoint=info.bt_endpoint,
        docker_version=info.docker_version,
        docker_error=info.docker_error,
        disk_free_bytes=info.disk_free_bytes,
        cached_digests=list(info.cached_digests),
        platform=info.platform,
        connect_time=timestamp(record.connect_time),
        last_seen_time=timestamp(record.last_seen_time),
        create_time=timestamp(record.create_time),
    )


_TASK_STATES = {
    TaskState.QUEUED: agent_pb2.TASK_STATE_QUEUED,
    TaskState.PENDING: agent_pb2.TASK_STATE_PENDING,
    TaskState.ACCEPTED: agent_pb2.TASK_STATE_ACCEPTED,
    TaskState.DOWNLOADING: agent_pb2.TASK_STATE_DOWNLOADING,
    TaskState.VERIFYING: agent_pb2.TASK_STATE_VERIFYING,
    TaskState.LOADING: agent_pb2.TASK_STATE_LOADING,
    TaskState.SUCCEEDED: agent_pb2.TASK_STATE_SUCCEEDED,
    TaskState.FAILED: agent_pb2.TASK_STATE_FAILED,
    TaskState.CANCELLED: agent_pb2.TASK_STATE_CANCELLED,
}
_TASK_STATES_BACK = {v: k for k, v in _TASK_STATES.items()}
_ROLLOUT_STATES = {
    RolloutState.RUNNING: rollout_pb2.ROLLOUT_STATE_RUNNING,
    RolloutState.SUCCEEDED: rollout_pb2.ROLLOUT_STATE_SUCCEEDED,
    RolloutState.FAILED: rollout_pb2.ROLLOUT_STATE_FAILED,
    RolloutState.CANCELLED: rollout_pb2.ROLLOUT_STATE_CANCELLED,
    RolloutState.TIMED_OUT: rollout_pb2.ROLLOUT_STATE_TIMED_OUT,
}


def peer_to_pb(peer: PeerRef) -> image_pb2.Peer:
    return image_pb2.Peer(endpoint=peer.endpoint, name=peer.name)


def _order_blob(blob: Blob, media_type: str) -> agent_pb2.OrderBlob:
    return agent_pb2.OrderBlob(
        digest=blob.digest,
        size_bytes=blob.size,
        media_type=media_type,
        metainfo=blob.torrent.metainfo if blob.torrent else b"",
    )


def pull_order_to_pb(task: Task, plan: OrderPlan) -> agent_pb2.PullOrder:
    image = task.image
    order = agent_pb2.PullOrder(
        order_id=task.order_id,
        image_name=image.name,
        image_digest=image.digest,
        layers=[_order_blob(task.blobs[d.digest], d.media_type) for d in image.layers],
        peers=[peer_to_pb(p) for p in plan.peers],
        load=task.load,
        claim_first_pieces=plan.first_pieces,
        progress_interval=duration(plan.progress_interval),
    )
    if image.config is not None:  # blobs pulled alone have none (and are not loaded)
        order.config.CopyFrom(_order_blob(task.blobs[image.config.digest], image.config.media_type))
    return order


def progress_from_pb(msg: agent_pb2.PieceProgress) -> ProgressReport:
    return ProgressReport(
        order_id=msg.order_id,
        blobs=[
            BlobProgress(
                digest=b.digest,
                new_pieces=list(b.new_pieces),
                done_pieces=b.done_pieces,
                total_pieces=b.total_pieces,
                done_bytes=b.done_bytes,
            )
            for b in msg.blobs
        ],
        rate=msg.rate_bytes_per_second,
        peer_count=msg.peer_count,
        peer_bytes={p.endpoint: p.received_bytes for p in msg.peers},
        fallback_bytes=msg.fallback_bytes,
    )


def task_report_from_pb(msg: agent_pb2.TaskUpdate) -> TaskReport | None:
    state = _TASK_STATES_BACK.get(msg.state)
    if state is None or state in (TaskState.QUEUED, TaskState.PENDING):
        return None
    return TaskReport(
        order_id=msg.order_id,
        state=state,
        error=msg.error,
        image_id=msg.image_id,
        cached_bytes=msg.cached_bytes,
        bittorrent_bytes=msg.bittorrent_bytes,
        server_bytes=msg.server_bytes,
        fallback_bytes=msg.fallback_bytes,
        first_piece_bytes=msg.first_piece_bytes,
    )


def rollout_host_to_pb(task: Task) -> rollout_pb2.RolloutHost:
    msg = rollout_pb2.RolloutHost(
        agent_name=task.agent,
        order_id=task.order_id,
        state=_TASK_STATES[task.state],
        error=task.error,
        image_id=task.image_id,
        total_bytes=task.total_bytes,
        done_bytes=task.held_bytes,
        total_pieces=task.total_pieces,
        done_pieces=task.done_pieces,
        rate_bytes_per_second=task.rate,
        peer_count=task.peer_count,
        cached_bytes=task.cached_bytes,
        bittorrent_bytes=task.bittorrent_bytes,
        server_bytes=task.server_bytes,
        fallback_bytes=task.fallback_bytes,
        first_piece_bytes=task.first_piece_bytes,
        image_digest=task.image.digest,
        platform=task.image.platform,
    )
    if task.start_time is not None:
        msg.start_time.CopyFrom(timestamp(task.start_time))
    if task.end_time is not None:
        msg.end_time.CopyFrom(timestamp(task.end_time))
    return msg


def rollout_to_pb(rollout: Rollout) -> rollout_pb2.Rollout:
    msg = rollout_pb2.Rollout(
        id=rollout.id,
        image_name=rollout.image.name,
        image_digest=rollout.image.digest,
        selector=rollout.selector,
        prefetch_only=rollout.prefetch_only,
        state=_ROLLOUT_STATES[rollout.state],
        hosts=[rollout_host_to_pb(rollout.tasks[name]) for name in sorted(rollout.tasks)],
        image_size_bytes=rollout.image.size,
        create_time=timestamp(rollout.create_time),
        canary=rollout.canary,
        max_parallel=rollout.max_parallel,
        max_failures=rollout.max_failures,
        deadline_time=timestamp(rollout.deadline),
        reason=rollout.reason,
    )
    if rollout.end_time is not None:
        msg.end_time.CopyFrom(timestamp(rollout.end_time))
    return msg


def rollout_event_to_pb(event: RolloutEvent) -> rollout_pb2.RolloutEvent:
    msg = rollout_pb2.RolloutEvent(event_time=timestamp(event.time))
    if event.snapshot is not None:
        msg.snapshot.CopyFrom(rollout_to_pb(event.snapshot))
    elif event.task is not None:
        msg.host.CopyFrom(rollout_host_to_pb(event.task))
    elif event.state is not None:
        msg.state = _ROLLOUT_STATES[event.state]
    return msg


def rollout_record_to_pb(record: RolloutRecord) -> rollout_pb2.RolloutRecord:
    msg = rollout_pb2.RolloutRecord(
        record_time=timestamp(record.time), agent_name=record.agent, message=record.message
    )
    if record.task_state is not None:
        msg.task_state = _TASK_STATES[record.task_state]
    if record.rollout_state is not None:
        msg.rollout_state = _ROLLOUT_STATES[record.rollout_state]
    return msg


def pull_to_pb(pull: Pull) -> pull_service_pb2.Pull:
    return pull_service_pb2.Pull(
        id=pull.id,
        image_name=pull.image_name,
        image_digest=pull.image_digest,
        blob_digests=pull.blob_digests,
        host=rollout_host_to_pb(pull.task),
        create_time=timestamp(pull.create_time),
    )
