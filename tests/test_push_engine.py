"""docketctl push from a real Docker engine (DOCKER_HOST), and of the OCI layout Docker >= 25
writes, against a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.dockerd import DockerEngine
from tests.support.images import ImagePair, legacy_to_oci, save_image
from tests.support.server import ServerProcess, docketctl

pytestmark = pytest.mark.docker


def push(server: ServerProcess, engine: DockerEngine, *args: str) -> dict[str, object]:
    result = docketctl("push", *args, "-o", "json", server=server, env=engine.env())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def engine_layers(engine: DockerEngine, ref: str) -> tuple[str, list[str]]:
    image = engine.client.images.get(ref)
    return image.id, list(image.attrs["RootFS"]["Layers"])


def test_push_from_the_engine_then_the_sibling_reuses_the_base(
    server: ServerProcess, docker_engine: DockerEngine, test_images: ImagePair
) -> None:
    first = push(server, docker_engine, test_images.app1)
    image_id, diff_ids = engine_layers(docker_engine, test_images.app1)
    pushed = first["image"]
    assert isinstance(pushed, dict)
    assert pushed["name"] == test_images.app1
    assert pushed["config"]["digest"] == image_id  # the engine's image id is its config digest
    assert [layer["digest"] for layer in pushed["layers"]] == diff_ids
    assert len(diff_ids) == 3  # base + two COPY layers
    assert first["reused_digests"] == []
    # The server lacked every layer: each went up while the engine was still exporting.
    assert first["streamed_digests"] == first["uploaded_digests"]

    second = push(server, docker_engine, test_images.app2)
    _, diff_ids2 = engine_layers(docker_engine, test_images.app2)
    assert diff_ids2[0] == diff_ids[0]
    assert second["reused_digests"] == [diff_ids[0]]  # the shared base is not sent again
    assert set(second["uploaded_digests"]) == {  # type: ignore[arg-type]
        engine_layers(docker_engine, test_images.app2)[0],
        diff_ids2[1],
    }
    assert second["uploaded_bytes"] < first["uploaded_bytes"]  # type: ignore[operator]
    # Engines before Docker 25 (Debian 12's) write legacy archives, where a layer's digest
    # shows only once it is read: with the base on the server, the new layer waits for the
    # whole archive (rather than risk uploading one the server has). The config is named by
    # its file: it went up during the export. Later engines name every blob.
    oci = int(docker_engine.client.version()["Version"].split(".")[0]) >= 25
    config = engine_layers(docker_engine, test_images.app2)[0]
    assert second["streamed_digests"] == (second["uploaded_digests"] if oci else [config])

    # The human output says so too.
    again = docketctl("push", test_images.app2, server=server, env=docker_engine.env())
    assert again.returncode == 0, again.stderr
    assert "3 of 3 blobs already on the server" in again.stderr


def test_oci_layout_archive_gives_the_same_blobs(
    server: ServerProcess, docker_engine: DockerEngine, test_images: ImagePair, tmp_path: Path
) -> None:
    legacy = save_image(docker_engine.client, test_images.app1, tmp_path / "legacy.tar")
    oci = legacy_to_oci(legacy, tmp_path / "oci.tar")
    from_oci = push(server, docker_engine, "oci/app:1", "--archive", str(oci))
    image_id, diff_ids = engine_layers(docker_engine, test_images.app1)
    image = from_oci["image"]
    assert isinstance(image, dict)
    assert [layer["digest"] for layer in image["layers"]] == diff_ids
    assert image["config"]["digest"] == image_id
    # The same image from the legacy archive is the same digest, with nothing to upload.
    from_legacy = push(server, docker_engine, "legacy/app:1", "--archive", str(legacy))
    assert from_legacy["image"]["digest"] == image["digest"]  # type: ignore[index]
    assert from_legacy["uploaded_digests"] == []


def test_engine_errors_are_one_line(
    server: ServerProcess, docker_engine: DockerEngine, tmp_path: Path
) -> None:
    missing = docketctl("push", "not-there:1", server=server, env=docker_engine.env())
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "docketctl: error: image not-there:1 not found in the local Docker engine"
    ]
    env = docker_engine.env() | {"DOCKER_HOST": f"unix://{tmp_path}/no.sock"}
    unreachable = docketctl("push", "x:1", server=server, env=env)
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("docketctl: error: cannot reach the Docker engine")
    assert len(unreachable.stderr.strip().splitlines()) == 1
