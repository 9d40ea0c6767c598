"""Domain dataclasses to and from docket.v1 messages."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from docket_common.pb import image_pb2
from docket_common.torrent import TorrentInfo
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
