"""Garbage collection of blobs no image uses: `docketctl gc` against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from docket_common.pb import agent_pb2, agent_service_pb2, agent_service_pb2_grpc
from docket_common.pb import image_service_pb2 as pb
from docket_common.pb import image_service_pb2_grpc as pb_grpc
from docket_common.sizes import iec, parse_size
from tests.support.agents import SimulatedAgent, sim_channel
from tests.support.archives import random_bytes, sha256
from tests.support.server import ServerProcess, background_rollout, docketctl
from tests.test_registry_server import config_for, push

GRACE = 3.0  # the server's --gc-grace in these tests, seconds


@pytest.fixture
def gc_server(tmp_path: Any) -> Iterator[ServerProcess]:
    """A server whose blobs no image uses may go after GRACE seconds, collected only when
    asked (no periodic run to race the test)."""
    proc = ServerProcess(
        data_dir=tmp_path / "server",
        extra_args=["--gc-grace", f"{GRACE}s", "--gc-interval", "off"],
    ).start()
    yield proc
    code = proc.stop()
    assert code == 0, f"docket-server exited {code}:\n{proc.log_tail()}"


def gc(server: ServerProcess, *args: str) -> dict[str, Any]:
    result = docketctl("gc", *args, "-o", "json", server=server)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def collected(report: dict[str, Any]) -> set[str]:
    return {b["digest"] for b in report["blobs"]}


def missing(server: ServerProcess, digests: list[str]) -> set[str]:
    with server.channel() as channel:
        stub = pb_grpc.ImageServiceStub(channel)
        return set(stub.StatBlobs(pb.StatBlobsRequest(digests=digests)).missing_digests)


def test_a_retag_leaves_the_old_layer_to_collect_after_the_grace_not_the_shared_base(
    gc_server: ServerProcess,
) -> None:
    base, old, new = (random_bytes(300_000, seed) for seed in (1, 2, 3))
    with gc_server.channel() as channel:
        stub = pb_grpc.ImageServiceStub(channel)
        first = push(stub, "app:1", [base, old]).image.digest
        push(stub, "app:1", [base, new])  # the tag moves: app@first is untagged now
    old_blobs = {sha256(old), sha256(config_for([base, old]))}
    kept_blobs = {sha256(base), sha256(new), sha256(config_for([base, new]))}

    before = gc(gc_server, "--grace", "1h")
    assert before["blobs"] == []
    assert before["removed_manifests"] == []
    assert before["freed_bytes"] == 0
    time.sleep(GRACE + 0.2)  # older than the server's grace now

    # With --keep-untagged the untagged image stays, pullable by digest, and so its blobs.
    kept = gc(gc_server, "--keep-untagged")
    assert kept["blobs"] == []
    assert kept["removed_manifests"] == []
    assert docketctl("inspect", f"app@{first}", server=gc_server).returncode == 0

    dry = gc(gc_server, "--dry-run")
    assert dry["dry_run"] is True
    assert dry["removed_manifests"] == [f"app@{first}"]
    assert collected(dry) == old_blobs  # what removing it would free: not the shared base
    # Nothing deleted. (Looked at on disk: StatBlobs is what a push asks, and would keep
    # the blobs for another grace period.)
    assert all(gc_server.blob_path(d).is_file() for d in old_blobs | kept_blobs)
    assert docketctl("inspect", f"app@{first}", server=gc_server).returncode == 0

    report = gc(gc_server)  # the server's own grace
    assert report["dry_run"] is False
    assert report["removed_manifests"] == [f"app@{first}"]
    assert collected(report) == old_blobs
    assert report["freed_bytes"] == len(old) + len(config_for([base, old]))
    assert missing(gc_server, sorted(old_blobs | kept_blobs)) == old_blobs
    assert not gc_server.blob_path(sha256(old)).exists()
    assert gc_server.blob_path(sha256(base)).is_file()
    image = docketctl("inspect", "app:1", "-o", "json", server=gc_server)
    assert image.returncode == 0, image.stderr
    assert [d["digest"] for d in json.loads(image.stdout)["layers"]] == [
        sha256(base),
        sha256(new),
    ]
    gone = docketctl("inspect", f"app@{first}", server=gc_server)
    assert gone.returncode == 1
    assert "IMAGE_NOT_FOUND" in gone.stderr
    assert gc(gc_server, "--grace", "0")["blobs"] == []  # nothing left
    assert '"garbage collected"' in gc_server.log_path.read_text()


def test_an_abandoned_registry_push_is_collected_after_the_grace_and_not_before(
    gc_server: ServerProcess,
) -> None:
    registry = gc_server.registry_client()
    layer = random_bytes(200_000, 7)
    assert registry.push_blob("abandoned", layer).status_code == 201  # and no manifest
    digest = sha256(layer)

    assert gc(gc_server)["blobs"] == []  # younger than the grace: a push in progress
    assert gc(gc_server, "--grace", "1h", "--dry-run")["blobs"] == []
    dry = gc(gc_server, "--grace", "0", "--dry-run")
    assert dry["blobs"] == [{"digest": digest, "size_bytes": len(layer)}]
    assert registry.request("HEAD", f"/v2/abandoned/blobs/{digest}").status_code == 200

    table = docketctl("gc", "--grace", "0", server=gc_server)
    assert table.returncode == 0, table.stderr
    assert digest in table.stdout
    assert "Deleted 1 blob, 200kB" in table.stdout
    assert registry.request("HEAD", f"/v2/abandoned/blobs/{digest}").status_code == 404
    assert not gc_server.blob_path(digest).exists()
    assert missing(gc_server, [digest]) == {digest}
    # The same bytes pushed again are taken again.
    assert registry.push_blob("abandoned", layer).status_code == 201
    assert gc_server.blob_path(digest).is_file()


def test_a_push_that_asks_for_an_unused_blob_keeps_it_for_the_grace(
    gc_server: ServerProcess,
) -> None:
    """`docker push` asks (HEAD) whether a layer is there and then skips uploading it: the
    blob, old and unused, must not go before its manifest comes."""
    registry = gc_server.registry_client()
    layer = random_bytes(100_000, 8)
    assert registry.push_blob("asked", layer).status_code == 201
    time.sleep(GRACE + 0.2)
    assert registry.request("HEAD", f"/v2/asked/blobs/{sha256(layer)}").status_code == 200
    report = gc(gc_server)
    assert report["blobs"] == []
    assert report["kept_blobs"] == 1
    assert gc_server.blob_path(sha256(layer)).is_file()


def test_a_blob_file_without_a_record_is_collected_once_old(gc_server: ServerProcess) -> None:
    """A crash between deleting a blob's record and its file leaves the file: it goes."""
    data = b"left behind by a crash"
    path = gc_server.blob_path(sha256(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    assert gc(gc_server, "--grace", "1h")["blobs"] == []  # could be an upload committing
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    report = gc(gc_server, "--grace", "1h")
    assert report["blobs"] == [{"digest": sha256(data), "size_bytes": len(data)}]
    assert not path.exists()


def test_a_blob_a_running_rollout_fetches_is_not_collected(
    gc_server: ServerProcess,
) -> None:
    base, old, new = (random_bytes(200_000, seed) for seed in (11, 12, 13))
    with gc_server.channel() as channel:
        push(pb_grpc.ImageServiceStub(channel), "roll:1", [base, old])

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with await sim_channel(gc_server, "h0") as channel:
            stub = agent_service_pb2_grpc.AgentServiceStub(channel)
            host = SimulatedAgent(stub, "h0", groups=("g",))
            stream = asyncio.create_task(host.run())
            try:
                await asyncio.wait_for(host.welcomed.wait(), 10)
                with background_rollout(gc_server, "roll:1", "g") as proc:
                    order = await asyncio.wait_for(host.orders.get(), 20)
                    assert sha256(old) in {b.digest for b in order.layers}
                    with gc_server.channel() as images:
                        push(pb_grpc.ImageServiceStub(images), "roll:1", [base, new])
                    during = await asyncio.to_thread(gc, gc_server, "--grace", "0")
                    host.send(
                        agent_service_pb2.ConnectRequest(
                            task_update=agent_pb2.TaskUpdate(
                                order_id=order.order_id,
                                state=agent_pb2.TASK_STATE_FAILED,
                                error="simulated: gave up",
                            )
                        )
                    )
                    await asyncio.to_thread(proc.communicate, timeout=60)
                after = await asyncio.to_thread(gc, gc_server, "--grace", "0")
                return during, after
            finally:
                stream.cancel()

    during, after = asyncio.run(scenario())
    assert sha256(old) not in collected(during)
    assert during["removed_manifests"] == []  # its blobs are in flight
    assert sha256(old) in collected(after)
    assert sha256(base) not in collected(after)


def test_gc_is_for_admins_only(gc_server: ServerProcess) -> None:
    publisher = gc_server.token("publisher")
    result = docketctl("gc", "--dry-run", server=gc_server, env={"DOCKET_TOKEN": publisher})
    assert result.returncode == 1
    assert "PERMISSION_DENIED" in result.stderr


def test_sizes_are_read_and_shown_in_binary_and_decimal_units() -> None:
    assert parse_size("1073741824") == 1 << 30
    assert parse_size("512Mi") == parse_size("512MiB") == 512 << 20
    assert parse_size("2G") == 2_000_000_000
    assert parse_size("8k") == 8000
    with pytest.raises(ValueError, match="want a size"):
        parse_size("lots")
    assert iec(3_250_000) == "3.1 MiB"
    assert iec(8 << 20) == "8 MiB"
    assert iec(512) == "512 B"


def test_the_server_collects_on_its_own_every_interval(tmp_path: Any) -> None:
    proc = ServerProcess(
        data_dir=tmp_path / "server", extra_args=["--gc-grace", "0", "--gc-interval", "1s"]
    ).start()
    try:
        layer = random_bytes(50_000, 9)
        assert proc.registry_client().push_blob("left", layer).status_code == 201
        path = proc.blob_path(sha256(layer))
        deadline = time.monotonic() + 30
        while path.exists():
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.1)
        assert '"garbage collected"' in proc.log_path.read_text()
    finally:
        code = proc.stop()
    assert code == 0, proc.log_tail()
