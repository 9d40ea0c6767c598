"""Domain dataclasses to and from docket.v1 messages."""

from __future__ import annotations

from datetime import datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from docket_common.pb import agent_pb2, image_pb2
from docket_common.torrent import TorrentInfo
from docket_server.domain.fleet import AgentInfo, AgentRecord, AgentState
from docket_server.domain.models import Descriptor, Image


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


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
        config=descriptor_to_pb(image.config),
        layers=[descriptor_to_pb(layer) for layer in image.layers],
        diff_ids=list(image.diff_ids),
        size_bytes=image.size,
        create_time=timestamp(image.create_time),
        platform=image.platform,
    )
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
        connect_time=timestamp(record.connect_time),
        last_seen_time=timestamp(record.last_seen_time),
        create_time=timestamp(record.create_time),
    )
