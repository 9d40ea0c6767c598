"""Tests of the test infrastructure itself: the private engine and the test images."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import tarfile
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.support.dockerd import DockerEngine, _mount_points_under, _pids_referring_to
from tests.support.images import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    ImagePair,
    PseudoRandomStream,
    legacy_to_oci,
    make_base_image,
    normalize_image_name,
    pseudo_random_bytes,
    save_image,
)

# -- helpers ------------------------------------------------------------------------------


def _read_json(tar: tarfile.TarFile, name: str) -> Any:
    file = tar.extractfile(name)
    assert file is not None, name
    with file:
        return json.load(file)


def check_oci_layout(path: Path) -> dict[str, Any]:
    """Assert that an OCI-layout tar is self-consistent; return its parsed documents.

    Every blob hashes to its name; index -> manifest -> config/layers descriptors name
    existing blobs of the right size; manifest.json agrees with the OCI manifests; and each
    config's diff_ids are its (uncompressed) layers' digests.
    """
    with tarfile.open(path) as tar:
        names = set(tar.getnames())
        assert {"oci-layout", "index.json", "manifest.json"} <= names
        assert _read_json(tar, "oci-layout") == {"imageLayoutVersion": "1.0.0"}

        sizes: dict[str, int] = {}
        for member in tar.getmembers():
            if not (member.isfile() and member.name.startswith("blobs/sha256/")):
                continue
            file = tar.extractfile(member)
            assert file is not None
            digest = hashlib.sha256()
            with file:
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
            hex_digest = member.name.rsplit("/", 1)[1]
            assert digest.hexdigest() == hex_digest, f"{member.name} does not hash to its name"
            sizes[f"sha256:{hex_digest}"] = member.size

        def blob(descriptor: dict[str, Any]) -> Any:
            assert sizes.get(descriptor["digest"]) == descriptor["size"], descriptor
            return _read_json(tar, "blobs/sha256/" + descriptor["digest"].split(":", 1)[1])

        index = _read_json(tar, "index.json")
        assert index["schemaVersion"] == 2
        assert index["mediaType"] == OCI_INDEX
        manifests: dict[str, Any] = {}
        for descriptor in index["manifests"]:
            assert descriptor["mediaType"] == OCI_MANIFEST
            manifest = blob(descriptor)
            assert manifest["mediaType"] == OCI_MANIFEST
            assert manifest["config"]["mediaType"] == OCI_CONFIG
            config = blob(manifest["config"])
            for layer in manifest["layers"]:
                assert layer["mediaType"] == OCI_LAYER
                assert sizes.get(layer["digest"]) == layer["size"], layer
            assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in manifest["layers"]]
            manifests[descriptor["digest"]] = manifest

        docker_manifest = _read_json(tar, "manifest.json")
        for entry in docker_manifest:
            assert entry["Config"] in names
            assert all(layer in names for layer in entry["Layers"])
            matching = [
                m
                for m in manifests.values()
                if "blobs/sha256/" + m["config"]["digest"].split(":", 1)[1] == entry["Config"]
            ]
            assert matching, entry
            assert entry["Layers"] == [
                "blobs/sha256/" + layer["digest"].split(":", 1)[1]
                for layer in matching[0]["layers"]
            ]
        return {"index": index, "manifests": manifests, "manifest.json": docker_manifest}


# -- without docker -----------------------------------------------------------------------


def test_pseudo_random_stream_is_deterministic_whatever_the_read_sizes() -> None:
    size = 3 * 1024 * 1024 + 17
    whole = pseudo_random_bytes(size, seed=7)
    assert len(whole) == size
    stream = PseudoRandomStream(size, seed=7)
    pieces = []
    for n in (1, 100, 1 << 20, 12345, 1 << 21, 1 << 22):
        pieces.append(stream.read(n))
    assert stream.read(10) == b""
    assert b"".join(pieces) == whole
    assert pseudo_random_bytes(1000, seed=8) != whole[:1000]
    assert pseudo_random_bytes(1000, seed="x") == pseudo_random_bytes(1000, seed="x")


def test_normalize_image_name() -> None:
    assert normalize_image_name("app:1") == "docker.io/library/app:1"
    assert normalize_image_name("app") == "docker.io/library/app:latest"
    assert normalize_image_name("org/app:2") == "docker.io/org/app:2"
    assert normalize_image_name("localhost:5000/app:3") == "localhost:5000/app:3"
    assert normalize_image_name("ghcr.io/o/app:4") == "ghcr.io/o/app:4"


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_legacy_to_oci_follows_symlinked_duplicate_layers(tmp_path: Path) -> None:
    """docker save writes a layer whose content it already wrote as a relative symlink."""
    layer_a = _tar_bytes({"a.txt": b"a"})
    layer_b = _tar_bytes({"b.txt": b"b"})
    diff = {
        name: "sha256:" + hashlib.sha256(data).hexdigest()
        for name, data in (("a", layer_a), ("b", layer_b))
    }
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff["a"], diff["b"], diff["a"]]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [
        {
            "Config": config_name,
            "RepoTags": ["app:7"],
            "Layers": ["1" * 64 + "/layer.tar", "2" * 64 + "/layer.tar", "3" * 64 + "/layer.tar"],
        }
    ]
    legacy = tmp_path / "legacy.tar"
    with tarfile.open(legacy, "w") as tar:
        for name, data in (
            (config_name, config),
            ("manifest.json", json.dumps(manifest).encode()),
            ("1" * 64 + "/layer.tar", layer_a),
            ("2" * 64 + "/layer.tar", layer_b),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("3" * 64 + "/layer.tar")
        link.type = tarfile.SYMTYPE
        link.linkname = "../" + "1" * 64 + "/layer.tar"
        tar.addfile(link)

    out = legacy_to_oci(legacy, tmp_path / "oci.tar")
    docs = check_oci_layout(out)
    (entry,) = docs["index"]["manifests"]
    assert entry["annotations"] == {
        "io.containerd.image.name": "docker.io/library/app:7",
        "org.opencontainers.image.ref.name": "7",
    }
    (oci_manifest,) = docs["manifests"].values()
    assert [layer["digest"] for layer in oci_manifest["layers"]] == [
        diff["a"],
        diff["b"],
        diff["a"],
    ]
    with tarfile.open(out) as tar:  # the duplicate is stored once
        assert sum(name.startswith("blobs/sha256/") for name in tar.getnames()) == 2 + 1 + 1


def test_legacy_to_oci_rejects_a_layer_that_does_not_match_its_diff_id(tmp_path: Path) -> None:
    layer = _tar_bytes({"a.txt": b"a"})
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}).encode()
    manifest = [{"Config": "c.json", "RepoTags": ["app:1"], "Layers": ["l/layer.tar"]}]
    legacy = tmp_path / "legacy.tar"
    legacy.write_bytes(
        _tar_bytes(
            {"c.json": config, "manifest.json": json.dumps(manifest).encode(), "l/layer.tar": layer}
        )
    )
    with pytest.raises(ValueError, match="hashes to"):
        legacy_to_oci(legacy, tmp_path / "oci.tar")
    assert not (tmp_path / "oci.tar").exists()


# -- with the private engine --------------------------------------------------------------


@pytest.mark.docker
def test_engine_answers_ping_and_reports_its_version(docker_engine: DockerEngine) -> None:
    client = docker_engine.client
    assert client.ping() is True
    version = client.version()
    print(
        f"dockerd {version['Version']} (API {version['ApiVersion']}),"
        f" storage driver {docker_engine.storage_driver},"
        f" started in {docker_engine.start_seconds:.2f}s"
    )
    assert version["Version"]
    assert client.info()["Driver"] == docker_engine.storage_driver
    assert docker_engine.host == f"unix://{docker_engine.socket_path}"
    assert docker_engine.socket_path.is_socket()
    assert len(str(docker_engine.socket_path)) < 108
    assert docker_engine.env()["DOCKER_HOST"] == docker_engine.host


@pytest.mark.docker
def test_base_image_runs(docker_engine: DockerEngine, test_images: ImagePair) -> None:
    client = docker_engine.client
    assert client.containers.run(test_images.base, ["echo", "hi"], remove=True) == b"hi\n"
    listing = client.containers.run(test_images.base, ["ls", "-l", "/data"], remove=True)
    assert b"base.bin" in listing
    assert b" 2097152 " in listing


@pytest.mark.docker
def test_pair_shares_the_base_layers(docker_engine: DockerEngine, test_images: ImagePair) -> None:
    images = docker_engine.client.images

    def layers(tag: str) -> list[str]:
        return list(images.get(tag).attrs["RootFS"]["Layers"])

    base, app1, app2 = layers(test_images.base), layers(test_images.app1), layers(test_images.app2)
    assert len(base) == 1
    assert app1[: len(base)] == base
    assert app2[: len(base)] == base
    assert len(app1) == len(base) + 2
    assert len(app2) == len(base) + 1
    assert len(set(app1[1:]) | set(app2[1:])) == 3  # every added layer is distinct


@pytest.mark.docker
def test_legacy_save_converts_to_a_consistent_oci_layout(
    docker_engine: DockerEngine, test_images: ImagePair, tmp_path: Path
) -> None:
    image = docker_engine.client.images.get(test_images.app1)
    legacy = save_image(docker_engine.client, test_images.app1, tmp_path / "app1.tar")
    with tarfile.open(legacy) as tar:
        (entry,) = _read_json(tar, "manifest.json")
    assert entry["RepoTags"] == [test_images.app1]
    assert all(layer.endswith("/layer.tar") for layer in entry["Layers"])

    docs = check_oci_layout(legacy_to_oci(legacy, tmp_path / "app1-oci.tar"))
    (index_entry,) = docs["index"]["manifests"]
    assert index_entry["annotations"] == {
        "io.containerd.image.name": "docker.io/" + test_images.app1,
        "org.opencontainers.image.ref.name": "1",
    }
    manifest = docs["manifests"][index_entry["digest"]]
    assert manifest["config"]["digest"] == image.id
    assert [layer["digest"] for layer in manifest["layers"]] == image.attrs["RootFS"]["Layers"]
    (docker_entry,) = docs["manifest.json"]
    assert docker_entry["RepoTags"] == [test_images.app1]
    assert docker_entry["Config"] == "blobs/sha256/" + image.id.split(":", 1)[1]


@pytest.mark.docker
def test_saved_image_loads_back_after_removal(
    docker_engine: DockerEngine, test_images: ImagePair, tmp_path: Path
) -> None:
    client = docker_engine.client
    image_id = client.images.get(test_images.app1).id
    saved = save_image(client, test_images.app1, tmp_path / "app1.tar")
    client.images.remove(test_images.app1)
    try:
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get(test_images.app1)
    finally:
        with saved.open("rb") as file:  # also restores the session's image on failure
            (loaded,) = client.images.load(file)
    assert loaded.id == image_id
    assert test_images.app1 in client.images.get(test_images.app1).tags
    assert client.containers.run(test_images.app1, ["ls", "/layers"], remove=True) == (
        b"app1-0.bin\napp1-1.bin\n"
    )


@pytest.mark.docker
def test_save_loads_into_a_second_engine_running_alongside(
    docker_engine: DockerEngine, test_images: ImagePair, tmp_path: Path
) -> None:
    saved = save_image(docker_engine.client, test_images.app2, tmp_path / "app2.tar")
    image_id = docker_engine.client.images.get(test_images.app2).id
    with DockerEngine() as other:
        assert other.dir != docker_engine.dir
        with saved.open("rb") as file:
            (loaded,) = other.client.images.load(file)
        assert loaded.id == image_id
        assert other.client.containers.run(test_images.app2, ["echo", "hi"], remove=True) == (
            b"hi\n"
        )
        assert docker_engine.client.ping()  # the session's engine is not disturbed


@pytest.mark.docker
@pytest.mark.usefixtures("docker_engine")  # for its skip-or-fail when dockerd is missing
def test_killed_engine_leaves_nothing_behind() -> None:
    """SIGKILLed dockerd: stop() still ends its containers, containerd and shims, unmounts
    and deletes its directory."""
    engine = DockerEngine().start()
    directory = engine.dir
    try:
        make_base_image(engine.client, "docket-test/sleeper:1")
        container = engine.client.containers.run(
            "docket-test/sleeper:1", ["/bin/busybox", "sleep", "600"], detach=True
        )
        container.reload()
        container_pid = int(container.attrs["State"]["Pid"])
        assert container_pid > 0
        assert engine._proc is not None
        os.kill(engine._proc.pid, signal.SIGKILL)
        engine._proc.wait()
    finally:
        engine.stop()
    assert not directory.exists()
    assert _mount_points_under(directory) == []
    assert _pids_referring_to(directory) == []
    cmdline = Path(f"/proc/{container_pid}/cmdline")
    assert not cmdline.exists() or cmdline.read_bytes() == b""  # gone (or an unreaped zombie)
