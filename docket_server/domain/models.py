"""The registry's records, as the domain and the stores pass them around."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from docket_common.torrent import TorrentInfo

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class Descriptor:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    create_time: datetime
    torrent: TorrentInfo | None  # None only for an empty blob, which cannot be a torrent


@dataclass(frozen=True)
class Image:
    repository: str
    tag: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]
    build_time: datetime | None
    create_time: datetime
    platform: str

    @property
    def name(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def size(self) -> int:
        return self.config.size + sum(layer.size for layer in self.layers)

    @property
    def manifest(self) -> bytes:
        """The image's OCI manifest, canonically encoded: its sha256 is the image digest."""
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor_json(self.config),
            "layers": [_descriptor_json(layer) for layer in self.layers],
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def blob_digests(self) -> list[str]:
        return [self.config.digest, *(layer.digest for layer in self.layers)]


def _descriptor_json(d: Descriptor) -> dict[str, object]:
    return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}


def image_to_dict(image: Image) -> dict[str, object]:
    """The image as JSON-able data, for records that must outlive the image's name."""
    return {
        "repository": image.repository,
        "tag": image.tag,
        "config": _descriptor_json(image.config),
        "layers": [_descriptor_json(layer) for layer in image.layers],
        "diff_ids": list(image.diff_ids),
        "build_time": image.build_time.isoformat() if image.build_time else None,
        "create_time": image.create_time.isoformat(),
        "platform": image.platform,
    }


def image_from_dict(data: dict[str, Any]) -> Image:
    def desc(d: dict[str, Any]) -> Descriptor:
        return Descriptor(d["digest"], int(d["size"]), d["mediaType"])

    return Image(
        repository=data["repository"],
        tag=data["tag"],
        config=desc(data["config"]),
        layers=tuple(desc(layer) for layer in data["layers"]),
        diff_ids=tuple(data["diff_ids"]),
        build_time=datetime.fromisoformat(data["build_time"]) if data["build_time"] else None,
        create_time=datetime.fromisoformat(data["create_time"]),
        platform=data["platform"],
    )
