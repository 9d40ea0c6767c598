"""Random-content images for the benchmarks, as legacy ``docker save`` archives.

`write_random_image` streams: each layer (a tar with one file of random bytes) goes to a
temporary file while it is hashed, then into the archive, so a 1 GiB image never sits in
memory (one layer's temporary file and the archive are all it writes). The layout is the one
``tests/support/archives.py`` writes (``manifest.json``, ``<config id>.json``,
``layer<i>/layer.tar``), which both ``docketctl push --archive`` and
``skopeo copy docker-archive:…`` read, and ``docker load`` accepts.

One layer of ``data_bytes``, or several: ``layers=[30 * MiB, 15 * MiB, …]``
(`parse_layers` reads ``30,15,8,4,2,1,0.5,0.1`` or the name of a layout, ``eight``). Every
call draws fresh random bytes, so no host or registry has any of them. Also a command::

    python bench/benchimage.py OUT.tar TAG --size-mib 64
    python bench/benchimage.py OUT.tar TAG --layers-mib 30,15,8,4,2,1,0.5,0.1   # or --layout eight
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

MiB = 1024 * 1024

#: Named layer layouts, sizes in MiB, first layer first (the base image's big layer first).
LAYOUTS: dict[str, tuple[float, ...]] = {
    "one": (),  # one layer of --size-mib
    "eight": (30, 15, 8, 4, 2, 1, 0.5, 0.1),
}


@dataclass(frozen=True)
class RandomLayer:
    digest: str  # sha256 of the layer tar (uncompressed: also its diff_id)
    size_bytes: int  # the layer tar's size
    data_bytes: int  # the random bytes in it


@dataclass(frozen=True)
class RandomImage:
    path: Path
    tag: str
    layer_digest: str  # the first layer's (the only one's, for one-layer images)
    layer_bytes: int  # all layers' tar bytes, summed
    config_digest: str
    config_bytes: int
    layers: tuple[RandomLayer, ...] = ()

    @property
    def size_bytes(self) -> int:
        """What a host has to fetch: the layers and the config."""
        return self.layer_bytes + self.config_bytes

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers] or [self.layer_digest]


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


def parse_layers(text: str) -> tuple[float, ...]:
    """``30,15,8`` (MiB each) or a layout's name (``eight``) -> the sizes in MiB."""
    text = text.strip()
    if text in LAYOUTS:
        return LAYOUTS[text]
    try:
        sizes = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"{text!r}: MiB per layer, comma-separated (30,15,8), or one of {sorted(LAYOUTS)}"
        ) from None
    if not sizes or any(size < 0 for size in sizes):
        raise ValueError(f"{text!r}: at least one layer, no negative sizes")
    return sizes


def layers_label(layers_mib: Sequence[float], size_mib: float) -> str:
    """How tables name an image: ``64 MiB, 1 layer`` or ``60.6 MiB, 8 layers``."""
    if len(layers_mib) <= 1:
        return f"{(layers_mib[0] if layers_mib else size_mib):g} MiB, 1 layer"
    return f"{sum(layers_mib):g} MiB, {len(layers_mib)} layers"


def _write_layer(
    directory: Path, index: int, data_bytes: int, archive: tarfile.TarFile
) -> RandomLayer:
    with tempfile.TemporaryFile(dir=directory, prefix=".layer-") as layer_file:
        writer = _HashingWriter(layer_file)
        with tarfile.open(
            fileobj=cast(IO[bytes], writer), mode="w", format=tarfile.PAX_FORMAT
        ) as layer:
            folder = tarfile.TarInfo("data")
            folder.type = tarfile.DIRTYPE
            folder.mode = 0o755
            layer.addfile(folder)
            name = "data/random.bin" if index == 0 else f"data/random-{index}.bin"
            layer.addfile(_info(name, data_bytes), _RandomReader(data_bytes))
        layer_file.seek(0)
        archive.addfile(_info(f"layer{index}/layer.tar", writer.size), layer_file)
        return RandomLayer("sha256:" + writer.sha256.hexdigest(), writer.size, data_bytes)


def write_random_image(
    path: Path, tag: str, data_bytes: int, *, layers: Sequence[int] | None = None
) -> RandomImage:
    """An image of fresh random bytes (so no host or registry can have any of it), saved as
    a legacy archive at `path`: one layer holding /data/random.bin of `data_bytes`, or, with
    `layers`, one layer per entry holding that many random bytes (`data_bytes` ignored)."""
    sizes = list(layers) if layers else [data_bytes]
    with tarfile.open(path, "w") as tar:
        written = [_write_layer(path.parent, i, size, tar) for i, size in enumerate(sizes)]
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": "2024-05-01T10:00:00Z",
                "config": {"Cmd": ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": [x.digest for x in written]},
            }
        ).encode()
        config_id = hashlib.sha256(config).hexdigest()
        manifest = [
            {
                "Config": f"{config_id}.json",
                "RepoTags": [tag],
                "Layers": [f"layer{i}/layer.tar" for i in range(len(written))],
            }
        ]
        tar.addfile(_info(f"{config_id}.json", len(config)), io.BytesIO(config))
        body = json.dumps(manifest).encode()
        tar.addfile(_info("manifest.json", len(body)), io.BytesIO(body))
    return RandomImage(
        path=path,
        tag=tag,
        layer_digest=written[0].digest,
        layer_bytes=sum(x.size_bytes for x in written),
        config_digest="sha256:" + config_id,
        config_bytes=len(config),
        layers=tuple(written),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write an image of fresh random bytes.")
    parser.add_argument("path", type=Path, help="the docker-save archive to write")
    parser.add_argument("tag", help="its name:tag")
    parser.add_argument("--size-mib", type=float, default=64.0, help="one layer of this size")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--layers-mib", help="MiB per layer, e.g. 30,15,8,4,2,1,0.5,0.1")
    group.add_argument("--layout", choices=sorted(LAYOUTS), help="a named layout")
    args = parser.parse_args(argv)
    sizes = parse_layers(args.layers_mib or args.layout or "one")
    image = write_random_image(
        args.path,
        args.tag,
        int(args.size_mib * MiB),
        layers=[int(size * MiB) for size in sizes] or None,
    )
    print(
        json.dumps(
            {
                "path": str(image.path),
                "tag": image.tag,
                "size_bytes": image.size_bytes,
                "layers": [vars(layer) for layer in image.layers],
                "config_digest": image.config_digest,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
