"""The registry API against a real docket-server process: blobs, images, errors, restarts,
and a real libtorrent client fetching a blob from the server's seed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import libtorrent as lt
import pytest
from google.rpc import error_details_pb2, status_pb2

from docket_common.digest import hex_part
from docket_common.pb import agent_service_pb2, agent_service_pb2_grpc, image_pb2
from docket_common.pb import image_service_pb2 as pb
from docket_common.pb import image_service_pb2_grpc as pb_grpc
from tests.support.agents import sim_channel
from tests.support.archives import layer_tar, random_bytes, sha256
from tests.support.peers import download_with_libtorrent, fleet_identity
from tests.support.server import ServerProcess

CHUNK = 1024 * 1024


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[pb_grpc.ImageServiceStub]:
    with server.channel() as channel:
        yield pb_grpc.ImageServiceStub(channel)


def upload_requests(
    digest: str, data: bytes, size: int | None = None
) -> Iterator[pb.UploadBlobRequest]:
    yield pb.UploadBlobRequest(
        header=pb.UploadBlobHeader(digest=digest, size_bytes=len(data) if size is None else size)
    )
    for i in range(0, len(data), CHUNK):
        yield pb.UploadBlobRequest(chunk=data[i : i + CHUNK])


def trailed(
    digest: str | None, data: bytes, *, after: list[pb.UploadBlobRequest] | None = None
) -> Iterator[pb.UploadBlobRequest]:
    """An upload whose header names no digest: the trailer does (none when ``digest`` is
    None), then ``after``."""
    yield from upload_requests("", data)
    if digest is not None:
        yield pb.UploadBlobRequest(trailer=pb.UploadBlobTrailer(digest=digest))
    yield from after or []


def upload(stub: pb_grpc.ImageServiceStub, data: bytes) -> pb.UploadBlobResponse:
    return stub.UploadBlob(upload_requests(sha256(data), data), timeout=60)  # type: ignore[no-any-return]


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    for key, value in err.trailing_metadata():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError(f"no ErrorInfo in {err}")


def config_for(layers: list[bytes]) -> bytes:
    import json

    return json.dumps(
        {
            "os": "linux",
            "architecture": "arm64",
            "variant": "v8",
            "created": "2023-04-05T06:07:08.999999999Z",
            "rootfs": {"type": "layers", "diff_ids": [sha256(x) for x in layers]},
        }
    ).encode()


def push(stub: pb_grpc.ImageServiceStub, name: str, layers: list[bytes]) -> pb.PutImageResponse:
    config = config_for(layers)
    for blob in [config, *layers]:
        upload(stub, blob)
    return stub.PutImage(  # type: ignore[no-any-return]
        pb.PutImageRequest(
            name=name,
            config=image_pb2.Descriptor(digest=sha256(config), size_bytes=len(config)),
            layers=[
                image_pb2.Descriptor(
                    digest=sha256(x),
                    size_bytes=len(x),
                    media_type="application/vnd.oci.image.layer.v1.tar",
                )
                for x in layers
            ],
        )
    )


def blob_files(server: ServerProcess) -> list[Path]:
    return sorted(p for p in (server.data_dir / "blobs").rglob("*") if p.is_file())


def temp_files(server: ServerProcess) -> list[Path]:
    return list((server.data_dir / "tmp").iterdir())


def test_push_list_get_delete_round_trip(
    server: ServerProcess, stub: pb_grpc.ImageServiceStub
) -> None:
    base = layer_tar({"base": random_bytes(300_000, 1)})
    top1 = layer_tar({"one": random_bytes(100_000, 2)})
    top2 = layer_tar({"two": random_bytes(100_000, 3)})
    assert stub.StatBlobs(pb.StatBlobsRequest(digests=[sha256(base)])).missing_digests == [
        sha256(base)
    ]
    image = push(stub, "team/app:1", [base, top1]).image
    assert image.name == "team/app:1"
    assert image.platform == "linux/arm64/v8"
    assert image.build_time.ToJsonString() == "2023-04-05T06:07:08.999999Z"
    assert [layer.digest for layer in image.layers] == [sha256(base), sha256(top1)]
    assert image.size_bytes == len(base) + len(top1) + image.config.size_bytes
    push(stub, "team/app:2", [base, top2])
    assert (
        stub.StatBlobs(pb.StatBlobsRequest(digests=[sha256(base), sha256(top2)])).missing_digests
        == []
    )

    got = stub.GetImage(pb.GetImageRequest(name="team/app:1")).image
    assert got == image
    by_digest = stub.GetImage(pb.GetImageRequest(name=f"team/app@{image.digest}")).image
    assert by_digest.name == "team/app:1"

    # Pages of one: every image exactly once, in name order.
    names, token = [], ""
    while True:
        page = stub.ListImages(pb.ListImagesRequest(page_size=1, page_token=token))
        names += [i.name for i in page.images]
        token = page.next_page_token
        if not token:
            break
    assert names == ["team/app:1", "team/app:2"]

    deleted = stub.DeleteImage(pb.DeleteImageRequest(name="team/app:1"))
    assert list(deleted.deleted_names) == ["team/app:1"]
    # The shared base stays; top1 and the first config go.
    assert set(deleted.deleted_digests) == {sha256(top1), image.config.digest}
    assert stub.StatBlobs(
        pb.StatBlobsRequest(digests=[sha256(base), sha256(top1)])
    ).missing_digests == [sha256(top1)]
    on_disk = {p.name for p in blob_files(server)}
    assert hex_part(sha256(base)) in on_disk
    assert hex_part(sha256(top1)) not in on_disk
    assert len(on_disk) == 3  # base, top2, config of app:2


def test_reading_a_blob_and_its_torrent(
    server: ServerProcess, stub: pb_grpc.ImageServiceStub
) -> None:
    data = random_bytes(3 * CHUNK + 123, 7)
    upload(stub, data)
    whole = b"".join(r.chunk for r in stub.ReadBlob(pb.ReadBlobRequest(digest=sha256(data))))
    assert whole == data
    part = b"".join(
        r.chunk
        for r in stub.ReadBlob(
            pb.ReadBlobRequest(digest=sha256(data), offset_bytes=CHUNK + 5, length_bytes=10)
        )
    )
    assert part == data[CHUNK + 5 : CHUNK + 15]
    torrent = stub.GetTorrent(pb.GetTorrentRequest(digest=sha256(data))).torrent
    info = lt.torrent_info(lt.bdecode(torrent.metainfo))
    assert str(info.info_hashes().v1) == torrent.info_hash
    assert info.priv()
    assert torrent.piece_count == info.num_pieces() == -(-len(data) // torrent.piece_length_bytes)


@pytest.mark.parametrize(
    ("make", "reason", "code"),
    [
        (
            lambda d: upload_requests(sha256(d), d[:-1], size=len(d)),
            "SIZE_MISMATCH",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda d: upload_requests(sha256(d), d, size=len(d) - 1),
            "SIZE_MISMATCH",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda d: upload_requests(sha256(d + b"x"), d),
            "DIGEST_MISMATCH",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda d: upload_requests("sha256:xyz", d),
            "INVALID_DIGEST",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda d: iter([pb.UploadBlobRequest(chunk=d)]),
            "UPLOAD_HEADER_MISSING",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (lambda d: iter([]), "UPLOAD_HEADER_MISSING", grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda d: iter(
                [*upload_requests(sha256(d), d), pb.UploadBlobRequest(header=pb.UploadBlobHeader())]
            ),
            "UPLOAD_HEADER_MISSING",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda d: upload_requests(sha256(d), d, size=1 << 60),
            "INSUFFICIENT_STORAGE",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            lambda d: trailed(sha256(d + b"x"), d),
            "DIGEST_MISMATCH",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (lambda d: trailed("sha256:xyz", d), "INVALID_DIGEST", grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda d: trailed(sha256(d), d, after=[pb.UploadBlobRequest(chunk=b"more")]),
            "UPLOAD_TRAILER_MISSING",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda d: iter(
                [
                    *upload_requests(sha256(d), d),
                    pb.UploadBlobRequest(trailer=pb.UploadBlobTrailer(digest=sha256(d))),
                ]
            ),
            "UPLOAD_TRAILER_MISSING",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
    ids=[
        "short",
        "long",
        "wrong-digest",
        "bad-digest",
        "no-header",
        "empty",
        "second-header",
        "too-big",
        "trailer-wrong-digest",
        "trailer-bad-digest",
        "chunk-after-trailer",
        "trailer-after-digest",
    ],
)
def test_bad_uploads_keep_nothing(
    server: ServerProcess,
    stub: pb_grpc.ImageServiceStub,
    make: object,
    reason: str,
    code: grpc.StatusCode,
) -> None:
    data = random_bytes(2 * CHUNK + 10, 3)
    with pytest.raises(grpc.RpcError) as caught:
        stub.UploadBlob(make(data), timeout=30)  # type: ignore[operator]
    assert caught.value.code() == code  # type: ignore[attr-defined]
    info = error_info(caught.value)
    assert (info.reason, info.domain) == (reason, "docket.dev")
    assert blob_files(server) == []
    assert temp_files(server) == []
    # The server keeps serving, and the right bytes still go in.
    assert upload(stub, data).already_existed is False
    assert [p.name for p in blob_files(server)] == [hex_part(sha256(data))]


def test_two_uploads_of_one_blob_at_once(
    server: ServerProcess, stub: pb_grpc.ImageServiceStub
) -> None:
    data = random_bytes(20 * CHUNK, 11)
    results: list[pb.UploadBlobResponse] = []
    errors: list[BaseException] = []

    def slow_requests() -> Iterator[pb.UploadBlobRequest]:
        for request in upload_requests(sha256(data), data):
            time.sleep(0.01)  # keep both uploads in flight together
            yield request

    def run() -> None:
        try:
            results.append(stub.UploadBlob(slow_requests(), timeout=60))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.already_existed for r in results) == [False, True]
    assert [p.name for p in blob_files(server)] == [hex_part(sha256(data))]
    assert blob_files(server)[0].read_bytes() == data
    assert temp_files(server) == []


def test_upload_cut_off_keeps_nothing(
    server: ServerProcess, stub: pb_grpc.ImageServiceStub
) -> None:
    data = random_bytes(8 * CHUNK, 5)
    sent = threading.Event()

    def half_then_stall() -> Iterator[pb.UploadBlobRequest]:
        for i, request in enumerate(upload_requests(sha256(data), data)):
            if i == 4:
                sent.set()
                time.sleep(30)  # the client goes away here
            yield request

    future = stub.UploadBlob.future(half_then_stall(), timeout=60)
    assert sent.wait(10)
    deadline = time.monotonic() + 10
    while not temp_files(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert temp_files(server), "the upload never reached the server"
    future.cancel()
    deadline = time.monotonic() + 10
    while temp_files(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert temp_files(server) == []
    assert blob_files(server) == []
    assert list(stub.StatBlobs(pb.StatBlobsRequest(digests=[sha256(data)])).missing_digests) == [
        sha256(data)
    ]


def test_bad_image_requests(server: ServerProcess, stub: pb_grpc.ImageServiceStub) -> None:
    layer = layer_tar({"f": b"x" * 1000})
    config = config_for([layer])
    upload(stub, config)

    def put(name: str, layers: list[image_pb2.Descriptor], cfg: bytes = config) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            stub.PutImage(
                pb.PutImageRequest(
                    name=name,
                    config=image_pb2.Descriptor(digest=sha256(cfg), size_bytes=len(cfg)),
                    layers=layers,
                )
            )
        return caught.value

    layer_desc = image_pb2.Descriptor(digest=sha256(layer), size_bytes=len(layer))
    missing = put("app:1", [layer_desc])
    assert missing.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert error_info(missing).reason == "BLOB_NOT_FOUND"
    assert error_info(missing).metadata["digests"] == sha256(layer)
    assert error_info(put("App:1", [layer_desc])).reason == "INVALID_REFERENCE"
    assert error_info(put(f"app@{sha256(layer)}", [layer_desc])).reason == "INVALID_REFERENCE"
    upload(stub, layer)
    assert error_info(put("app:1", [])).reason == "INVALID_IMAGE"  # config lists one layer
    wrong_size = image_pb2.Descriptor(digest=sha256(layer), size_bytes=5)
    assert error_info(put("app:1", [wrong_size])).reason == "SIZE_MISMATCH"
    not_json = b"not json"
    upload(stub, not_json)
    assert error_info(put("app:1", [layer_desc], cfg=not_json)).reason == "INVALID_IMAGE"

    for name, reason, code in [
        ("nope:1", "IMAGE_NOT_FOUND", grpc.StatusCode.NOT_FOUND),
        ("UPPER", "INVALID_REFERENCE", grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        for call in (stub.GetImage, stub.DeleteImage):
            with pytest.raises(grpc.RpcError) as caught:
                call(
                    pb.GetImageRequest(name=name)
                    if call is stub.GetImage
                    else pb.DeleteImageRequest(name=name)
                )
            assert caught.value.code() == code  # type: ignore[attr-defined]
            assert error_info(caught.value).reason == reason
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListImages(pb.ListImagesRequest(page_token="garbage!"))
    assert error_info(caught.value).reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.ReadBlob(pb.ReadBlobRequest(digest=sha256(b"absent"))))
    assert error_info(caught.value).reason == "BLOB_NOT_FOUND"
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.ReadBlob(pb.ReadBlobRequest(digest=sha256(layer), offset_bytes=10**9)))
    assert error_info(caught.value).reason == "INVALID_RANGE"
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetTorrent(pb.GetTorrentRequest(digest="sha256:nope"))
    assert error_info(caught.value).reason == "INVALID_DIGEST"
    # Nothing half-recorded: no image, and the server still answers.
    assert list(stub.ListImages(pb.ListImagesRequest()).images) == []


def test_restart_keeps_images_and_seeds_without_rehashing(
    server: ServerProcess, stub: pb_grpc.ImageServiceStub, tmp_path: Path
) -> None:
    layer = random_bytes(5 * CHUNK + 17, 21)
    pushed = push(stub, "seeded:1", [layer]).image
    torrent = stub.GetTorrent(pb.GetTorrentRequest(digest=sha256(layer))).torrent

    assert server.stop() == 0
    server.start()
    with server.channel() as channel:
        after = pb_grpc.ImageServiceStub(channel)
        assert after.GetImage(pb.GetImageRequest(name="seeded:1")).image == pushed
        assert after.GetTorrent(pb.GetTorrentRequest(digest=sha256(layer))).torrent == torrent
    assert '"blobs_seeded": 2' in server.log_tail(200)

    identity = fleet_identity(server, "restart-peer")
    download_with_libtorrent(torrent.metainfo, server.bt_port, tmp_path / "dl", identity=identity)
    assert (tmp_path / "dl" / hex_part(sha256(layer))).read_bytes() == layer


def test_a_libtorrent_client_gets_the_exact_bytes(
    server: ServerProcess, stub: pb_grpc.ImageServiceStub, tmp_path: Path
) -> None:
    data = random_bytes(7 * CHUNK + 3, 99)
    upload(stub, data)
    metainfo = stub.GetTorrent(pb.GetTorrentRequest(digest=sha256(data))).torrent.metainfo
    identity = fleet_identity(server, "exact-peer")
    download_with_libtorrent(metainfo, server.bt_port, tmp_path / "dl", identity=identity)
    assert (tmp_path / "dl" / hex_part(sha256(data))).read_bytes() == data


def test_deleted_blob_stops_seeding(
    server: ServerProcess, stub: pb_grpc.ImageServiceStub, tmp_path: Path
) -> None:
    layer = random_bytes(CHUNK, 31)
    push(stub, "gone:1", [layer])
    metainfo = stub.GetTorrent(pb.GetTorrentRequest(digest=sha256(layer))).torrent.metainfo
    stub.DeleteImage(pb.DeleteImageRequest(name="gone:1"))
    identity = fleet_identity(server, "late-peer")
    with pytest.raises(TimeoutError):
        download_with_libtorrent(
            metainfo, server.bt_port, tmp_path / "dl", timeout=5, identity=identity
        )


def test_database_newer_than_the_server_is_refused(server: ServerProcess) -> None:
    import sqlite3

    assert server.stop() == 0
    with sqlite3.connect(server.data_dir / "docket.db") as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
        db.execute("UPDATE alembic_version SET version_num = 'f00dfeed'")  # a newer server's
    db.close()
    with pytest.raises(RuntimeError, match="exited early"):
        server.start(timeout=15)
    assert "newer than this server" in server.log_tail()
    with sqlite3.connect(server.data_dir / "docket.db") as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    db.close()
    server.start()


@pytest.mark.parametrize("named", [True, False], ids=["trailer", "no-trailer"])
def test_an_upload_without_a_digest_is_stored_under_its_own(
    server: ServerProcess, stub: pb_grpc.ImageServiceStub, named: bool
) -> None:
    data = random_bytes(2 * CHUNK + 10, 4)
    digest = sha256(data) if named else None
    response = stub.UploadBlob(trailed(digest, data), timeout=30)
    assert (response.digest, response.size_bytes) == (sha256(data), len(data))
    assert [p.name for p in blob_files(server)] == [hex_part(sha256(data))]
    assert temp_files(server) == []
    assert stub.StatBlobs(pb.StatBlobsRequest(digests=[sha256(data)])).missing_digests == []
    again = stub.UploadBlob(trailed(digest, data), timeout=30)
    assert again.already_existed


async def test_first_pieces_go_to_orders_only(
    server: ServerProcess, stub: pb_grpc.ImageServiceStub
) -> None:
    """ClaimFirstPieces without an order in progress, for a blob the server lacks, or with a
    malformed digest, says so. (Claims within rollouts: test_pull.py, test_rollouts.py; the
    hand-out logic: test_first_pieces.py.)"""
    layer = layer_tar({"f": random_bytes(3 * CHUNK, 11)})
    push(stub, "first/pieces:1", [layer])
    async with await sim_channel(server, "claimer") as channel:
        agents = agent_service_pb2_grpc.AgentServiceStub(channel)
        for digest, order, code, reason in [
            (sha256(layer), "", grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND"),
            (sha256(layer), "no-such-order", grpc.StatusCode.NOT_FOUND, "ORDER_NOT_FOUND"),
            (sha256(b"nothing"), "", grpc.StatusCode.NOT_FOUND, "BLOB_NOT_FOUND"),
            ("sha256:xyz", "", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_DIGEST"),
        ]:
            request = agent_service_pb2.ClaimFirstPiecesRequest(digest=digest, order_id=order)
            with pytest.raises(grpc.RpcError) as caught:
                await agents.ClaimFirstPieces(request, timeout=30)
            assert caught.value.code() == code  # type: ignore[attr-defined]
            assert error_info(caught.value).reason == reason
