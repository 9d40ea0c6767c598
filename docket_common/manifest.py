"""Image manifests and indexes: media types, parsing with the checks a registry makes, the
manifest Docket writes for a push, and choosing a platform from an index.

A manifest is kept as the exact bytes that were pushed: its digest is the sha256 of those
bytes, so it is never re-encoded. Parsing only reads what the registry needs from it: the
config and layers of an image manifest, the child manifests (and their platforms) of an
index, and the ``subject`` and ``artifactType`` of OCI 1.1 referrers.
"""

from __future__ import annotations

import json
import platform as host_platform
from dataclasses import dataclass
from typing import Any

from docket_common.digest import is_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

IMAGE_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (*IMAGE_MANIFEST_TYPES, *INDEX_TYPES)
IMAGE_CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
# Layers that registries do not serve (Windows base layers): their bytes live elsewhere.
FOREIGN_LAYER_TYPES = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # as the CNCF distribution registry


class ManifestError(ValueError):
    """Bytes that are not a manifest this registry takes; str() says why, in one line."""


@dataclass(frozen=True)
class Platform:
    """An OCI platform: ``linux/amd64``, ``linux/arm64/v8``."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise ValueError(f"invalid platform {text!r}: want OS/ARCH[/VARIANT], like linux/amd64")
        return cls(*(p.lower() for p in parts))

    @property
    def runnable(self) -> bool:
        """False for the attestation entries (unknown/unknown) that buildx puts in indexes."""
        return self.os != "unknown" and self.architecture != "unknown"


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says of a blob or of a child manifest."""

    digest: str
    size: int
    media_type: str
    platform: Platform | None = None  # index entries only
    artifact_type: str = ""


@dataclass(frozen=True)
class ParsedManifest:
    media_type: str
    config: Descriptor | None  # image manifests only
    layers: tuple[Descriptor, ...]
    manifests: tuple[Descriptor, ...]  # indexes only
    subject: Descriptor | None
    artifact_type: str  # the OCI 1.1 artifactType field, or ""

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def referrer_type(self) -> str:
        """The artifact type a referrers listing gives this manifest (OCI 1.1: the
        artifactType field, else the config's media type unless that is the empty one)."""
        if self.artifact_type:
            return self.artifact_type
        if self.config is not None and self.config.media_type != OCI_EMPTY:
            return self.config.media_type
        return ""


def parse_manifest(content: bytes, content_type: str = "") -> ParsedManifest:
    """Parses and checks a manifest or index as a registry receives it.

    ``content_type`` is the request's Content-Type; when given it must agree with the
    document's own ``mediaType`` field (when that is present). Raises ManifestError.
    """
    if len(content) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"the manifest is {len(content)} bytes, over {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(content)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"the manifest is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ManifestError("the manifest is not a JSON object")
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestError("mediaType must be a string")
    content_type = content_type.split(";", 1)[0].strip().lower()
    if content_type in ("", "application/json", "application/octet-stream"):
        content_type = ""
    if content_type and declared and content_type != declared:
        raise ManifestError(
            f"the request's Content-Type {content_type} differs from the manifest's "
            f"mediaType {declared}"
        )
    media_type = content_type or declared or _guess_media_type(doc)
    if media_type in DOCKER_SCHEMA1:
        raise ManifestError(
            "Docker schema 1 manifests are not supported: push with a client that writes "
            "schema 2 or OCI manifests"
        )
    if media_type not in MANIFEST_TYPES:
        raise ManifestError(
            f"unknown manifest media type {media_type!r} (want one of {', '.join(MANIFEST_TYPES)})"
        )
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"schemaVersion must be 2, not {doc.get('schemaVersion')!r}")
    subject = _descriptor(doc["subject"], "subject") if doc.get("subject") is not None else None
    artifact_type = doc.get("artifactType") or ""
    if not isinstance(artifact_type, str):
        raise ManifestError("artifactType must be a string")
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ManifestError("an index must list its manifests")
        children = tuple(
            _descriptor(entry, f"manifests[{i}]", with_platform=True)
            for i, entry in enumerate(entries)
        )
        for i, child in enumerate(children):
            if child.media_type not in MANIFEST_TYPES:
                raise ManifestError(
                    f"manifests[{i}] has media type {child.media_type!r}, not a manifest"
                )
        return ParsedManifest(media_type, None, (), children, subject, artifact_type)
    if "config" not in doc:
        raise ManifestError("an image manifest must name its config")
    config = _descriptor(doc["config"], "config")
    layers_doc = doc.get("layers", [])
    if not isinstance(layers_doc, list):
        raise ManifestError("layers must be a list")
    layers = tuple(_descriptor(layer, f"layers[{i}]") for i, layer in enumerate(layers_doc))
    for i, layer in enumerate(layers):
        if layer.media_type in FOREIGN_LAYER_TYPES:
            raise ManifestError(
                f"layers[{i}] is a non-distributable layer ({layer.media_type}): Docket "
                "distributes every layer it serves, and cannot serve this one"
            )
    return ParsedManifest(media_type, config, layers, (), subject, artifact_type)


def _guess_media_type(doc: dict[str, Any]) -> str:
    """OCI allows mediaType to be left out (and the Content-Type to say it): an index has
    ``manifests``, an image manifest ``config``."""
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc:
        return OCI_MANIFEST
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1[0]
    return ""


def _descriptor(item: Any, where: str, *, with_platform: bool = False) -> Descriptor:
    if not isinstance(item, dict):
        raise ManifestError(f"{where} is not a descriptor object")
    digest, size, media_type = item.get("digest"), item.get("size"), item.get("mediaType")
    if not isinstance(digest, str) or not is_digest(digest):
        raise ManifestError(f"{where} has digest {digest!r}: want sha256:<64 lowercase hex>")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ManifestError(f"{where} has size {size!r}: want a number of bytes")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestError(f"{where} has no mediaType")
    platform = None
    raw = item.get("platform")
    if with_platform and raw is not None:
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}.platform is not an object")
        os_name, arch, variant = raw.get("os"), raw.get("architecture"), raw.get("variant", "")
        if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
            raise ManifestError(f"{where}.platform needs os and architecture")
        platform = Platform(os_name, arch, variant if isinstance(variant, str) else "")
    artifact_type = item.get("artifactType") or ""
    return Descriptor(
        digest,
        size,
        media_type,
        platform,
        artifact_type if isinstance(artifact_type, str) else "",
    )


def oci_manifest(config: Descriptor, layers: tuple[Descriptor, ...] | list[Descriptor]) -> bytes:
    """The OCI image manifest Docket writes for an image pushed with `docketctl push`:
    compact JSON with sorted keys, so the same image always gets the same digest."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor_json(config),
        "layers": [_descriptor_json(layer) for layer in layers],
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _descriptor_json(d: Descriptor) -> dict[str, object]:
    return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}


# Go's names for the machine architectures, as OCI platforms use them.
_ARCHITECTURES = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


def normalize_platform(os_name: str, architecture: str, variant: str = "") -> Platform:
    """A platform as engines and `uname -m` name it, in OCI's words."""
    arch, default_variant = _ARCHITECTURES.get(architecture.lower(), (architecture.lower(), ""))
    return Platform(os_name.lower(), arch, variant or default_variant)


def this_platform() -> Platform:
    """The platform of this machine."""
    return normalize_platform(host_platform.system(), host_platform.machine())


def select_platform(
    entries: tuple[Descriptor, ...] | list[Descriptor], want: Platform
) -> Descriptor | None:
    """The entry of an index for the platform ``want``: the same OS and architecture, and the
    same variant where both name one (arm64's default variant v8 matches an unnamed one)."""
    best: Descriptor | None = None
    for entry in entries:
        p = entry.platform
        if p is None or not p.runnable or entry.media_type not in IMAGE_MANIFEST_TYPES:
            continue
        if (p.os, p.architecture) != (want.os, want.architecture):
            continue
        if p.variant == want.variant:
            return entry
        implied = {"", _default_variant(want.architecture)}
        if best is None and {p.variant, want.variant} <= implied:
            best = entry
    return best


def _default_variant(architecture: str) -> str:
    return {"arm64": "v8"}.get(architecture, "")
