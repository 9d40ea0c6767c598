"""The registry HTTP face against a real docket-server, request by request: uploads (whole,
chunked, mounted, broken off, after a restart), manifests and indexes (stored byte for byte,
negotiated by Accept), discovery, referrers, deletes, authentication, and every bad input
with its spec error code and nothing half stored."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from docket_common.pb import image_service_pb2 as pb
from docket_common.pb import image_service_pb2_grpc as pb_grpc
from tests.support.oci import (
    DOCKER_MANIFEST,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,
    build_image,
    build_index,
    descriptor,
    error_code,
    expect_error,
    sha256,
    tar_of,
)
from tests.support.server import ServerProcess


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests of this module that do not stop it or look at its disk."""
    proc = ServerProcess(data_dir=tmp_path_factory.mktemp("registry-http") / "server").start()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture
def client(shared: ServerProcess) -> RegistryClient:
    return shared.registry_client()


@pytest.fixture
def images(shared: ServerProcess) -> Iterator[pb_grpc.ImageServiceStub]:
    with shared.channel() as channel:
        yield pb_grpc.ImageServiceStub(channel)


def temp_files(server: ServerProcess) -> list[Path]:
    return sorted((server.data_dir / "tmp").iterdir())


def layer(seed: str, size: int = 4096) -> bytes:
    return tar_of({f"{seed}.bin": (seed.encode() * size)[:size]})


# --- base, blobs -------------------------------------------------------------------------


def test_base_answers_with_the_api_version(client: RegistryClient) -> None:
    for method in ("GET", "HEAD"):
        response = client.request(method, "/v2/")
        assert response.status_code == 200
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_monolithic_upload_then_get_head_and_ranges(
    client: RegistryClient, images: pb_grpc.ImageServiceStub
) -> None:
    data = layer("mono", 300_000)
    digest = sha256(data)
    put = client.push_blob("http/mono", data)
    assert put.status_code == 201, put.text
    assert put.headers["Docker-Content-Digest"] == digest
    assert put.headers["Location"] == f"/v2/http/mono/blobs/{digest}"

    head = client.request("HEAD", f"/v2/http/mono/blobs/{digest}")
    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Docker-Content-Digest"] == digest
    assert head.content == b""
    got = client.request("GET", f"/v2/http/mono/blobs/{digest}")
    assert got.status_code == 200
    assert got.content == data

    part = client.request("GET", f"/v2/x/blobs/{digest}", headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206
    assert part.content == data[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    tail = client.request("GET", f"/v2/x/blobs/{digest}", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206
    assert tail.content == data[-10:]
    near_end = len(data) - 10
    open_end = client.request(
        "GET", f"/v2/x/blobs/{digest}", headers={"Range": f"bytes={near_end}-"}
    )
    assert open_end.content == data[near_end:]
    past = client.request("GET", f"/v2/x/blobs/{digest}", headers={"Range": f"bytes={len(data)}-"})
    assert past.status_code == 416
    assert past.headers["Content-Range"] == f"bytes */{len(data)}"
    assert error_code(past) == "RANGE_INVALID"

    # The same store as the gRPC API: the blob is there, with its torrent.
    assert list(images.StatBlobs(pb.StatBlobsRequest(digests=[digest])).missing_digests) == []
    torrent = images.GetTorrent(pb.GetTorrentRequest(digest=digest)).torrent
    assert torrent.piece_count == -(-len(data) // (64 * 1024))  # 64 KiB pieces


def test_unknown_blob_and_bad_digests(client: RegistryClient) -> None:
    missing = client.request("GET", f"/v2/x/blobs/{sha256(b'never pushed')}")
    expect_error(missing, 404, "BLOB_UNKNOWN")
    for bad in ("sha256:xyz", "md5:abc", "sha512:" + "0" * 128):
        response = client.request("HEAD" if bad.startswith("md5") else "GET", f"/v2/x/blobs/{bad}")
        assert response.status_code == 400
    assert error_code(client.request("GET", "/v2/x/blobs/sha256:xyz")) == "DIGEST_INVALID"
    deleted = client.request("DELETE", f"/v2/x/blobs/{sha256(b'x')}")
    expect_error(deleted, 405, "UNSUPPORTED")


def test_single_post_upload_and_mount(client: RegistryClient) -> None:
    data = layer("single")
    one = client.request(
        "POST", "/v2/http/single/blobs/uploads/", params={"digest": sha256(data)}, data=data
    )
    assert one.status_code == 201, one.text
    assert one.headers["Docker-Content-Digest"] == sha256(data)

    mounted = client.request(
        "POST",
        "/v2/http/other/blobs/uploads/",
        params={"mount": sha256(data), "from": "http/single"},
    )
    assert mounted.status_code == 201
    assert mounted.headers["Location"] == f"/v2/http/other/blobs/{sha256(data)}"
    # A blob the server lacks cannot be mounted: the client gets an upload instead.
    fallback = client.request(
        "POST",
        "/v2/http/other/blobs/uploads/",
        params={"mount": sha256(b"absent"), "from": "http/single"},
    )
    assert fallback.status_code == 202
    assert fallback.headers["Location"].startswith("/v2/http/other/blobs/uploads/")


def test_chunked_upload_in_order_with_status(client: RegistryClient) -> None:
    data = layer("chunks", 250_000)
    started = client.request("POST", "/v2/http/chunks/blobs/uploads/")
    location = started.headers["Location"]
    assert started.headers["Range"] == "0-0"
    cut = [0, 100_000, 200_000, len(data)]
    for first, end in itertools.pairwise(cut):
        patched = client.request(
            "PATCH",
            location,
            data=data[first:end],
            headers={"Content-Range": f"{first}-{end - 1}"},
        )
        assert patched.status_code == 202, patched.text
        assert patched.headers["Range"] == f"0-{end - 1}"
        location = patched.headers["Location"]
    status = client.request("GET", location)
    assert status.status_code == 204
    assert status.headers["Range"] == f"0-{len(data) - 1}"
    done = client.request("PUT", location, params={"digest": sha256(data)})
    assert done.status_code == 201, done.text
    assert client.request("GET", f"/v2/http/chunks/blobs/{sha256(data)}").content == data


def test_a_chunked_body_without_length(client: RegistryClient) -> None:
    """As `docker push` sends layers: one PATCH, Transfer-Encoding chunked, no length; the
    blob is larger than the first guess of its piece length, so its pieces are hashed
    again at the commit."""
    data = layer("streamed", 70 * 1024 * 1024)
    started = client.request("POST", "/v2/http/streamed/blobs/uploads/")

    def body() -> Iterator[bytes]:
        for i in range(0, len(data), 1 << 20):
            yield data[i : i + (1 << 20)]

    patched = client.request("PATCH", started.headers["Location"], data=body())
    assert patched.status_code == 202, patched.text
    done = client.request("PUT", patched.headers["Location"], params={"digest": sha256(data)})
    assert done.status_code == 201, done.text
    got = client.request("GET", f"/v2/x/blobs/{sha256(data)}")
    assert got.content == data


def test_out_of_order_and_overlapping_chunks_change_nothing(client: RegistryClient) -> None:
    data = b"order" * 400  # 2000 bytes
    location = client.request("POST", "/v2/http/order/blobs/uploads/").headers["Location"]
    first = client.request("PATCH", location, data=data[:1000], headers={"Content-Range": "0-999"})
    assert first.status_code == 202
    for header, chunk in (("1500-1999", data[1500:]), ("500-1499", data[500:1500])):
        refused = client.request("PATCH", location, data=chunk, headers={"Content-Range": header})
        assert refused.status_code == 416, header
        assert error_code(refused) == "RANGE_INVALID"
        assert refused.headers["Range"] == "0-999"
    bad_length = client.request(
        "PATCH", location, data=data[1000:1100], headers={"Content-Range": "1000-1999"}
    )
    expect_error(bad_length, 400, "SIZE_INVALID")
    garbled = client.request("PATCH", location, data=b"x", headers={"Content-Range": "bytes=a-b"})
    assert garbled.status_code == 416
    # None of that moved the upload: it goes on where it stood.
    rest = client.request(
        "PATCH", location, data=data[1000:], headers={"Content-Range": "1000-1999"}
    )
    assert rest.status_code == 202
    done = client.request("PUT", rest.headers["Location"], params={"digest": sha256(data)})
    assert done.status_code == 201


def test_wrong_digest_or_size_leaves_nothing(server: ServerProcess) -> None:
    client = server.registry_client()
    data = layer("wrong")
    location = client.request("POST", "/v2/http/wrong/blobs/uploads/").headers["Location"]
    wrong = client.request("PUT", location, params={"digest": sha256(b"other")}, data=data)
    expect_error(wrong, 400, "DIGEST_INVALID")
    assert error_code(client.request("GET", location)) == "BLOB_UPLOAD_UNKNOWN"
    for digest in (sha256(data), sha256(b"other")):
        assert client.request("HEAD", f"/v2/x/blobs/{digest}").status_code == 404
    malformed = client.request("POST", "/v2/http/wrong/blobs/uploads/")
    bad = client.request(
        "PUT", malformed.headers["Location"], params={"digest": "sha256:nothex"}, data=data
    )
    expect_error(bad, 400, "DIGEST_INVALID")
    missing = client.request(
        "PUT", client.request("POST", "/v2/a/blobs/uploads/").headers["Location"]
    )
    expect_error(missing, 400, "DIGEST_INVALID")
    # A body shorter than its Content-Range: the upload is broken off, nothing kept.
    location = client.request("POST", "/v2/http/wrong/blobs/uploads/").headers["Location"]
    cancelled = client.request("DELETE", location)
    assert cancelled.status_code == 204
    assert error_code(client.request("PATCH", location, data=b"x")) == "BLOB_UPLOAD_UNKNOWN"
    deadline = time.monotonic() + 10
    while temp_files(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert temp_files(server) == []


def send_and_close(server: ServerProcess, head: str, body: bytes) -> None:
    """Sends a hand-written request (over TLS, with the admin token) to the registry face
    and hangs up without reading the answer."""
    token = f"Authorization: Bearer {server.admin_token}\r\n"
    request_line, rest = head.split("\r\n", 1)
    data = f"{request_line}\r\n{token}{rest}".encode() + body
    context = ssl.create_default_context(cafile=str(server.ca_path))
    with (
        socket.create_connection(("127.0.0.1", server.registry_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(data)


def test_a_client_that_goes_away_mid_patch_leaves_nothing(server: ServerProcess) -> None:
    client = server.registry_client()
    location = client.request("POST", "/v2/http/gone/blobs/uploads/").headers["Location"]
    send_and_close(
        server,
        f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n",
        b"y" * 1_500_000,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = client.request("GET", location)
        if status.status_code == 404:
            break
        time.sleep(0.05)
    assert error_code(status) == "BLOB_UPLOAD_UNKNOWN"
    while temp_files(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert temp_files(server) == []
    assert client.request("GET", "/v2/").status_code == 200


def test_a_restart_forgets_unfinished_uploads(server: ServerProcess) -> None:
    client = server.registry_client()
    location = client.request("POST", "/v2/http/restart/blobs/uploads/").headers["Location"]
    half = client.request("PATCH", location, data=b"z" * 100_000)
    assert half.status_code == 202
    assert temp_files(server)
    assert server.stop() == 0
    server.start()
    after = client.request("PATCH", location, data=b"z" * 100_000)
    expect_error(after, 404, "BLOB_UPLOAD_UNKNOWN")
    assert temp_files(server) == []


# --- manifests ---------------------------------------------------------------------------


def test_manifests_are_kept_byte_for_byte_and_seen_by_the_grpc_api(
    client: RegistryClient, images: pb_grpc.ImageServiceStub
) -> None:
    image = build_image([layer("bytes-a"), layer("bytes-b")], indent=3)
    put = client.push_image("http/bytes", "v1", image)
    assert put.status_code == 201, put.text
    assert put.headers["Docker-Content-Digest"] == image.digest
    assert put.headers["Location"] == f"/v2/http/bytes/manifests/{image.digest}"
    for reference in ("v1", image.digest):
        got = client.get_manifest("http/bytes", reference)
        assert got.status_code == 200
        assert got.content == image.manifest
        assert got.headers["Content-Type"] == OCI_MANIFEST
        assert got.headers["Docker-Content-Digest"] == image.digest
        head = client.request("HEAD", f"/v2/http/bytes/manifests/{reference}")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["Content-Length"] == str(len(image.manifest))
    cached = client.request(
        "GET", "/v2/http/bytes/manifests/v1", headers={"If-None-Match": f'"{image.digest}"'}
    )
    assert cached.status_code == 304

    shown = images.GetImage(pb.GetImageRequest(name="http/bytes:v1")).image
    assert shown.digest == image.digest
    assert shown.media_type == OCI_MANIFEST
    assert [d.digest for d in shown.layers] == [sha256(x) for x in image.layers]
    assert shown.platform == "linux/amd64"
    assert list(shown.diff_ids) == [sha256(x) for x in image.layers]


def test_accept_negotiation(client: RegistryClient) -> None:
    oci = build_image([layer("neg-oci")])
    docker = build_image([layer("neg-docker")], media_type=DOCKER_MANIFEST)
    assert client.push_image("http/neg", "oci", oci).status_code == 201
    assert client.push_image("http/neg", "docker", docker).status_code == 201
    assert client.get_manifest("http/neg", "oci", accept=OCI_MANIFEST).status_code == 200
    refused = client.get_manifest("http/neg", "oci", accept=DOCKER_MANIFEST)
    expect_error(refused, 404, "MANIFEST_UNKNOWN")
    for accept in ("*/*", f"{OCI_MANIFEST};q=0.9, {DOCKER_MANIFEST}"):
        assert client.get_manifest("http/neg", "oci", accept=accept).content == oci.manifest
    no_accept = client.request("GET", "/v2/http/neg/manifests/oci")
    assert no_accept.status_code == 200
    got = client.get_manifest("http/neg", "docker", accept=DOCKER_MANIFEST)
    assert got.headers["Content-Type"] == DOCKER_MANIFEST
    assert got.content == docker.manifest


def test_an_index_is_stored_as_such(
    client: RegistryClient, images: pb_grpc.ImageServiceStub
) -> None:
    amd = build_image([layer("idx-amd")], architecture="amd64")
    arm = build_image([layer("idx-arm")], architecture="arm64", variant="v8")
    for image in (amd, arm):
        assert client.push_image("http/multi", image.digest, image).status_code == 201
    index = build_index([(amd, "amd64", ""), (arm, "arm64", "v8")])
    put = client.put_manifest("http/multi", "1", index, OCI_INDEX)
    assert put.status_code == 201, put.text
    got = client.get_manifest("http/multi", "1")
    assert got.content == index
    assert got.headers["Content-Type"] == OCI_INDEX
    # A client that reads no index gets the linux/amd64 image, as from the CNCF registry.
    single = client.get_manifest("http/multi", "1", accept=OCI_MANIFEST)
    assert single.status_code == 200
    assert single.content == amd.manifest
    assert single.headers["Docker-Content-Digest"] == amd.digest

    shown = images.GetImage(pb.GetImageRequest(name="http/multi:1")).image
    assert shown.media_type == OCI_INDEX
    assert shown.digest == sha256(index)
    assert not shown.HasField("config")
    assert [(m.digest, m.platform) for m in shown.manifests] == [
        (amd.digest, "linux/amd64"),
        (arm.digest, "linux/arm64/v8"),
    ]
    assert shown.manifests[1].layers[0].digest == sha256(arm.layers[0])


def test_a_manifest_sent_in_small_chunks_is_read_whole(client: RegistryClient) -> None:
    image = build_image([layer("chunked")], indent=2)
    for blob in image.blobs:
        assert client.push_blob("http/chunked", blob).status_code == 201
    pieces = [image.manifest[i : i + 7] for i in range(0, len(image.manifest), 7)]
    put = client.request(
        "PUT",
        "/v2/http/chunked/manifests/1",
        data=iter(pieces),
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert put.status_code == 201, put.text
    assert client.request("GET", "/v2/http/chunked/manifests/1").content == image.manifest


def test_bad_manifests_are_refused_and_nothing_is_stored(
    client: RegistryClient, images: pb_grpc.ImageServiceStub
) -> None:
    good = build_image([layer("bad-base")])
    assert client.push_image("http/bad", "good", good).status_code == 201
    absent = build_image([layer("never-uploaded")])
    cases: list[tuple[str, str, bytes, str, int, str]] = [
        ("not json", "t", b"{not json", OCI_MANIFEST, 400, "MANIFEST_INVALID"),
        ("a list", "t", b"[1, 2]", OCI_MANIFEST, 400, "MANIFEST_INVALID"),
        (
            "unknown type",
            "t",
            good.manifest,
            "application/vnd.example+json",
            400,
            "MANIFEST_INVALID",
        ),
        (
            "type mismatch",
            "t",
            good.manifest,
            DOCKER_MANIFEST,
            400,
            "MANIFEST_INVALID",
        ),
        (
            "schema 1",
            "t",
            json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []}).encode(),
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            400,
            "MANIFEST_INVALID",
        ),
        ("too large", "t", b" " * (4 * 1024 * 1024 + 1), OCI_MANIFEST, 400, "MANIFEST_INVALID"),
        ("missing blobs", "t", absent.manifest, OCI_MANIFEST, 400, "MANIFEST_BLOB_UNKNOWN"),
        ("digest mismatch", sha256(b"other"), good.manifest, OCI_MANIFEST, 400, "DIGEST_INVALID"),
        ("bad digest", "sha256:nothex", good.manifest, OCI_MANIFEST, 400, "DIGEST_INVALID"),
        ("bad tag", "-dash", good.manifest, OCI_MANIFEST, 400, "TAG_INVALID"),
        (
            "missing child",
            "t",
            build_index([(absent, "amd64", "")]),
            OCI_INDEX,
            400,
            "MANIFEST_BLOB_UNKNOWN",
        ),
    ]
    for what, reference, body, media_type, status, code in cases:
        response = client.put_manifest("http/bad", reference, body, media_type)
        assert (response.status_code, error_code(response)) == (status, code), what
    # Without a Content-Length (chunked, a piece at a time): counted as it comes.
    too_large = client.request(
        "PUT",
        "/v2/http/bad/manifests/t",
        data=(b" " * 65536 for _ in range(65)),
        headers={"Content-Type": OCI_MANIFEST},
    )
    expect_error(too_large, 400, "MANIFEST_INVALID")
    wrong_size = json.loads(good.manifest)
    wrong_size["layers"][0]["size"] += 1
    response = client.put_manifest("http/bad", "t", json.dumps(wrong_size).encode())
    assert error_code(response) == "MANIFEST_INVALID"
    bad_name = client.put_manifest("Http/BAD", "t", good.manifest)
    expect_error(bad_name, 400, "NAME_INVALID")

    assert client.request("GET", "/v2/http/bad/tags/list").json()["tags"] == ["good"]
    names = {i.name for i in images.ListImages(pb.ListImagesRequest(page_size=1000)).images}
    assert "http/bad:t" not in names
    assert "http/bad:good" in names


# --- discovery ---------------------------------------------------------------------------


def test_tags_and_catalog_pages(client: RegistryClient) -> None:
    image = build_image([layer("tags")])
    assert client.push_image("http/tags", "a", image).status_code == 201
    for tag in ("c", "b", "d", "e"):
        assert client.put_manifest("http/tags", tag, image.manifest).status_code == 201
    everything = client.request("GET", "/v2/http/tags/tags/list")
    assert everything.json() == {"name": "http/tags", "tags": ["a", "b", "c", "d", "e"]}
    assert "Link" not in everything.headers
    page = client.request("GET", "/v2/http/tags/tags/list", params={"n": 2})
    assert page.json()["tags"] == ["a", "b"]
    assert page.headers["Link"] == '</v2/http/tags/tags/list?n=2&last=b>; rel="next"'
    rest = client.request("GET", "/v2/http/tags/tags/list", params={"n": 2, "last": "d"})
    assert rest.json()["tags"] == ["e"]
    assert "Link" not in rest.headers
    bad = client.request("GET", "/v2/http/tags/tags/list", params={"n": "many"})
    expect_error(bad, 400, "PAGINATION_NUMBER_INVALID")
    unknown = client.request("GET", "/v2/http/nothing/tags/list")
    expect_error(unknown, 404, "NAME_UNKNOWN")

    repositories = client.request("GET", "/v2/_catalog").json()["repositories"]
    assert "http/tags" in repositories
    assert repositories == sorted(repositories)
    first = client.request("GET", "/v2/_catalog", params={"n": 1})
    assert len(first.json()["repositories"]) == 1
    assert 'rel="next"' in first.headers["Link"]


def test_referrers(client: RegistryClient) -> None:
    subject = build_image([layer("subject")])
    assert client.push_image("http/refs", "1", subject).status_code == 201
    empty = b"{}"
    assert client.push_blob("http/refs", empty).status_code == 201
    signature = b"signature bytes"
    assert client.push_blob("http/refs", signature).status_code == 201

    def referrer(artifact_type: str, note: str) -> bytes:
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": artifact_type,
                "config": descriptor(OCI_EMPTY, empty),
                "layers": [descriptor("application/octet-stream", signature)],
                "subject": descriptor(OCI_MANIFEST, subject.manifest),
                "annotations": {"note": note},
            }
        ).encode()

    sig = referrer("application/vnd.example.signature", "sig")
    sbom = referrer("application/vnd.example.sbom", "sbom")
    for manifest in (sig, sbom):
        put = client.put_manifest("http/refs", sha256(manifest), manifest)
        assert put.status_code == 201, put.text
        assert put.headers["OCI-Subject"] == subject.digest
    listed = client.request("GET", f"/v2/http/refs/referrers/{subject.digest}")
    assert listed.status_code == 200
    assert listed.headers["Content-Type"] == OCI_INDEX
    body = listed.json()
    assert body["mediaType"] == OCI_INDEX
    assert [(m["digest"], m["artifactType"], m["annotations"]) for m in body["manifests"]] == [
        (sha256(sig), "application/vnd.example.signature", {"note": "sig"}),
        (sha256(sbom), "application/vnd.example.sbom", {"note": "sbom"}),
    ]
    assert body["manifests"][0]["size"] == len(sig)
    filtered = client.request(
        "GET",
        f"/v2/http/refs/referrers/{subject.digest}",
        params={"artifactType": "application/vnd.example.sbom"},
    )
    assert [m["digest"] for m in filtered.json()["manifests"]] == [sha256(sbom)]
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    nothing = client.request("GET", f"/v2/http/refs/referrers/{sha256(b'no subject')}")
    assert nothing.status_code == 200
    assert nothing.json()["manifests"] == []
    assert error_code(client.request("GET", "/v2/http/refs/referrers/sha256:z")) == "DIGEST_INVALID"


# --- deletes -----------------------------------------------------------------------------


def test_deletes(server: ServerProcess) -> None:
    client = server.registry_client()
    shared_layer = layer("del-shared")
    one = build_image([shared_layer, layer("del-one")])
    two = build_image([shared_layer, layer("del-two")])
    assert client.push_image("http/del", "one", one).status_code == 201
    assert client.push_image("http/del", "two", two).status_code == 201
    assert client.put_manifest("http/del", "alias", one.manifest).status_code == 201

    # A tag goes alone: the manifest stays, by digest and under its other tag.
    assert client.request("DELETE", "/v2/http/del/manifests/alias").status_code == 202
    assert client.get_manifest("http/del", "alias").status_code == 404
    assert client.get_manifest("http/del", one.digest).status_code == 200
    gone = client.request("DELETE", "/v2/http/del/manifests/alias")
    expect_error(gone, 404, "MANIFEST_UNKNOWN")

    # A manifest by digest takes its tags, and the blobs no other manifest uses.
    assert client.request("DELETE", f"/v2/http/del/manifests/{one.digest}").status_code == 202
    assert client.get_manifest("http/del", "one").status_code == 404
    assert client.request("HEAD", f"/v2/x/blobs/{sha256(one.layers[1])}").status_code == 404
    assert not server.blob_path(sha256(one.layers[1])).exists()
    for kept in (shared_layer, two.layers[1]):
        assert client.request("HEAD", f"/v2/x/blobs/{sha256(kept)}").status_code == 200
    unknown = client.request("DELETE", f"/v2/http/del/manifests/{one.digest}")
    expect_error(unknown, 404, "MANIFEST_UNKNOWN")

    # A platform image of an index goes only with the index, and then goes with it.
    amd = build_image([layer("del-amd")])
    assert client.push_image("http/del", amd.digest, amd).status_code == 201
    index = build_index([(amd, "amd64", "")])
    assert client.put_manifest("http/del", "multi", index, OCI_INDEX).status_code == 201
    refused = client.request("DELETE", f"/v2/http/del/manifests/{amd.digest}")
    expect_error(refused, 409, "DENIED")
    assert client.request("DELETE", f"/v2/http/del/manifests/{sha256(index)}").status_code == 202
    assert client.get_manifest("http/del", amd.digest).status_code == 404
    assert client.request("HEAD", f"/v2/x/blobs/{sha256(amd.layers[0])}").status_code == 404


# --- authentication, routes, load --------------------------------------------------------


def test_tokens_are_asked_for_on_every_route(shared: ServerProcess) -> None:
    server = shared
    anonymous = server.registry_client(token="")
    digest = sha256(b"x")
    for method, path in [
        ("GET", "/v2/"),
        ("GET", "/v2/_catalog"),
        ("GET", "/v2/a/tags/list"),
        ("GET", "/v2/a/manifests/1"),
        ("HEAD", "/v2/a/manifests/1"),
        ("PUT", "/v2/a/manifests/1"),
        ("DELETE", "/v2/a/manifests/1"),
        ("GET", f"/v2/a/blobs/{digest}"),
        ("HEAD", f"/v2/a/blobs/{digest}"),
        ("DELETE", f"/v2/a/blobs/{digest}"),
        ("POST", "/v2/a/blobs/uploads/"),
        ("GET", "/v2/a/blobs/uploads/u"),
        ("PATCH", "/v2/a/blobs/uploads/u"),
        ("PUT", "/v2/a/blobs/uploads/u"),
        ("DELETE", "/v2/a/blobs/uploads/u"),
        ("GET", f"/v2/a/referrers/{digest}"),
    ]:
        response = anonymous.request(method, path)
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == 'Basic realm="docket"'
        if method != "HEAD":
            assert error_code(response) == "UNAUTHORIZED"
    for wrong_token in ("wrong", "dkt_000000000000_wrongwrongwrongwrongwrong"):
        wrong = server.registry_client(token=wrong_token)
        assert wrong.request("GET", "/v2/").status_code == 401
    token = server.token("publisher")
    basic = RegistryClient(server.registry_url, auth=("anyone", token), verify=str(server.ca_path))
    assert basic.request("GET", "/v2/").status_code == 200
    image = build_image([layer("auth")])
    assert basic.push_image("auth/app", "1", image).status_code == 201
    bearer = anonymous.request(
        "GET", "/v2/auth/app/tags/list", headers={"Authorization": f"Bearer {token}"}
    )
    assert bearer.json()["tags"] == ["1"]


def test_unknown_routes_and_methods(client: RegistryClient) -> None:
    nowhere = client.request("GET", "/v2/a/b/nothing-here")
    expect_error(nowhere, 404, "NAME_UNKNOWN")
    outside = client.request("GET", "/not-the-api")
    assert outside.status_code == 404
    assert error_code(outside)
    method = client.request("POST", "/v2/a/manifests/1")
    expect_error(method, 405, "UNSUPPORTED")
    assert "PUT" in method.headers["Allow"]


def test_a_thousand_concurrent_requests_mostly_bad(shared: ServerProcess) -> None:
    """Bad requests of every kind at once, beside good ones: each gets its spec error, the
    good ones succeed, and a gRPC call made meanwhile is answered without a stall."""
    good = build_image([layer("load")])
    shared.registry_client().push_image("http/load", "1", good)
    grpc_latencies: list[float] = []
    stop = threading.Event()

    def probe_grpc() -> None:
        with shared.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                start = time.monotonic()
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                grpc_latencies.append(time.monotonic() - start)
                time.sleep(0.02)

    async def run() -> list[tuple[str, int, str]]:
        base = shared.registry_url
        requests_: list[tuple[str, str, dict[str, object]]] = []
        for i in range(1000):
            kind = i % 10
            if kind == 0:
                requests_.append(("GET", "/v2/http/load/manifests/1", {}))
            elif kind == 1:
                requests_.append(("PUT", f"/v2/http/load/manifests/t{i}", {"data": b"{nope"}))
            elif kind == 2:
                requests_.append(("GET", f"/v2/http/load/blobs/sha256:{i:064x}", {}))
            elif kind == 3:
                requests_.append(("GET", "/v2/BAD NAME/tags/list", {}))
            elif kind == 4:
                requests_.append(("PATCH", f"/v2/http/load/blobs/uploads/nope{i}", {"data": b"x"}))
            elif kind == 5:
                requests_.append(("GET", "/v2/http/load/manifests/sha256:short", {}))
            elif kind == 6:
                requests_.append(("PUT", "/v2/http/load/manifests/x", {"data": good.manifest[:-3]}))
            elif kind == 7:
                requests_.append(("GET", f"/v2/nothing{i}/tags/list", {}))
            elif kind == 8:
                requests_.append(("DELETE", f"/v2/http/load/manifests/none{i}", {}))
            else:
                requests_.append(("GET", "/v2/", {}))
        tls = ssl.create_default_context(cafile=str(shared.ca_path))
        connector = aiohttp.TCPConnector(limit=1000, ssl=tls)
        auth = {"Authorization": f"Bearer {shared.admin_token}"}
        async with aiohttp.ClientSession(connector=connector, headers=auth) as session:

            async def one(
                method: str, path: str, kwargs: dict[str, object]
            ) -> tuple[str, int, str]:
                async with session.request(method, base + path, **kwargs) as response:  # type: ignore[arg-type]
                    body = await response.read()
                    code = json.loads(body)["errors"][0]["code"] if response.status >= 400 else ""
                    return path, response.status, code

            return await asyncio.gather(*(one(*r) for r in requests_))

    prober = threading.Thread(target=probe_grpc)
    prober.start()
    try:
        results = asyncio.run(run())
    finally:
        stop.set()
        prober.join()
    by_kind: dict[int, set[tuple[int, str]]] = {}
    for i, (_path, status, code) in enumerate(results):
        by_kind.setdefault(i % 10, set()).add((status, code))
    assert by_kind == {
        0: {(200, "")},
        1: {(400, "MANIFEST_INVALID")},
        2: {(404, "BLOB_UNKNOWN")},
        3: {(400, "NAME_INVALID")},
        4: {(404, "BLOB_UPLOAD_UNKNOWN")},
        5: {(400, "DIGEST_INVALID")},
        6: {(400, "MANIFEST_INVALID")},
        7: {(404, "NAME_UNKNOWN")},
        8: {(404, "MANIFEST_UNKNOWN")},
        9: {(200, "")},
    }
    # Each gRPC call had 10 s: a stalled server would have failed one (DEADLINE_EXCEEDED).
    assert len(grpc_latencies) >= 2
    assert shared.registry_client().get_manifest("http/load", "1").status_code == 200
