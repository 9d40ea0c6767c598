"""The registry's records, as the domain and the stores pass them around."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from docket_common.manifest import (
    IMAGE_CONFIG_TYPES,
    INDEX_TYPES,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    oci_manifest,
)
from docket_common.torrent import TorrentInfo

__all__ = ["OCI_MANIFEST", "Blob", "Descriptor", "Image", "Manifest", "Platform"]


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    create_time: datetime
    torrent: TorrentInfo | None  # None only for an empty blob, which cannot be a torrent


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as stored in one repository: the bytes that were pushed, and what
    the registry read from them."""

    repository: str
    digest: str  # the sha256 of ``content``
    media_type: str
    content: bytes
    config: Descriptor | None  # image manifests
    layers: tuple[Descriptor, ...]
    children: tuple[Descriptor, ...]  # indexes: the child manifests, with their platforms
    subject: Descriptor | None
    artifact_type: str  # what a referrers listing calls it
    diff_ids: tuple[str, ...]  # from an image config; () for other artifacts
    build_time: datetime | None
    platform: str  # from an image config: "linux/amd64"
    create_time: datetime

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def blob_digests(self) -> list[str]:
        if self.config is None:
            return []
        return [self.config.digest, *(layer.digest for layer in self.layers)]


@dataclass(frozen=True)
class Image:
    """What a name points at, as the API shows it: a runnable image (config and layers), an
    index of them (``manifests``, one per platform), or another artifact (a signature)."""

    repository: str
    tag: str  # "" for an image named by digest (an index's platform image)
    config: Descriptor | None  # None for an index
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]
    build_time: datetime | None
    create_time: datetime
    platform: str
    digest: str = ""  # the manifest's; "" means Docket's own manifest for config and layers
    media_type: str = OCI_MANIFEST
    artifact_type: str = ""
    manifests: tuple[Image, ...] = field(default=())  # an index's images, in its order

    def __post_init__(self) -> None:
        if not self.digest and self.config is not None:
            content = oci_manifest(self.config, self.layers)
            object.__setattr__(self, "digest", "sha256:" + hashlib.sha256(content).hexdigest())

    @property
    def name(self) -> str:
        if not self.tag:
            return f"{self.repository}@{self.digest}" if self.digest else self.repository
        return f"{self.repository}:{self.tag}"

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def runnable(self) -> bool:
        """An image an engine can run: an image config, and a diff_id for every layer."""
        return (
            self.config is not None
            and self.config.media_type in IMAGE_CONFIG_TYPES
            and len(self.diff_ids) == len(self.layers)
        )

    @property
    def size(self) -> int:
        if self.config is None:
            return sum(m.size for m in self.manifests)
        return self.config.size + sum(layer.size for layer in self.layers)

    @property
    def blob_digests(self) -> list[str]:
        """The config's and the layers' digests (an index has none; blobs pulled alone, as
        an agent's registry face may, are layers without a config)."""
        config = [self.config.digest] if self.config is not None else []
        return [*config, *(layer.digest for layer in self.layers)]

    def with_name(self, repository: str, tag: str) -> Image:
        """The same image under another name: an index's platform image, shown as the
        name that was asked for (``docker load`` tags it so)."""
        return Image(
            repository=repository,
            tag=tag,
            config=self.config,
            layers=self.layers,
            diff_ids=self.diff_ids,
            build_time=self.build_time,
            create_time=self.create_time,
            platform=self.platform,
            digest=self.digest,
            media_type=self.media_type,
            artifact_type=self.artifact_type,
        )


def _descriptor_json(d: Descriptor) -> dict[str, object]:
    return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}


def image_to_dict(image: Image) -> dict[str, object]:
    """The image as JSON-able data, for records that must outlive the image's name."""
    return {
        "repository": image.repository,
        "tag": image.tag,
        "digest": image.digest,
        "media_type": image.media_type,
        "artifact_type": image.artifact_type,
        "config": _descriptor_json(image.config) if image.config else None,
        "layers": [_descriptor_json(layer) for layer in image.layers],
        "diff_ids": list(image.diff_ids),
        "build_time": image.build_time.isoformat() if image.build_time else None,
        "create_time": image.create_time.isoformat(),
        "platform": image.platform,
        "manifests": [image_to_dict(m) for m in image.manifests],
    }


def image_from_dict(data: dict[str, Any]) -> Image:
    """The inverse of image_to_dict; also reads the records of servers before manifests were
    stored (no digest: Docket's own manifest for the config and layers)."""

    def desc(d: dict[str, Any]) -> Descriptor:
        return Descriptor(d["digest"], int(d["size"]), d["mediaType"])

    return Image(
        repository=data["repository"],
        tag=data["tag"],
        config=desc(data["config"]) if data.get("config") else None,
        layers=tuple(desc(layer) for layer in data["layers"]),
        diff_ids=tuple(data["diff_ids"]),
        build_time=datetime.fromisoformat(data["build_time"]) if data["build_time"] else None,
        create_time=datetime.fromisoformat(data["create_time"]),
        platform=data["platform"],
        digest=data.get("digest", ""),
        media_type=data.get("media_type", OCI_MANIFEST),
        artifact_type=data.get("artifact_type", ""),
        manifests=tuple(image_from_dict(m) for m in data.get("manifests", [])),
    )
