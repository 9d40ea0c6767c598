"""`docker save`-shaped archives made by hand, for tests that need no Docker engine."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class LegacyArchive:
    path: Path
    config_digest: str
    layer_digests: list[str]


def write_legacy_archive(
    path: Path,
    tag: str | None,
    layers: list[bytes],
    *,
    omit_layer: int | None = None,
    extra_members: dict[str, bytes] | None = None,
) -> LegacyArchive:
    """A legacy `docker save` tar of one image with these layer tars, base first."""
    diff_ids = [sha256(layer) for layer in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-05-01T10:00:00.123456789Z",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    config_id = hashlib.sha256(config).hexdigest()
    manifest = [
        {
            "Config": f"{config_id}.json",
            "RepoTags": [tag] if tag else None,
            "Layers": [f"layer{i}/layer.tar" for i in range(len(layers))],
        }
    ]
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i, layer in enumerate(layers):
            if i != omit_layer:
                add(f"layer{i}/layer.tar", layer)
        add(f"{config_id}.json", config)
        for name, data in (extra_members or {}).items():
            add(name, data)
        add("manifest.json", json.dumps(manifest).encode())
    return LegacyArchive(path, "sha256:" + config_id, diff_ids)
