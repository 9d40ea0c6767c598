"""Tests for docket_common.loadable: rebuilding `docker load` archives from blob files.

The engine tests load into a second, private engine (``target``) that starts empty for each
test, so every load really creates the image there; the images come from the session's
engine (``docker_engine``/``test_images``) through ``docker save`` and ImageArchive.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import platform
import re
import shutil
import socket
import tarfile
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import docker
import pytest
import zstandard

from docket_common.archive import ImageArchive
from docket_common.loadable import (
    LoadableImage,
    LoadError,
    archive_chunks,
    archive_size,
    engine_reads_zstd,
    load_importing_base,
    load_into_docker,
    write_archive,
)
from tests.support.dockerd import DockerEngine
from tests.support.images import ImagePair, PseudoRandomStream, save_image, write_base_rootfs

MiB = 1024 * 1024
APP1_LAYERS = b"app1-0.bin\napp1-1.bin\n"
PASSWD = b"root:x:0:0:root:/root:/bin/sh\n"


# -- helpers ---------------------------------------------------------------------------------


def stream_digest(file: IO[bytes]) -> str:
    sha = hashlib.sha256()
    while chunk := file.read(MiB):
        sha.update(chunk)
    return "sha256:" + sha.hexdigest()


def file_digest(path: Path) -> str:
    with path.open("rb") as file:
        return stream_digest(file)


def blob_path(directory: Path, digest: str) -> Path:
    return directory / digest.split(":", 1)[1]


@dataclass(frozen=True)
class Extracted:
    """An image taken out of a `docker save` archive, one file per blob."""

    image: LoadableImage
    diff_ids: tuple[str, ...]
    blobs: Path


def extract_image(client: docker.DockerClient, ref: str, work: Path, name: str) -> Extracted:
    """`docker save` ref, then copy its config and layers (streamed) to work/blobs/<hex>."""
    work.mkdir(parents=True, exist_ok=True)
    saved = save_image(client, ref, work / "saved.tar")
    blobs = work / "blobs"
    blobs.mkdir(exist_ok=True)
    with ImageArchive(saved) as archive:
        found = archive.find(ref)
        for blob in (found.config, *found.layers):
            with archive.open_blob(blob) as src, blob_path(blobs, blob.digest).open("wb") as dst:
                shutil.copyfileobj(src, dst, MiB)
    saved.unlink()
    image = LoadableImage(
        name=name,
        config_path=blob_path(blobs, found.config.digest),
        config_digest=found.config.digest,
        layer_paths=tuple(blob_path(blobs, layer.digest) for layer in found.layers),
        layer_digests=tuple(layer.digest for layer in found.layers),
    )
    return Extracted(image, found.diff_ids, blobs)


def gzip_file(src: Path, dest_dir: Path) -> tuple[Path, str]:
    """gzip `src` (streamed) into dest_dir, named by the compressed bytes' digest."""
    temp = dest_dir / "compressing.tmp"
    with src.open("rb") as raw, gzip.open(temp, "wb", compresslevel=1) as packed:
        shutil.copyfileobj(raw, packed, MiB)
    digest = file_digest(temp)
    final = blob_path(dest_dir, digest)
    temp.rename(final)
    return final, digest


def goarch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )


def write_layer(path: Path, files: dict[str, int | bytes], seed: str) -> str:
    """A layer tar with /data/<name> files (an int: that many pseudo-random bytes)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, spec in files.items():
            info = tarfile.TarInfo(f"data/{name}")
            info.mode = 0o644
            if isinstance(spec, bytes):
                info.size = len(spec)
                tar.addfile(info, io.BytesIO(spec))
            else:
                info.size = spec
                tar.addfile(info, PseudoRandomStream(spec, f"{seed}/{name}"))
    return file_digest(path)


def synthetic_image(
    work: Path, name: str, layers: list[dict[str, int | bytes]], seed: str
) -> tuple[LoadableImage, tuple[str, ...]]:
    """An image made by hand: a busybox base layer plus `layers`, blobs in work/<hex>."""
    work.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    digests: list[str] = []
    base = work / "base.tmp"
    write_base_rootfs(base)
    for i, files in enumerate([None, *layers]):
        temp = work / f"layer{i}.tmp"
        if files is None:
            base.rename(temp)
            digest = file_digest(temp)
        else:
            digest = write_layer(temp, files, f"{seed}#{i}")
        final = blob_path(work, digest)
        temp.replace(final)
        paths.append(final)
        digests.append(digest)
    config = {
        "architecture": goarch(),
        "os": "linux",
        "created": "2024-01-02T03:04:05Z",
        "config": {"Cmd": ["sh"], "Labels": {"seed": seed}},
        "rootfs": {"type": "layers", "diff_ids": digests},
        "history": [{"created_by": f"layer {i}"} for i in range(len(digests))],
    }
    data = json.dumps(config).encode()
    config_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    config_path = blob_path(work, config_digest)
    config_path.write_bytes(data)
    image = LoadableImage(name, config_path, config_digest, tuple(paths), tuple(digests))
    return image, tuple(digests)


def all_bytes(image: LoadableImage, chunk_size: int = 1 << 20) -> bytes:
    return b"".join(archive_chunks(image, chunk_size))


def rootfs_layers(client: docker.DockerClient, name: str) -> list[str]:
    layers: list[str] = client.images.get(name).attrs["RootFS"]["Layers"]
    return layers


def has_image(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_engine(docker_engine: DockerEngine) -> Iterator[DockerEngine]:
    """A second private engine, the one images are loaded into."""
    with DockerEngine() as engine:
        assert engine.dir != docker_engine.dir
        yield engine


@pytest.fixture
def target(second_engine: DockerEngine) -> DockerEngine:
    """The second engine, emptied: no containers, no images, no layers."""
    client = second_engine.client
    for container in client.containers.list(all=True):
        container.remove(force=True)
    for image in client.images.list(all=True):
        client.images.remove(image.id, force=True)
    assert client.images.list(all=True) == []
    return second_engine


@pytest.fixture
def app1(docker_engine: DockerEngine, test_images: ImagePair, tmp_path: Path) -> Extracted:
    return extract_image(docker_engine.client, test_images.app1, tmp_path, "loaded/app1:1")


# -- loading into a real engine --------------------------------------------------------------


@pytest.mark.docker
def test_load_creates_the_image_in_an_engine_that_lacks_it(
    docker_engine: DockerEngine, test_images: ImagePair, app1: Extracted, target: DockerEngine
) -> None:
    client = target.client
    assert not has_image(client, app1.image.config_digest)

    image_id = load_into_docker(client, app1.image)

    assert image_id == app1.image.config_digest
    assert image_id == docker_engine.client.images.get(test_images.app1).id
    loaded = client.images.get("loaded/app1:1")
    assert loaded.id == image_id
    assert loaded.tags == ["loaded/app1:1"]
    assert rootfs_layers(client, "loaded/app1:1") == list(app1.diff_ids)
    assert rootfs_layers(client, "loaded/app1:1") == rootfs_layers(
        docker_engine.client, test_images.app1
    )
    run = client.containers.run
    assert run("loaded/app1:1", ["cat", "/etc/passwd"], remove=True) == PASSWD
    assert run("loaded/app1:1", ["ls", "/layers"], remove=True) == APP1_LAYERS


def _arriving(image: LoadableImage, fail_after: dict[str, int] | None = None) -> LoadableImage:
    """``image`` with every blob still arriving (PendingBlob), in 64 KiB pieces; a blob in
    ``fail_after`` raises OSError once that many bytes of it went out."""
    from docket_common.loadable import PendingBlob

    def body_of(path: Path, digest: str) -> PendingBlob:
        stop = (fail_after or {}).get(digest)

        def body(_chunk: int) -> Iterator[bytes]:
            with path.open("rb") as file:
                sent = 0
                while piece := file.read(64 * 1024):
                    if stop is not None and sent + len(piece) > stop:
                        raise OSError(f"{digest} hashes to something else")
                    sent += len(piece)
                    yield piece

        return PendingBlob(path.stat().st_size, body)

    blobs = zip(
        (image.config_path, *image.layer_paths),
        (image.config_digest, *image.layer_digests),
        strict=True,
    )
    return replace(image, pending={d: body_of(p, d) for p, d in blobs})


def _layer_ids(engine: DockerEngine) -> list[str]:
    return sorted(p.name for p in (engine.dir / "data" / "image").glob("*/layerdb/sha256/*"))


@pytest.mark.docker
def test_the_base_layer_by_import_and_the_rest_by_archive_make_the_image(
    app1: Extracted, target: DockerEngine
) -> None:
    """load_importing_base: the same image as load_into_docker (its id, tag and layers), runs,
    and the engine keeps no image of the import."""
    client = target.client
    image_id = load_importing_base(client, _arriving(app1.image))
    assert image_id == app1.image.config_digest
    assert [i.id for i in client.images.list(all=True)] == [image_id]
    assert client.images.get("loaded/app1:1").tags == ["loaded/app1:1"]
    assert rootfs_layers(client, "loaded/app1:1") == list(app1.diff_ids)
    run = client.containers.run
    assert run("loaded/app1:1", ["cat", "/etc/passwd"], remove=True) == PASSWD
    assert run("loaded/app1:1", ["ls", "/layers"], remove=True) == APP1_LAYERS


@pytest.mark.docker
@pytest.mark.parametrize("failing", ["base", "top"])
def test_a_layer_failing_while_the_base_is_imported_leaves_no_image_and_no_layer(
    app1: Extracted, target: DockerEngine, failing: str
) -> None:
    """The base layer's bytes failing mid-import, or another layer's while the base is in:
    LoadError, and the engine holds no image (not the import's) and no layer."""
    layers = app1.image.layer_digests
    digest = layers[0] if failing == "base" else layers[-1]
    size = (app1.image.layer_paths[0] if failing == "base" else app1.image.layer_paths[-1]).stat()
    with pytest.raises(LoadError, match="hashes to something else"):
        load_importing_base(target.client, _arriving(app1.image, {digest: size.st_size // 2}))
    assert target.client.images.list(all=True) == []
    assert _layer_ids(target) == []


@pytest.mark.docker
def test_an_import_the_engine_refuses_falls_back_to_the_whole_archive(
    app1: Extracted, target: DockerEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the engine does not take the base layer by import, the image still loads: the
    whole archive is sent again, base layer and all; and later loads into that engine send
    it whole at once."""
    from docket_common import loadable

    def refuse(_client: Any, name: str, _layer: Any) -> str:
        raise LoadError(f"the Docker engine refused the base layer of {name}: injected")

    monkeypatch.setattr(loadable, "import_layer", refuse)
    monkeypatch.setattr(loadable, "_NO_IMPORT", set())
    image_id = load_importing_base(target.client, _arriving(app1.image))
    assert image_id == app1.image.config_digest
    assert rootfs_layers(target.client, "loaded/app1:1") == list(app1.diff_ids)
    # That engine gets the whole archive from then on, without asking it to import.
    monkeypatch.setattr(loadable, "import_layer", None)
    again = replace(_arriving(app1.image), name="loaded/again:2")
    assert load_importing_base(target.client, again) == image_id


@pytest.mark.docker
def test_loading_again_under_another_name_adds_the_tag(
    app1: Extracted, target: DockerEngine
) -> None:
    client = target.client
    first = load_into_docker(client, app1.image)
    second = load_into_docker(client, replace(app1.image, name="loaded/again:2"))
    assert first == second == app1.image.config_digest
    assert sorted(client.images.get(first).tags) == ["loaded/again:2", "loaded/app1:1"]


@pytest.mark.docker
def test_gzip_compressed_layer_loads(app1: Extracted, target: DockerEngine, tmp_path: Path) -> None:
    image = app1.image
    packed_dir = tmp_path / "packed"
    packed_dir.mkdir()
    packed, packed_digest = gzip_file(image.layer_paths[1], packed_dir)
    assert packed_digest != image.layer_digests[1]
    with packed.open("rb") as file:
        assert file.read(2) == b"\x1f\x8b"
    image = replace(
        image,
        layer_paths=(image.layer_paths[0], packed, *image.layer_paths[2:]),
        layer_digests=(image.layer_digests[0], packed_digest, *image.layer_digests[2:]),
    )
    # The archive carries the compressed bytes as they are.
    with tarfile.open(fileobj=io.BytesIO(all_bytes(image))) as tar:
        member = tar.getmember(f"{packed_digest.split(':')[1]}/layer.tar")
        assert member.size == packed.stat().st_size

    assert load_into_docker(target.client, image) == image.config_digest
    assert rootfs_layers(target.client, "loaded/app1:1") == list(app1.diff_ids)
    run = target.client.containers.run
    assert run("loaded/app1:1", ["ls", "/layers"], remove=True) == APP1_LAYERS


def zstd_file(src: Path, dest_dir: Path) -> tuple[Path, str]:
    """zstd `src` into dest_dir, named by the compressed bytes' digest."""
    temp = dest_dir / "compressing.tmp"
    with src.open("rb") as raw, temp.open("wb") as packed:
        zstandard.ZstdCompressor(level=1).copy_stream(raw, packed)
    digest = file_digest(temp)
    final = blob_path(dest_dir, digest)
    temp.rename(final)
    return final, digest


@pytest.mark.docker
def test_a_zstd_layer_is_expanded_for_an_engine_before_docker_23(
    app1: Extracted, target: DockerEngine, tmp_path: Path
) -> None:
    image = app1.image
    packed_dir = tmp_path / "packed"
    packed_dir.mkdir()
    packed, packed_digest = zstd_file(image.layer_paths[1], packed_dir)
    image = replace(
        image,
        layer_paths=(image.layer_paths[0], packed, *image.layer_paths[2:]),
        layer_digests=(image.layer_digests[0], packed_digest, *image.layer_digests[2:]),
    )
    # Expanded, the member is the plain tar, byte for byte, under the zstd blob's name.
    expanded = replace(image, expand_zstd=True)
    with tarfile.open(fileobj=io.BytesIO(all_bytes(expanded, 4096))) as tar:
        member = tar.extractfile(f"{packed_digest.split(':')[1]}/layer.tar")
        assert member is not None
        assert member.read() == app1.image.layer_paths[1].read_bytes()
    assert archive_size(expanded) == len(all_bytes(expanded))
    # Not expanded, the archive carries the zstd bytes as they are.
    with tarfile.open(fileobj=io.BytesIO(all_bytes(image))) as tar:
        assert (
            tar.getmember(f"{packed_digest.split(':')[1]}/layer.tar").size == packed.stat().st_size
        )

    version = target.client.version()
    assert not engine_reads_zstd(version), version["ApiVersion"]  # Debian's dockerd 20.10
    assert engine_reads_zstd({"ApiVersion": "1.43"})
    assert load_into_docker(target.client, image) == image.config_digest
    assert rootfs_layers(target.client, "loaded/app1:1") == list(app1.diff_ids)
    run = target.client.containers.run
    assert run("loaded/app1:1", ["ls", "/layers"], remove=True) == APP1_LAYERS


@pytest.mark.docker
def test_an_image_named_by_digest_loads_untagged(app1: Extracted, target: DockerEngine) -> None:
    name = "loaded/app1@sha256:" + "0" * 64
    assert load_into_docker(target.client, replace(app1.image, name=name)) == (
        app1.image.config_digest
    )
    assert target.client.images.get(app1.image.config_digest).tags == []


def _with_layer_again(
    image: LoadableImage, diff_ids: tuple[str, ...], index: int, work: Path
) -> LoadableImage:
    """``image`` with its layer ``index`` again on top: the layer, its diff id in a new
    config (written to work/<hex>) and a history entry."""
    image = replace(
        image,
        layer_paths=(*image.layer_paths, image.layer_paths[index]),
        layer_digests=(*image.layer_digests, image.layer_digests[index]),
    )
    config = json.loads(image.config_path.read_bytes())
    config["rootfs"]["diff_ids"] = [*diff_ids, diff_ids[index]]
    config["history"].append({"created_by": f"layer {index} again"})
    data = json.dumps(config).encode()
    config_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(work, config_digest).write_bytes(data)
    return replace(image, config_path=blob_path(work, config_digest), config_digest=config_digest)


@pytest.mark.docker
def test_a_layer_used_twice_loads(target: DockerEngine, tmp_path: Path) -> None:
    image, diff_ids = synthetic_image(
        tmp_path, "loaded/twice:1", [{"a.bin": b"a\n"}, {"b.bin": b"b\n"}], seed="twice"
    )
    # base, a, b, a: layer "a" appears twice but is stored once.
    image = _with_layer_again(image, diff_ids, 1, tmp_path)
    config_digest = image.config_digest

    assert load_into_docker(target.client, image) == config_digest
    assert rootfs_layers(target.client, "loaded/twice:1") == [*diff_ids, diff_ids[1]]
    run = target.client.containers.run
    assert run("loaded/twice:1", ["cat", "/data/a.bin", "/data/b.bin"], remove=True) == b"a\nb\n"


@pytest.mark.docker
def test_a_base_layer_used_again_higher_up_goes_in_the_archive(
    target: DockerEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base, a, base: the third layer's chain needs the base layer's file, so the base is
    not imported (which would leave the file out) but sent in the archive."""
    from docket_common import loadable

    image, diff_ids = synthetic_image(
        tmp_path, "loaded/base-again:1", [{"a.bin": b"a\n"}], seed="base-again"
    )
    image = _with_layer_again(image, diff_ids, 0, tmp_path)
    config_digest = image.config_digest

    imports: list[str] = []

    def no_import(_client: Any, name: str, _layer: Any) -> str:
        imports.append(name)
        raise LoadError("the base layer was imported")

    monkeypatch.setattr(loadable, "import_layer", no_import)
    assert load_importing_base(target.client, _arriving(image)) == config_digest
    assert rootfs_layers(target.client, "loaded/base-again:1") == [*diff_ids, diff_ids[0]]
    assert imports == []


@pytest.mark.docker
def test_load_streams_a_big_layer_with_flat_memory(target: DockerEngine, tmp_path: Path) -> None:
    image, diff_ids = synthetic_image(tmp_path, "loaded/big:1", [{"big.bin": 64 * MiB}], seed="big")
    assert image.layer_paths[1].stat().st_size > 64 * MiB

    tracemalloc.start()
    try:
        image_id = load_into_docker(target.client, image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert image_id == image.config_digest
    assert peak < 12 * MiB, f"peak {peak / MiB:.1f} MiB while loading a 64 MiB layer"
    assert rootfs_layers(target.client, "loaded/big:1") == list(diff_ids)
    run = target.client.containers.run
    assert run("loaded/big:1", ["ls", "-l", "/data/big.bin"], remove=True).split()[4] == (
        str(64 * MiB).encode()
    )


# -- failures --------------------------------------------------------------------------------


@pytest.mark.docker
def test_layer_not_matching_its_diff_id_is_refused(
    docker_engine: DockerEngine,
    test_images: ImagePair,
    app1: Extracted,
    target: DockerEngine,
    tmp_path: Path,
) -> None:
    # The top layer's file holds app2's top layer: a valid tar, but not the one the config
    # names, as a corrupted or swapped blob would.
    app2 = extract_image(docker_engine.client, test_images.app2, tmp_path / "app2", "x/app2:1")
    wrong_path, wrong_digest = app2.image.layer_paths[-1], app2.image.layer_digests[-1]
    assert wrong_digest not in app1.diff_ids
    image = replace(
        app1.image,
        name="loaded/broken:1",
        layer_paths=(*app1.image.layer_paths[:-1], wrong_path),
        layer_digests=(*app1.image.layer_digests[:-1], wrong_digest),
    )

    with pytest.raises(LoadError) as caught:
        load_into_docker(target.client, image)

    message = str(caught.value)
    assert "\n" not in message
    assert "refused loaded/broken:1" in message
    assert str(target.socket_path) in message
    # The engine's own words: "invalid diffID for layer 2: expected ..., got ..."
    assert "invalid diffID for layer 2" in message
    assert app1.diff_ids[-1] in message
    assert wrong_digest in message
    assert not has_image(target.client, "loaded/broken:1")
    assert not has_image(target.client, app1.image.config_digest)


@pytest.mark.docker
@pytest.mark.usefixtures("docker_engine")  # for its skip-or-fail when dockerd is missing
@pytest.mark.parametrize(
    ("listening", "reason"),
    [(False, "No such file or directory"), (True, "Connection refused")],
    ids=["no-socket", "stale-socket"],
)
def test_unreachable_engine(tmp_path: Path, listening: bool, reason: str) -> None:
    image, _ = synthetic_image(tmp_path / "blobs", "loaded/nowhere:1", [], seed="nowhere")
    socket_path = tmp_path / "dockerd.sock"
    with contextlib.ExitStack() as stack:
        if listening:  # a socket file nobody accepts on, as a dead dockerd leaves behind
            stale = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            stale.bind(str(socket_path))
        # An explicit API version: "auto" would ask the (missing) engine when the client is made.
        client = docker.DockerClient(base_url=f"unix://{socket_path}", version="1.41", timeout=5)
        stack.callback(client.close)
        with pytest.raises(LoadError) as caught:
            load_into_docker(client, image)
    message = str(caught.value)
    assert message == (
        f"cannot reach the Docker engine at unix://{socket_path} ({reason}); "
        "is dockerd running, and is DOCKER_HOST right?"
    )


@pytest.mark.docker
def test_missing_layer_file_fails_before_contacting_the_engine(
    app1: Extracted, target: DockerEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = app1.image.layer_paths[1]
    missing.unlink()
    calls: list[Any] = []
    monkeypatch.setattr(target.client.api, "load_image", lambda *a, **k: calls.append(a))

    with pytest.raises(LoadError) as caught:
        load_into_docker(target.client, app1.image)

    assert calls == []
    assert str(caught.value) == (f"cannot load loaded/app1:1: {missing}: No such file or directory")
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        archive_size(app1.image)
    with pytest.raises(FileNotFoundError):
        archive_chunks(app1.image)  # at the call, not at the first chunk


@pytest.mark.docker
def test_blob_that_changes_while_sending_aborts_the_load(
    app1: Extracted, target: DockerEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = app1.image.layer_paths[-1]
    real_open = Path.open

    def shrinking_open(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path == layer:  # the base layer has already gone to the engine by now
            with real_open(layer, "r+b") as file:
                file.truncate(100)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", shrinking_open)
    with pytest.raises(
        LoadError, match="^" + re.escape(f"cannot load loaded/app1:1: {layer} changed size")
    ):
        load_into_docker(target.client, app1.image)
    monkeypatch.undo()
    assert not has_image(target.client, "loaded/app1:1")
    assert target.client.ping()


# -- the archive itself ----------------------------------------------------------------------


@pytest.mark.docker
def test_archive_size_is_exact(app1: Extracted) -> None:
    size = archive_size(app1.image)
    assert size % 512 == 0
    for chunk_size in (1, 511, 4096, 1 << 20):
        chunks = list(archive_chunks(app1.image, chunk_size))
        assert sum(map(len, chunks)) == size
        assert max(map(len, chunks)) <= max(chunk_size, 1024)
    assert all_bytes(app1.image).endswith(bytes(1024))


@pytest.mark.docker
def test_written_archive_round_trips_through_image_archive(app1: Extracted, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "app1.tar"
    dest.parent.mkdir()
    write_archive(app1.image, dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["app1.tar"]  # no temp file left
    assert dest.stat().st_size == archive_size(app1.image)
    assert dest.read_bytes() == all_bytes(app1.image)

    with ImageArchive(dest) as archive:
        (found,) = archive.images
        assert archive.find("loaded/app1:1") == found
        assert found.repo_tags == ("loaded/app1:1",)
        assert found.layout == "legacy"
        assert found.config.digest == app1.image.config_digest
        assert found.diff_ids == app1.diff_ids
        assert tuple(layer.digest for layer in found.layers) == app1.image.layer_digests
        for layer, path in zip(found.layers, app1.image.layer_paths, strict=True):
            with archive.open_blob(layer) as blob:
                assert stream_digest(blob) == file_digest(path)

    with tarfile.open(dest) as tar:
        names = tar.getnames()
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None
        with manifest_file:
            manifest = json.load(manifest_file)
    hexes = [d.split(":")[1] for d in app1.image.layer_digests]
    config_hex = app1.image.config_digest.split(":")[1]
    assert manifest == [
        {
            "Config": f"{config_hex}.json",
            "RepoTags": ["loaded/app1:1"],
            "Layers": [f"{h}/layer.tar" for h in hexes],
        }
    ]
    assert "repositories" not in names
    assert sorted(names) == sorted(
        [f"{config_hex}.json", "manifest.json"] + [n for h in hexes for n in (h, f"{h}/layer.tar")]
    )


def test_write_archive_replaces_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    image, _ = synthetic_image(tmp_path / "blobs", "loaded/w:1", [{"x": b"x"}], seed="w")
    dest = tmp_path / "out.tar"
    dest.write_bytes(b"old")
    write_archive(image, dest)
    written = dest.read_bytes()
    assert written == all_bytes(image)

    # A blob that shrinks while it is read: the half-written temporary file goes away.
    layer = image.layer_paths[1]
    real_open = Path.open

    def shrinking_open(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path == layer:
            with real_open(layer, "r+b") as file:
                file.truncate(100)
        return real_open(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "open", shrinking_open)
        with pytest.raises(OSError, match="changed size"):
            write_archive(image, dest)
    assert dest.read_bytes() == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs", "out.tar"]

    layer.unlink()
    with pytest.raises(FileNotFoundError):
        write_archive(image, dest)
    assert dest.read_bytes() == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs", "out.tar"]


def test_a_layer_used_twice_is_written_once(tmp_path: Path) -> None:
    image, _ = synthetic_image(tmp_path, "loaded/t:1", [{"a": b"a"}], seed="t")
    image = replace(
        image,
        layer_paths=(*image.layer_paths, image.layer_paths[1]),
        layer_digests=(*image.layer_digests, image.layer_digests[1]),
    )
    with tarfile.open(fileobj=io.BytesIO(all_bytes(image))) as tar:
        names = tar.getnames()
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None
        with manifest_file:
            layers = json.load(manifest_file)[0]["Layers"]
    hexes = [d.split(":")[1] for d in image.layer_digests]
    assert layers == [f"{h}/layer.tar" for h in hexes]
    assert layers[1] == layers[2]
    assert names.count(layers[1]) == 1
    assert len(names) == 1 + 2 * 2 + 1  # config, 2 x (dir, layer.tar), manifest.json
    assert archive_size(image) == len(all_bytes(image))


def test_streaming_a_64_mib_layer_keeps_memory_flat(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as file:
        stream = PseudoRandomStream(64 * MiB + 123, seed="flat")
        while chunk := stream.read(MiB):
            file.write(chunk)
    config = tmp_path / "config.json"
    config.write_bytes(b'{"rootfs":{"type":"layers","diff_ids":[]}}')
    image = LoadableImage("loaded/flat:1", config, file_digest(config), (big,), (file_digest(big),))
    size = archive_size(image)
    assert size > 64 * MiB

    total = 0
    tracemalloc.start()
    try:
        for chunk in archive_chunks(image):
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert peak < 4 * MiB, f"peak {peak / MiB:.1f} MiB while streaming a 64 MiB layer"


def test_a_layer_of_8_gib_or_more_gets_a_pax_size(tmp_path: Path) -> None:
    huge = tmp_path / "huge.tar"
    with huge.open("wb") as file:
        file.truncate(9 * 1024 * MiB + 1)  # sparse: nothing is written
    config = tmp_path / "config.json"
    config.write_bytes(b"{}")
    image = LoadableImage(
        "loaded/huge:1", config, file_digest(config), (huge,), ("sha256:" + "a" * 64,)
    )
    chunks = archive_chunks(image)
    head = b"".join(next(chunks) for _ in range(5))  # config header+body+pad, dir, layer header
    chunks.close()  # type: ignore[attr-defined]
    with tarfile.open(fileobj=io.BytesIO(head)) as tar:
        infos = [tar.next() for _ in range(3)]
    assert [(i.name, i.size) for i in infos if i is not None] == [
        (f"{image.config_digest.split(':')[1]}.json", 2),
        ("a" * 64, 0),
        ("a" * 64 + "/layer.tar", 9 * 1024 * MiB + 1),
    ]
    manifest = json.dumps(
        [
            {
                "Config": infos[0].name if infos[0] else "",
                "RepoTags": ["loaded/huge:1"],
                "Layers": ["a" * 64 + "/layer.tar"],
            }
        ],
        separators=(",", ":"),
    )
    body = -(-(9 * 1024 * MiB + 1) // 512) * 512
    manifest_member = 512 + -(-len(manifest) // 512) * 512
    assert archive_size(image) == len(head) + body + manifest_member + 1024


def test_a_file_that_changes_size_is_caught(tmp_path: Path) -> None:
    image, _ = synthetic_image(tmp_path, "loaded/c:1", [{"x": b"x"}], seed="c")
    chunks = archive_chunks(image)
    with image.layer_paths[1].open("ab") as file:
        file.write(b"more")
    with pytest.raises(OSError, match="changed size"):
        b"".join(chunks)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"config_digest": "sha256:abc"}, "not a digest"),
        ({"layer_digests": ("sha256:" + "0" * 64, "../../etc")}, "not a digest"),
        ({"layer_digests": ("sha256:" + "0" * 64,)}, "2 layer paths but 1 layer digests"),
        ({"name": ""}, "not a repo:tag"),
    ],
)
def test_loadable_image_checks_its_fields(changes: dict[str, Any], error: str) -> None:
    fields: dict[str, Any] = {
        "name": "a/b:1",
        "config_path": Path("c"),
        "config_digest": "sha256:" + "1" * 64,
        "layer_paths": (Path("l0"), Path("l1")),
        "layer_digests": ("sha256:" + "0" * 64, "sha256:" + "2" * 64),
    }
    with pytest.raises(ValueError, match=error):
        LoadableImage(**{**fields, **changes})


def test_chunk_size_must_be_positive(tmp_path: Path) -> None:
    image, _ = synthetic_image(tmp_path, "loaded/z:1", [], seed="z")
    with pytest.raises(ValueError, match="chunk_size"):
        archive_chunks(image, 0)


def test_pending_blobs_give_the_same_archive_as_files_and_a_short_one_fails(
    tmp_path: Path,
) -> None:
    """Blobs still arriving (PendingBlob) are read from their body as the archive is made:
    the archive is byte for byte the one made from the files; a body that ends early or
    runs long raises OSError, which breaks a load off before the archive's end."""
    from docket_common.loadable import PendingBlob

    config = b'{"rootfs": {"type": "layers", "diff_ids": []}}'
    layer = bytes(range(256)) * 700
    paths = {}
    for name, data in (("config", config), ("layer", layer)):
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    digests = {
        k: "sha256:" + hashlib.sha256(v).hexdigest()
        for k, v in (("config", config), ("layer", layer))
    }
    image = LoadableImage(
        name="pending/one:1",
        config_path=paths["config"],
        config_digest=digests["config"],
        layer_paths=(paths["layer"],),
        layer_digests=(digests["layer"],),
    )
    whole = b"".join(archive_chunks(image))

    def body_of(data: bytes) -> PendingBlob:
        def body(chunk: int) -> Iterator[bytes]:
            for i in range(0, len(data), 1000):  # as pieces come, not as chunk_size asks
                yield data[i : i + 1000]

        return PendingBlob(len(data), body)

    gone = tmp_path / "not-yet"
    pending = replace(
        image,
        config_path=gone,
        layer_paths=(gone,),
        pending={digests["config"]: body_of(config), digests["layer"]: body_of(layer)},
    )
    assert b"".join(archive_chunks(pending)) == whole
    short = replace(
        pending,
        pending={
            **pending.pending,
            digests["layer"]: PendingBlob(len(layer), body_of(layer[:-1]).body),
        },
    )
    with pytest.raises(OSError, match="ended after"):
        b"".join(archive_chunks(short))
    long = replace(
        pending,
        pending={
            **pending.pending,
            digests["layer"]: PendingBlob(len(layer), body_of(layer + b"x").body),
        },
    )
    with pytest.raises(OSError, match="came with more"):
        b"".join(archive_chunks(long))
