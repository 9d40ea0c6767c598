"""Test images made locally (no registry is reachable) with the docker SDK only.

* `make_base_image`: a busybox root filesystem imported as a one-layer image.
* `build_derived_image`: ``FROM`` a local image plus one ``COPY`` layer per entry.
* `make_image_pair`: a base and two images sharing it (app1: 2 layers more, app2: 1 more).
* `save_image`: ``docker save`` streamed to a file.
* `legacy_to_oci`: turn a legacy ``docker save`` tar (what dockerd 20.10 writes) into the
  OCI-layout tar that Docker >= 25 writes.

Everything large is streamed through temporary files; nothing holds an image in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import posixpath
import random
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import docker

MiB = 1024 * 1024
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "echo", "cat", "ls")

DEFAULT_BASE_TAG = "docket-test/base:1"
DEFAULT_APP1_TAG = "docket-test/app1:1"
DEFAULT_APP2_TAG = "docket-test/app2:1"
#: Extra data in the default base image, so that it is big enough to be worth sharing.
DEFAULT_BASE_EXTRA_BYTES = 2 * MiB
#: Sizes of the files each app adds on top of the base (one COPY layer each).
DEFAULT_APP1_LAYERS: tuple[int, ...] = (256 * 1024, 64 * 1024)
DEFAULT_APP2_LAYERS: tuple[int, ...] = (128 * 1024,)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
#: Layer entries of a derived image, one per COPY: a size (deterministic pseudo-random bytes
#: of that length) or the literal content.
LayerSpec = int | bytes


class _Readable(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class ImagePair:
    """Tags of a base image and two images made on top of it."""

    base: str
    app1: str
    app2: str


# -- deterministic content ----------------------------------------------------------------


class PseudoRandomStream:
    """A readable stream of `size` deterministic pseudo-random bytes from `seed`.

    Generated 1 MiB at a time; the bytes depend only on (seed, size), not on read sizes.
    `read(n)` returns exactly n bytes until the end, as tarfile wants.
    """

    def __init__(self, size: int, seed: int | str = 0) -> None:
        if isinstance(seed, str):
            seed = zlib.crc32(seed.encode())
        self._rng = random.Random(seed)
        self._left = size
        self._buffer = b""
        self._offset = 0

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        wanted = n if n >= 0 else None
        while wanted is None or wanted > 0:
            if self._offset >= len(self._buffer):
                if self._left <= 0:
                    break
                chunk = min(MiB, self._left)
                self._buffer = self._rng.randbytes(chunk)
                self._offset = 0
                self._left -= chunk
            end = len(self._buffer) if wanted is None else self._offset + wanted
            part = self._buffer[self._offset : end]
            self._offset += len(part)
            if wanted is not None:
                wanted -= len(part)
            parts.append(part)
        return b"".join(parts)


def pseudo_random_bytes(size: int, seed: int | str = 0) -> bytes:
    """The same bytes as `PseudoRandomStream(size, seed)`, in memory (for small sizes)."""
    return PseudoRandomStream(size, seed).read()


def _tar_info(name: str, *, kind: bytes = tarfile.REGTYPE, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0  # deterministic: the same input gives the same layer digest
    return info


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    tar.addfile(_tar_info(name, kind=tarfile.DIRTYPE, mode=mode))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = _tar_info(name, mode=mode)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_stream(tar: tarfile.TarFile, name: str, stream: _Readable, size: int) -> None:
    info = _tar_info(name)
    info.size = size
    tar.addfile(info, stream)


def _add_content(tar: tarfile.TarFile, name: str, spec: LayerSpec, seed: str) -> None:
    if isinstance(spec, bytes):
        _add_bytes(tar, name, spec)
    else:
        _add_stream(tar, name, PseudoRandomStream(spec, seed), spec)


@contextlib.contextmanager
def _temp_tar_path(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp) / "image.tar"


def _split_tag(ref: str) -> tuple[str, str]:
    """``repo[:tag]`` -> (repo, tag); the tag defaults to ``latest``."""
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, "latest"


# -- making images ------------------------------------------------------------------------


def write_base_rootfs(path: Path, extra_bytes: int = 0, seed: int = 0) -> None:
    """Write a busybox root filesystem tar to `path` (streamed, never all in memory)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "etc", "root"):
            _add_dir(tar, name)
        _add_dir(tar, "tmp", 0o1777)
        info = _tar_info("bin/busybox", mode=0o755)
        info.size = BUSYBOX.stat().st_size
        with BUSYBOX.open("rb") as busybox:
            tar.addfile(info, busybox)
        for applet in BUSYBOX_APPLETS:
            link = _tar_info(f"bin/{applet}", kind=tarfile.SYMTYPE, mode=0o777)
            link.linkname = "busybox"
            tar.addfile(link)
        _add_bytes(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        _add_bytes(tar, "etc/group", b"root:x:0:\n")
        if extra_bytes > 0:
            _add_dir(tar, "data")
            _add_stream(tar, "data/base.bin", PseudoRandomStream(extra_bytes, seed), extra_bytes)


def make_base_image(
    client: docker.DockerClient, tag: str, extra_bytes: int = 0, seed: int = 0
) -> str:
    """Import a busybox image as `tag` (``repo:tag``) and return its id (``sha256:…``).

    Contains /bin/busybox with sh, echo, cat and ls linked to it, /etc/passwd, and if
    `extra_bytes` > 0 a file /data/base.bin of that many bytes, deterministic from `seed`.
    """
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    repository, image_tag = _split_tag(tag)
    with _temp_tar_path("dkt-base-") as path:
        write_base_rootfs(path, extra_bytes=extra_bytes, seed=seed)
        output = client.api.import_image(src=str(path), repository=repository, tag=image_tag)
    for line in str(output).splitlines():
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            if isinstance(message, dict) and message.get("error"):
                raise docker.errors.DockerException(f"import of {tag} failed: {message}")
    image_id: str = client.images.get(tag).id
    return image_id


def build_derived_image(
    client: docker.DockerClient, base_tag: str, tag: str, layers: Sequence[LayerSpec]
) -> str:
    """Build `tag` FROM the local `base_tag` with one COPY (so one layer) per `layers` entry.

    Entry i becomes the file /layers/<repo-name>-<i>.bin: `bytes` as given, an `int` as that
    many pseudo-random bytes seeded by (tag, i). Needs no network; returns the image id.
    """
    if not layers:
        raise ValueError("a derived image needs at least one layer")
    name = _split_tag(tag)[0].rsplit("/", 1)[-1]
    files = [f"{name}-{i}.bin" for i in range(len(layers))]
    dockerfile = "".join(
        [f"FROM {base_tag}\n"] + [f"COPY {file} /layers/{file}\n" for file in files]
    )
    with tempfile.TemporaryFile(prefix="dkt-ctx-") as context:
        with tarfile.open(fileobj=context, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "Dockerfile", dockerfile.encode())
            for i, (file, spec) in enumerate(zip(files, layers, strict=True)):
                _add_content(tar, file, spec, seed=f"{tag}#{i}")
        context.seek(0)
        image, _logs = client.images.build(
            fileobj=context, custom_context=True, tag=tag, rm=True, forcerm=True, pull=False
        )
    image_id: str = image.id
    return image_id


def make_image_pair(
    client: docker.DockerClient,
    *,
    base_tag: str = DEFAULT_BASE_TAG,
    tag1: str = DEFAULT_APP1_TAG,
    tag2: str = DEFAULT_APP2_TAG,
    base_extra_bytes: int = DEFAULT_BASE_EXTRA_BYTES,
    layers1: Sequence[LayerSpec] = DEFAULT_APP1_LAYERS,
    layers2: Sequence[LayerSpec] = DEFAULT_APP2_LAYERS,
) -> tuple[str, str, str]:
    """Make a base image and two images on it; returns (base_tag, tag1, tag2).

    With the defaults: base = busybox + 2 MiB, app1 = base + 2 layers, app2 = base + 1 layer.
    """
    make_base_image(client, base_tag, extra_bytes=base_extra_bytes)
    build_derived_image(client, base_tag, tag1, layers1)
    build_derived_image(client, base_tag, tag2, layers2)
    return base_tag, tag1, tag2


def save_image(client: docker.DockerClient, ref: str, path: Path | str) -> Path:
    """``docker save ref > path``, streamed in 1 MiB chunks. Returns `path`.

    The tar keeps the tag (``named``) when `ref` is one of the image's tags, or else the
    image's first tag.
    """
    image = client.images.get(ref)
    named: str | bool = ref if ref in image.tags else bool(image.tags)
    out = Path(path)
    chunks = image.save(chunk_size=MiB, named=named)
    try:
        with out.open("wb") as file:
            for chunk in chunks:
                file.write(chunk)
    finally:
        chunks.close()
    return out


# -- legacy docker save -> OCI layout -----------------------------------------------------


def normalize_image_name(ref: str) -> str:
    """``app:1`` -> ``docker.io/library/app:1``, ``org/app:1`` -> ``docker.io/org/app:1``."""
    repository, tag = _split_tag(ref)
    first, _, rest = repository.partition("/")
    if not rest:
        repository = f"docker.io/library/{repository}"
    elif not ("." in first or ":" in first or first == "localhost"):
        repository = f"docker.io/{repository}"
    return f"{repository}:{tag}"


class _HashingReader:
    """Wraps a file object: every byte read goes through a sha256."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _descriptor(media_type: str, data_digest: str, size: int) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": data_digest, "size": size}


def _resolve_member(tar: tarfile.TarFile, name: str) -> tarfile.TarInfo:
    """The member called `name`, following (relative) symlinks: docker save links layers
    whose content it already wrote (``../<id>/layer.tar``)."""
    for _hop in range(16):
        member = tar.getmember(name)
        if not member.issym():
            return member
        target = member.linkname
        if not target.startswith("/"):
            target = posixpath.join(posixpath.dirname(name), target)
        name = posixpath.normpath(target).lstrip("/")
    raise ValueError(f"too many symlinks resolving {name!r}")


def legacy_to_oci(legacy_tar: Path | str, out_tar: Path | str) -> Path:
    """Convert a legacy ``docker save`` tar into the OCI-layout tar Docker >= 25 writes.

    Writes ``oci-layout``, ``blobs/sha256/<hex>`` (layers uncompressed, configs, manifests),
    ``index.json`` (one entry per tag, annotated with ``io.containerd.image.name`` and
    ``org.opencontainers.image.ref.name``) and a ``manifest.json`` whose Config and Layers
    point into ``blobs/``. Layers are streamed and hashed while copied; a layer whose hash is
    not the config's diff_id raises ValueError. Returns `out_tar`.
    """
    out = Path(out_tar)
    try:
        _legacy_to_oci(Path(legacy_tar), out)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def _legacy_to_oci(source: Path, out: Path) -> None:
    with (
        tarfile.open(source, "r:") as src,
        tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst,
    ):
        manifest_file = src.extractfile(_resolve_member(src, "manifest.json"))
        if manifest_file is None:
            raise ValueError(f"{source}: manifest.json is not a file")
        with manifest_file:
            legacy_manifest: list[dict[str, Any]] = json.load(manifest_file)

        written: set[str] = set()

        def put_bytes(data: bytes) -> str:
            hex_digest = hashlib.sha256(data).hexdigest()
            if hex_digest not in written:
                _add_bytes(dst, f"blobs/sha256/{hex_digest}", data)
                written.add(hex_digest)
            return f"sha256:{hex_digest}"

        _add_bytes(dst, "oci-layout", _json_bytes({"imageLayoutVersion": "1.0.0"}))
        _add_dir(dst, "blobs")
        _add_dir(dst, "blobs/sha256")

        index_entries: list[dict[str, Any]] = []
        docker_manifest: list[dict[str, Any]] = []
        for entry in legacy_manifest:
            config_file = src.extractfile(_resolve_member(src, entry["Config"]))
            if config_file is None:
                raise ValueError(f"{source}: {entry['Config']} is not a file")
            with config_file:
                config_bytes = config_file.read()
            config_digest = put_bytes(config_bytes)
            diff_ids: list[str] = json.loads(config_bytes)["rootfs"]["diff_ids"]
            if len(diff_ids) != len(entry["Layers"]):
                raise ValueError(
                    f"{source}: {len(entry['Layers'])} layers but {len(diff_ids)} diff_ids"
                )

            layer_descriptors: list[dict[str, Any]] = []
            for layer_name, diff_id in zip(entry["Layers"], diff_ids, strict=True):
                algorithm, _, hex_digest = diff_id.partition(":")
                if algorithm != "sha256":
                    raise ValueError(f"{source}: unsupported diff_id {diff_id}")
                member = _resolve_member(src, layer_name)
                if hex_digest not in written:
                    layer_file = src.extractfile(member)
                    if layer_file is None:
                        raise ValueError(f"{source}: {layer_name} is not a file")
                    with layer_file:
                        reader = _HashingReader(layer_file)
                        info = _tar_info(f"blobs/sha256/{hex_digest}")
                        info.size = member.size
                        dst.addfile(info, reader)
                    if reader.sha256.hexdigest() != hex_digest or reader.size != member.size:
                        raise ValueError(
                            f"{source}: {layer_name} hashes to sha256:"
                            f"{reader.sha256.hexdigest()}, its config says {diff_id}"
                        )
                    written.add(hex_digest)
                layer_descriptors.append(_descriptor(OCI_LAYER, diff_id, member.size))

            image_manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": _descriptor(OCI_CONFIG, config_digest, len(config_bytes)),
                "layers": layer_descriptors,
            }
            manifest_bytes = _json_bytes(image_manifest)
            manifest_digest = put_bytes(manifest_bytes)

            repo_tags: list[str] = entry.get("RepoTags") or []
            descriptor = _descriptor(OCI_MANIFEST, manifest_digest, len(manifest_bytes))
            if not repo_tags:
                index_entries.append(descriptor)
            for repo_tag in repo_tags:
                index_entries.append(
                    {
                        **descriptor,
                        "annotations": {
                            "io.containerd.image.name": normalize_image_name(repo_tag),
                            "org.opencontainers.image.ref.name": _split_tag(repo_tag)[1],
                        },
                    }
                )
            docker_manifest.append(
                {
                    "Config": f"blobs/sha256/{config_digest.partition(':')[2]}",
                    "RepoTags": repo_tags,
                    "Layers": [
                        f"blobs/sha256/{d['digest'].partition(':')[2]}" for d in layer_descriptors
                    ],
                }
            )

        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}
        _add_bytes(dst, "index.json", _json_bytes(index))
        _add_bytes(dst, "manifest.json", _json_bytes(docker_manifest))
