"""Random-content images for the benchmarks, as legacy ``docker save`` archives.

`write_random_image` streams: the layer (a tar with one file of random bytes) goes to a
temporary file while it is hashed, then into the archive, so a 1 GiB image never sits in
memory. The layout is the one ``tests/support/archives.py`` writes (``manifest.json``,
``<config id>.json``, ``layer0/layer.tar``), which both ``docketctl push --archive`` and
``skopeo copy docker-archive:…`` read, and ``docker load`` accepts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

MiB = 1024 * 1024


@dataclass(frozen=True)
class RandomImage:
    path: Path
    tag: str
    layer_digest: str
    layer_bytes: int
    config_digest: str
    config_bytes: int

    @property
    def size_bytes(self) -> int:
        """What a host has to fetch: the layer and the config."""
        return self.layer_bytes + self.config_bytes


class _HashingWriter:
    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size


class _RandomReader:
    """`size` random bytes from os.urandom, read in any chunk sizes."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        self.left -= n
        out = bytearray()
        while len(out) < n:
            out += os.urandom(min(MiB, n - len(out)))
        return bytes(out)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info


def write_random_image(path: Path, tag: str, data_bytes: int) -> RandomImage:
    """A one-layer image whose layer holds /data/random.bin of `data_bytes` fresh random
    bytes (so no host or registry can have any of it), saved as a legacy archive at `path`."""
    with tempfile.TemporaryFile(dir=path.parent, prefix=".layer-") as layer_file:
        writer = _HashingWriter(layer_file)
        with tarfile.open(
            fileobj=cast(IO[bytes], writer), mode="w", format=tarfile.PAX_FORMAT
        ) as layer:
            directory = tarfile.TarInfo("data")
            directory.type = tarfile.DIRTYPE
            directory.mode = 0o755
            layer.addfile(directory)
            layer.addfile(_info("data/random.bin", data_bytes), _RandomReader(data_bytes))
        layer_digest = "sha256:" + writer.sha256.hexdigest()
        layer_bytes = writer.size
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": "2024-05-01T10:00:00Z",
                "config": {"Cmd": ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            }
        ).encode()
        config_id = hashlib.sha256(config).hexdigest()
        manifest = [
            {"Config": f"{config_id}.json", "RepoTags": [tag], "Layers": ["layer0/layer.tar"]}
        ]
        layer_file.seek(0)
        with tarfile.open(path, "w") as tar:
            tar.addfile(_info("layer0/layer.tar", layer_bytes), layer_file)
            tar.addfile(_info(f"{config_id}.json", len(config)), io.BytesIO(config))
            body = json.dumps(manifest).encode()
            tar.addfile(_info("manifest.json", len(body)), io.BytesIO(body))
    return RandomImage(
        path=path,
        tag=tag,
        layer_digest=layer_digest,
        layer_bytes=layer_bytes,
        config_digest="sha256:" + config_id,
        config_bytes=len(config),
    )
