"""Peer-to-peer pulls with real processes: a server, agents with Docker engines of their own,
libtorrent swarms, opentracker, a corrupt peer, a blocked seed, a killed agent, docketctl pull.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from docket_common.archive import ImageArchive
from docket_common.pb import agent_service_pb2_grpc
from docket_common.pb import image_service_pb2 as image_pb
from docket_common.pb import image_service_pb2_grpc as image_grpc
from tests.support.agents import SimulatedAgent, StartAgent, agent_channel, enroll, wait_for_states
from tests.support.archives import layer_tar, random_bytes, sha256, write_legacy_archive
from tests.support.corrupt_peer import CorruptPeer
from tests.support.dockerd import DockerEngine
from tests.support.images import ImagePair
from tests.support.netns import cluster_prefix, ip
from tests.support.server import (
    ServerProcess,
    background_rollout,
    docketctl,
    free_port,
    rollout,
)
from tests.support.tracker import Tracker

FAST = ["--heartbeat-interval", "0.5", "--hello-timeout", "2"]
MiB = 1024 * 1024

prefix = pytest.fixture(cluster_prefix)


def make_server(tmp_path: Path, *args: str) -> ServerProcess:
    return ServerProcess(data_dir=tmp_path / "server", extra_args=[*FAST, *args]).start()


def push_archive(server: ServerProcess, tmp_path: Path, name: str, layers: list[bytes]) -> Any:
    archive = write_legacy_archive(tmp_path / f"{name.replace('/', '_')}.tar", name, layers)
    result = docketctl("push", name, "--archive", str(archive.path), "-q", server=server)
    assert result.returncode == 0, result.stderr
    return archive


@pytest.mark.docker
def test_rollout_loads_the_image_on_every_host_and_a_sibling_moves_only_new_layers(
    tmp_path: Path,
    agents: StartAgent,
    docker_engine: DockerEngine,
    test_images: ImagePair,
    agent_engines: list[DockerEngine],
) -> None:
    server = make_server(tmp_path)
    try:
        for ref in (test_images.app1, test_images.app2):
            pushed = docketctl("push", ref, "-q", server=server, env=docker_engine.env())
            assert pushed.returncode == 0, pushed.stderr
        names = [f"host{i}" for i in range(3)]
        agents_by_name = {}
        for name, engine in zip(names, agent_engines, strict=True):
            engine.client.images.prune(filters={"dangling": False})
            agents_by_name[name] = agents(server, name, groups=["web"], docker_host=engine.host)
        wait_for_states(server, dict.fromkeys(names, "online"))

        code, events, hosts = rollout(server, test_images.app1, "--hosts", "web")
        assert code == 0, hosts
        source = docker_engine.client.images.get(test_images.app1)
        for name, engine in zip(names, agent_engines, strict=True):
            assert hosts[name]["state"] == "succeeded"
            assert hosts[name]["image_id"] == source.id
            loaded = engine.client.images.get(test_images.app1)
            assert loaded.attrs["RootFS"]["Layers"] == source.attrs["RootFS"]["Layers"]
            out = engine.client.containers.run(test_images.app1, ["echo", "loaded"], remove=True)
            assert out == b"loaded\n"
        # Every state each host went through, as the server recorded it (the live events
        # coalesce a host's changes within 250 ms; the history does not).
        [latest] = json.loads(docketctl("rollouts", "list", "-o", "json", server=server).stdout)
        shown = docketctl("rollouts", "show", latest["id"], "-o", "json", server=server)
        history = json.loads(shown.stdout)["history"]
        for name in names:
            states = [h["state"] for h in history if h["host"] == name]
            # The agent sends accepted, verifying and loading only once they last 250 ms
            # (SETTLE): each may be there or not, in its place.
            assert states[0] == "pending", states
            assert states[-1] == "succeeded", states
            assert "downloading" in states, states
            flow = ["pending", "accepted", "downloading", "verifying", "loading", "succeeded"]
            assert states == sorted(states, key=flow.index), states
        for name in names:  # the engine was fed the layers while they arrived
            loaded_lines = [
                x for x in agents_by_name[name].log_tail(400).splitlines() if "image loaded" in x
            ]
            assert loaded_lines
            assert all("overlapped" in x and "true" in x.lower() for x in loaded_lines)
        pieces = [e["host"]["done_pieces"] for e in events if e["type"] == "host"]
        assert max(pieces) == hosts[names[0]]["total_pieces"]

        # The sibling shares the base layer: only its own layer and config travel.
        code, _, hosts2 = rollout(server, test_images.app2, "--hosts", "web")
        assert code == 0, hosts2
        base = source.attrs["RootFS"]["Layers"][0]
        sibling = docker_engine.client.images.get(test_images.app2)
        base_size = next(
            layer["size_bytes"]
            for layer in json.loads(
                docketctl("inspect", test_images.app2, "-o", "json", server=server).stdout
            )["layers"]
            if layer["digest"] == base
        )
        for name, engine in zip(names, agent_engines, strict=True):
            host = hosts2[name]
            assert host["cached_bytes"] >= base_size
            # Only the new layer and the config travel (give or take a duplicate block of
            # libtorrent's end game); the base layer does not.
            moved = host["received_bytes"]
            assert moved <= host["total_bytes"] - base_size + 64 * 1024
            assert engine.client.images.get(test_images.app2).id == sibling.id
    finally:
        server.stop()


def test_pieces_flow_between_agents_not_only_from_the_server(
    tmp_path: Path, agents: StartAgent
) -> None:
    server = make_server(tmp_path)
    try:
        push_archive(server, tmp_path, "big/one:1", [layer_tar({"a": random_bytes(MiB, 1) * 96})])
        names = [f"p{i}" for i in range(3)]
        for name in names:
            agents(server, name, groups=["swarm"])
        wait_for_states(server, dict.fromkeys(names, "online"))
        code, events, hosts = rollout(server, "big/one:1", "--hosts", "swarm", "--prefetch-only")
        assert code == 0, hosts
        from_peers = {n: h["peer_bytes"] for n, h in hosts.items()}
        print("bytes from other agents:", from_peers)
        assert sum(from_peers.values()) > 0
        reported = {p for e in events if e["type"] == "host" for p in [e["host"]["host"]]}
        assert reported == set(names)
        assert all(h["done_pieces"] == h["total_pieces"] for h in hosts.values())
        # The server handed out each piece about once (first pieces), and the agents traded
        # the rest: it sent about one copy of the image, not one per host.
        size = next(iter(hosts.values()))["total_bytes"]
        first = sum(h["first_piece_bytes"] for h in hosts.values())
        sent = sum(h["server_bytes"] for h in hosts.values())
        print(f"server sent {sent / size:.2f}x the image, {first / size:.2f}x as first pieces")
        assert 0.9 * size <= first <= sent <= 1.3 * size
        # And none was handed much more than its share: each passes its pieces on to all.
        most = max(h["first_piece_bytes"] for h in hosts.values())
        assert most <= 1.15 * size / len(names) + 2 * MiB, (most, size)
    finally:
        server.stop()


def test_opentracker_alone_finds_the_peers(tmp_path: Path, agents: StartAgent) -> None:
    with Tracker() as tracker:
        server = make_server(
            tmp_path, "--tracker", tracker.announce_url, "--peer-source", "tracker"
        )
        try:
            archive = push_archive(
                server, tmp_path, "tracked:1", [layer_tar({"t": random_bytes(4 * MiB, 2)})]
            )
            with server.channel() as channel:
                stub = image_grpc.ImageServiceStub(channel)
                hashes = []
                for digest in [archive.config_digest, *archive.layer_digests]:
                    response = stub.GetTorrent(image_pb.GetTorrentRequest(digest=digest))
                    assert list(response.peers) == []  # the server hands out no peers
                    hashes.append(response.torrent.info_hash)
            tracker.allow(*hashes)
            # The server's seed announces when it adds a torrent; restart it so it announces
            # now that the tracker accepts these torrents.
            server.stop()
            server.start()
            for name in ("t1", "t2"):
                agents(server, name, groups=["tracked"])
            wait_for_states(server, {"t1": "online", "t2": "online"})
            code, _, hosts = rollout(
                server, "tracked:1", "--hosts", "tracked", "--prefetch-only", timeout=120
            )
            assert code == 0, hosts
            assert all(h["fallback_bytes"] == 0 for h in hosts.values())
            assert all(h["bittorrent_bytes"] > 0 for h in hosts.values())
        finally:
            server.stop()


def test_a_blocked_seed_and_a_corrupt_peer_still_end_with_the_right_bytes(
    tmp_path: Path, agents: StartAgent
) -> None:
    """The seed's advertised port is closed and the only peer lies: libtorrent rejects every
    piece it sends, and the agent fills the gaps from the server over gRPC."""
    closed = free_port()
    server = make_server(tmp_path, "--bt-advertise", f"127.0.0.1:{closed}")
    layer = layer_tar({"c": random_bytes(3 * MiB, 3)})
    try:
        archive = push_archive(server, tmp_path, "lied/about:1", [layer])
        with server.channel() as channel:
            stub = image_grpc.ImageServiceStub(channel)
            metainfo = stub.GetTorrent(
                image_pb.GetTorrentRequest(digest=archive.layer_digests[0])
            ).torrent.metainfo

        async def with_liar() -> None:
            liar_id = await enroll(server, "liar")
            with CorruptPeer(
                metainfo, layer, tmp_path / "liar", (liar_id.cert_pem, liar_id.key_pem)
            ) as liar:
                async with agent_channel(server, liar_id) as channel:
                    fake = SimulatedAgent(
                        agent_service_pb2_grpc.AgentServiceStub(channel),
                        "liar",
                        bt_endpoint=liar.endpoint,
                        cached_digests=(archive.layer_digests[0],),
                    )
                    task = asyncio.create_task(fake.run())
                    await asyncio.wait_for(fake.welcomed.wait(), 10)
                    agent = agents(
                        server, "honest", groups=["h"], extra_args=["--fallback-after", "2"]
                    )
                    await asyncio.to_thread(wait_for_states, server, {"honest": "online"})
                    code, _, hosts = await asyncio.to_thread(
                        rollout, server, "lied/about:1", "--hosts", "h", "--prefetch-only"
                    )
                    task.cancel()
                    assert code == 0, hosts
                    assert liar.uploaded_bytes() > 0  # it did send its bad bytes
                    assert hosts["honest"]["fallback_bytes"] > 0
                    blob = (
                        agent.data_dir
                        / "blobs"
                        / "sha256"
                        / archive.layer_digests[0][7:9]
                        / archive.layer_digests[0][7:]
                    )
                    assert sha256(blob.read_bytes()) == archive.layer_digests[0]
                    assert "piece failed its hash" in agent.log_tail(400)

        asyncio.run(with_liar())
    finally:
        server.stop()


def test_a_killed_agent_resumes_without_fetching_its_pieces_again(
    tmp_path: Path, agents: StartAgent
) -> None:
    server = make_server(tmp_path)
    try:
        total = 48 * MiB
        push_archive(server, tmp_path, "slow/one:1", [layer_tar({"s": random_bytes(MiB, 4) * 48})])
        agent = agents(server, "r1", groups=["r"], extra_args=["--max-download-rate", str(8 * MiB)])
        wait_for_states(server, {"r1": "online"})
        with background_rollout(server, "slow/one:1", "r") as proc:
            assert proc.stdout is not None
            done_before = 0
            for line in proc.stdout:
                event = json.loads(line)
                if event.get("type") == "host":
                    done_before = event["host"]["done_bytes"]
                    # Killed once the in-order sha256 has saved its first checkpoint (at 16
                    # MiB; under load the hash may lag the pieces by a second or more).
                    if any(agent.data_dir.rglob("*.sha256")):
                        break
            assert done_before < total, "it finished before its sha256 was saved"
            agent.signal(signal.SIGKILL)
            assert agent.proc is not None
            agent.proc.wait()
            time.sleep(1)
            agent.proc = None
            agent.start()
            out, _ = proc.communicate(timeout=120)
        summary = json.loads(out.splitlines()[-1])["summary"]
        host = summary["hosts"][0]
        assert proc.returncode == 0, host
        assert host["state"] == "succeeded"
        # After the restart it fetched only what it lacked, and went on with the sha256 it
        # had saved: the blob in the cache is the right bytes, and hashing the file was not
        # needed to tell.
        assert host["received_bytes"] <= total - done_before + 4 * MiB
        log = agent.log_tail(2000)
        assert "going on with the sha256 saved before a restart" in log
        assert "in-order sha256 does not match" not in log
        blobs = list((agent.data_dir / "blobs" / "sha256").glob("*/*"))
        layer = max(blobs, key=lambda p: p.stat().st_size)
        assert sha256(layer.read_bytes()) == f"sha256:{layer.name}"
        assert not list((agent.data_dir / "partial").glob("*/*.sha256"))
        fetched = host["received_bytes"] / MiB
        print(f"held {done_before / MiB:.0f} MiB when killed; fetched {fetched:.0f} MiB after")
    finally:
        server.stop()


def test_an_image_deleted_mid_rollout_keeps_its_blobs_until_the_rollout_is_done(
    tmp_path: Path, agents: StartAgent
) -> None:
    """`docketctl rm` while a rollout fetches the image: the name goes at once, the blobs
    only once no host fetches them, so the rollout still succeeds."""
    server = make_server(tmp_path, "--bt-advertise", f"127.0.0.1:{free_port()}")
    try:
        layer = layer_tar({"d": random_bytes(2 * MiB, 5)})
        push_archive(server, tmp_path, "doomed:1", [layer])
        # A download limit keeps the agent off the server's first pieces: the seed's port is
        # closed, so nothing arrives until the fallback, 3 s in, from the server's store.
        limit = ["--max-download-rate", str(100 * MiB)]
        agents(server, "d1", groups=["d"], extra_args=["--fallback-after", "3", *limit])
        wait_for_states(server, {"d1": "online"})
        with background_rollout(server, "doomed:1", "d") as proc:
            assert proc.stdout is not None
            for line in proc.stdout:  # until the host has its order: in the snapshot, or after
                event = json.loads(line)
                hosts = event["rollout"]["hosts"] if event.get("type") == "snapshot" else []
                hosts += [event["host"]] if event.get("type") == "host" else []
                if any(h["state"] in ("accepted", "downloading") for h in hosts):
                    break
            removed = docketctl("rm", "doomed:1", "-o", "json", server=server)
            assert removed.returncode == 0, removed.stderr
            assert json.loads(removed.stdout)["deleted_digests"] == []  # kept for the rollout
            assert docketctl("inspect", "doomed:1", server=server).returncode == 1
            assert server.blob_path(sha256(layer)).exists()
            out, _ = proc.communicate(timeout=60)
        host = json.loads(out.splitlines()[-1])["summary"]["hosts"][0]
        assert proc.returncode == 0, host
        assert host["state"] == "succeeded"
        assert host["fallback_bytes"] > 0
        deadline = time.monotonic() + 10
        while server.blob_path(sha256(layer)).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.blob_path(sha256(layer)).exists()
        with server.channel() as channel:
            stub = image_grpc.ImageServiceStub(channel)
            missing = stub.StatBlobs(image_pb.StatBlobsRequest(digests=[sha256(layer)]))
        assert list(missing.missing_digests) == [sha256(layer)]
    finally:
        server.stop()


def test_a_cache_too_small_fails_the_order_and_the_agent_goes_on(
    tmp_path: Path, agents: StartAgent
) -> None:
    server = make_server(tmp_path)
    try:
        push_archive(server, tmp_path, "huge:1", [layer_tar({"h": random_bytes(MiB, 6) * 4})])
        push_archive(server, tmp_path, "small:1", [layer_tar({"s": random_bytes(1000, 7)})])
        agents(server, "c1", groups=["c"], extra_args=["--cache-max-bytes", str(MiB)])
        wait_for_states(server, {"c1": "online"})
        code, _, hosts = rollout(server, "huge:1", "--hosts", "c", "--prefetch-only")
        assert code == 3  # the rollout failed
        assert "the cache holds 1048576 bytes at most" in hosts["c1"]["error"]
        code, _, hosts = rollout(server, "small:1", "--hosts", "c", "--prefetch-only")
        assert code == 0, hosts
    finally:
        server.stop()


def test_a_host_without_docker_stops_at_downloaded_and_says_why(
    tmp_path: Path, agents: StartAgent
) -> None:
    server = make_server(tmp_path)
    try:
        push_archive(server, tmp_path, "nodocker:1", [layer_tar({"n": b"n" * 5000})])
        agents(server, "n1", groups=["n"])
        wait_for_states(server, {"n1": "online"})
        code, _, hosts = rollout(server, "nodocker:1", "--hosts", "n")
        assert code == 3  # the rollout failed
        assert hosts["n1"]["state"] == "failed"
        assert hosts["n1"]["error"] == "downloaded, but not loaded: disabled with --no-docker"
        assert hosts["n1"]["received_bytes"] > 0
    finally:
        server.stop()


@pytest.mark.docker
def test_docketctl_pull_into_an_engine_and_into_an_archive(
    tmp_path: Path,
    docker_engine: DockerEngine,
    test_images: ImagePair,
    agent_engines: list[DockerEngine],
) -> None:
    server = make_server(tmp_path)
    try:
        assert (
            docketctl(
                "push", test_images.app1, "-q", server=server, env=docker_engine.env()
            ).returncode
            == 0
        )
        target = agent_engines[0]
        for image in target.client.images.list():
            target.client.images.remove(image.id, force=True)
        env = target.env() | {"XDG_CACHE_HOME": str(tmp_path / "cache")}
        pulled = docketctl("pull", test_images.app1, server=server, env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert "loaded as sha256:" in pulled.stdout
        # docketctl is no enrolled agent: the TLS swarm turns it away, the server's gRPC not.
        assert "admits enrolled agents only" in pulled.stderr
        assert "over gRPC)" in pulled.stdout
        assert (
            target.client.images.get(test_images.app1).id
            == docker_engine.client.images.get(test_images.app1).id
        )
        archive = tmp_path / "out.tar"
        again = docketctl(
            "pull", test_images.app1, "--output", str(archive), server=server, env=env
        )
        assert again.returncode == 0, again.stderr
        assert "0B fetched" in again.stdout  # all of it was in the pull cache
        with ImageArchive(archive) as opened:
            image = opened.find(test_images.app1)
            assert image.config.digest == docker_engine.client.images.get(test_images.app1).id
        missing = docketctl("pull", "nope:1", server=server, env=env)
        assert missing.returncode == 1
        assert "image nope:1 not found" in missing.stderr
    finally:
        server.stop()


def test_an_order_sent_again_is_carried_out_once(tmp_path: Path, agents: StartAgent) -> None:
    """The agent falls silent mid-download, the server drops it; when it is back, the server
    sends the unfinished order again, and the agent goes on with the one it has."""
    server = make_server(tmp_path)
    try:
        total = 32 * MiB
        push_archive(server, tmp_path, "twice:1", [layer_tar({"t": random_bytes(MiB, 8) * 32})])
        agent = agents(server, "i1", groups=["i"], extra_args=["--max-download-rate", str(8 * MiB)])
        wait_for_states(server, {"i1": "online"})
        with background_rollout(server, "twice:1", "i") as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                event = json.loads(line)
                if event.get("type") == "host" and event["host"]["done_bytes"] > 0:
                    break
            agent.signal(signal.SIGSTOP)
            wait_for_states(server, {"i1": "offline"}, timeout=10)
            agent.signal(signal.SIGCONT)
            out, _ = proc.communicate(timeout=120)
        host = json.loads(out.splitlines()[-1])["summary"]["hosts"][0]
        assert proc.returncode == 0, host
        assert host["received_bytes"] <= total + 2 * MiB  # fetched once, not twice
        assert "order already running" in agent.log_tail(200)
    finally:
        server.stop()


def test_the_cache_bound_evicts_the_least_recently_used_blobs(
    tmp_path: Path, agents: StartAgent
) -> None:
    server = make_server(tmp_path)
    try:
        first = push_archive(
            server, tmp_path, "lru/a:1", [layer_tar({"a": random_bytes(2 * MiB, 9)})]
        )
        second = push_archive(
            server, tmp_path, "lru/b:1", [layer_tar({"b": random_bytes(2 * MiB, 10)})]
        )
        agent = agents(server, "l1", groups=["l"], extra_args=["--cache-max-bytes", str(3 * MiB)])
        wait_for_states(server, {"l1": "online"})

        def cached(digest: str) -> bool:
            hexd = digest.split(":")[1]
            return (agent.data_dir / "blobs" / "sha256" / hexd[:2] / hexd).exists()

        assert rollout(server, "lru/a:1", "--hosts", "l", "--prefetch-only")[0] == 0
        assert cached(first.layer_digests[0])
        assert rollout(server, "lru/b:1", "--hosts", "l", "--prefetch-only")[0] == 0
        assert cached(second.layer_digests[0])
        assert not cached(first.layer_digests[0])  # the older layer made room
        assert "evicted from cache" in agent.log_tail(200)
    finally:
        server.stop()


def test_two_rollouts_at_once_share_their_common_layer(tmp_path: Path, agents: StartAgent) -> None:
    server = make_server(tmp_path)
    try:
        base = layer_tar({"base": random_bytes(MiB, 11) * 16})
        push_archive(server, tmp_path, "pair/a:1", [base, layer_tar({"a": random_bytes(MiB, 12)})])
        push_archive(server, tmp_path, "pair/b:1", [base, layer_tar({"b": random_bytes(MiB, 13)})])
        agents(server, "s1", groups=["s"], extra_args=["--max-download-rate", str(16 * MiB)])
        wait_for_states(server, {"s1": "online"})
        with (
            background_rollout(server, "pair/a:1", "s") as a,
            background_rollout(server, "pair/b:1", "s") as b,
        ):
            out_a, _ = a.communicate(timeout=120)
            out_b, _ = b.communicate(timeout=120)
        host_a = json.loads(out_a.splitlines()[-1])["summary"]["hosts"][0]
        host_b = json.loads(out_b.splitlines()[-1])["summary"]["hosts"][0]
        assert (a.returncode, b.returncode) == (0, 0), (host_a, host_b)
        # Each order counts the shared layer's bytes, but they crossed the wire once.
        fetched_once = len(base) + 2 * (MiB + 10240) + 4 * 4096
        assert max(host_a["received_bytes"], host_b["received_bytes"]) <= fetched_once + MiB
    finally:
        server.stop()


@pytest.mark.docker
@pytest.mark.parametrize(
    ("load_via", "corrupt"),
    [("archive", 1), ("import", 0), ("import", 1), ("auto", 1)],
    ids=str,
)
def test_a_blob_that_fails_its_sha256_is_never_loaded_and_leaves_nothing_half_loaded(
    tmp_path: Path,
    agents: StartAgent,
    agent_engines: list[DockerEngine],
    load_via: str,
    corrupt: int,
) -> None:
    """The server's copy of a layer is corrupted and its torrent made for the corrupt bytes:
    every piece passes its SHA-1, only the blob's sha256 can tell. The agent feeds the engine
    while the layers arrive (`docker load`; with --load-via import the base layer by `docker
    import`, which registers it as it reads it: corrupt, or whole while the other layer
    fails); the load must fail, and the engine must hold neither the image nor any of its
    layers, nor an imported image. With --load-via auto (the default; the image is under
    --pull-below) the engine pulls from the agent's face, which breaks the blob off, and the
    agent ends the engine's pull with the order (else dockerd would retry the blob 5 s and
    15 s on); the engine must then be left with nothing either, and the agent must not take
    the failed pull for an engine that cannot reach its face."""
    import sqlite3

    from docket_common.torrent import make_torrent, torrent_ssl_cert

    server = make_server(tmp_path)
    layers = [random_bytes(3 * MiB, 21), random_bytes(3 * MiB, 22)]
    archive = push_archive(
        server,
        tmp_path,
        "corrupt/late:1",
        [layer_tar({"a": layers[0]}), layer_tar({"b": layers[1]})],
    )
    server.stop()
    digest = archive.layer_digests[corrupt]
    blob = server.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a piece in the middle: the load is well under way
    blob.write_bytes(bytes(data))
    db = sqlite3.connect(server.data_dir / "docket.db")
    (metainfo,) = db.execute("SELECT metainfo FROM blobs WHERE digest = ?", (digest,)).fetchone()
    info = lt_info(metainfo)
    length = int(info[b"piece length"])
    pieces = b"".join(
        hashlib.sha1(data[i : i + length]).digest() for i in range(0, len(data), length)
    )
    forged = make_torrent(
        digest, len(data), length, pieces, None, torrent_ssl_cert(bytes(metainfo))
    )
    db.execute(
        "UPDATE blobs SET metainfo = ?, info_hash = ? WHERE digest = ?",
        (forged.metainfo, forged.info_hash, digest),
    )
    db.commit()
    db.close()
    engine = agent_engines[0]
    layers_dir = engine.dir / "data" / "image"
    before_images = {i.id for i in engine.client.images.list(all=True)}
    before_layers = sorted(p.name for p in layers_dir.glob("*/layerdb/sha256/*"))
    server.start()
    try:
        agent = agents(
            server,
            "strict",
            groups=["c"],
            docker_host=engine.host,
            extra_args=["--load-via", load_via],
        )
        wait_for_states(server, {"strict": "online"})
        since = int(time.time())
        code, _, hosts = rollout(server, "corrupt/late:1", "--hosts", "c")
        assert code != 0
        assert hosts["strict"]["state"] == "failed"
        assert "hashes to" in hosts["strict"]["error"], hosts
        log = agent.log_tail(400)
        assert "loading while the layers arrive" in log
        if load_via == "import" and corrupt == 1:  # the base layer did go in, by import
            imports = image_events(engine, since, "import")
            assert imports
        if load_via == "auto":
            assert "loading by the engine's pull from the registry face" in log
            assert "cannot reach the registry face" not in log
            # The agent ends the engine's pull with the order; dockerd, its client gone,
            # cancels the pull and releases what it had, on its own time.
            deadline = time.monotonic() + 30
            while "the engine's pull from the registry face ended" not in agent.log_tail(400) or (
                sorted(p.name for p in layers_dir.glob("*/layerdb/sha256/*")) != before_layers
            ):
                if time.monotonic() > deadline:
                    break  # the assertions below say what is left
                time.sleep(0.2)
        assert {i.id for i in engine.client.images.list(all=True)} == before_images
        assert sorted(p.name for p in layers_dir.glob("*/layerdb/sha256/*")) == before_layers
        cached = agent.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
        assert not cached.exists()
    finally:
        server.stop()


def image_events(engine: DockerEngine, since: int, event: str) -> list[dict[str, Any]]:
    """The engine's image events of one kind ("pull", "import") from ``since`` to now."""
    return list(
        engine.client.api.events(
            since=since,
            until=int(time.time()) + 1,
            filters={"type": "image", "event": event},
            decode=True,
        )
    )


def lt_info(metainfo: bytes) -> Any:
    import libtorrent as lt

    decoded: Any = lt.bdecode(bytes(metainfo))
    return decoded[b"info"]


@pytest.mark.docker
@pytest.mark.parametrize("load_via", ["auto", "registry"])
def test_load_via_the_registry_face_pulls_while_the_layers_arrive(
    tmp_path: Path, agents: StartAgent, agent_engines: list[DockerEngine], load_via: str
) -> None:
    """--load-via registry, and auto (the default) for an image under --pull-below: the
    engine pulls the image from the agent's own registry face during the rollout, from the
    order's downloads, and ends up with the image under its name only. The server records
    the rollout and no pull besides it. An image of --pull-below bytes or more is loaded by
    import under auto."""
    server = make_server(tmp_path)
    try:
        archive = push_archive(
            server,
            tmp_path,
            "via/face:2",
            [layer_tar({"a": random_bytes(3 * MiB, 31)}), layer_tar({"b": random_bytes(MiB, 32)})],
        )
        engine = agent_engines[1]
        port = free_port()
        agent = agents(
            server,
            "puller",
            groups=["v"],
            docker_host=engine.host,
            extra_args=["--registry-listen", f"127.0.0.1:{port}", "--load-via", load_via],
        )
        wait_for_states(server, {"puller": "online"})
        since = int(time.time())
        code, _, hosts = rollout(server, "via/face:2", "--hosts", "v")
        assert code == 0, hosts
        assert hosts["puller"]["image_id"] == archive.config_digest
        image = engine.client.images.get("via/face:2")
        assert image.id == archive.config_digest
        assert image.tags == ["via/face:2"]
        assert not any(str(port) in d for d in image.attrs.get("RepoDigests", []))
        log = agent.log_tail(200)
        assert "loading by the engine's pull from the registry face" in log
        assert "overlapped" in log
        pulls = docketctl("pulls", "-o", "json", server=server)
        assert pulls.returncode == 0, pulls.stderr
        assert json.loads(pulls.stdout) == []
        engine_pulls = image_events(engine, since, "pull")
        assert len(engine_pulls) == 1
        if load_via == "registry":
            return
        # Past --pull-below (4 MiB of files, their tar headers and the config): by import.
        big = push_archive(
            server,
            tmp_path,
            "via/face:big",
            [layer_tar({"c": random_bytes(3 * MiB, 35)}), layer_tar({"d": random_bytes(MiB, 36)})],
        )
        assert agent.stop() == 0
        agent = agents(
            server,
            "puller",
            groups=["v"],
            docker_host=engine.host,
            extra_args=["--registry-listen", f"127.0.0.1:{port}", "--pull-below", "4Mi"],
        )
        wait_for_states(server, {"puller": "online"})
        since = int(time.time())
        code, _, hosts = rollout(server, "via/face:big", "--hosts", "v")
        assert code == 0, hosts
        assert engine.client.images.get("via/face:big").id == big.config_digest
        imports = image_events(engine, since, "import")
        assert len(imports) == 1
    finally:
        server.stop()


@pytest.mark.docker
def test_auto_imports_when_the_engine_cannot_reach_the_face_and_from_then_on(
    tmp_path: Path, agents: StartAgent, prefix: str
) -> None:
    """An engine in a network namespace of its own (as for an agent in a container without
    host networking): its 127.0.0.1 is not the agent's, so its pull of a small image from
    the face fails before it asks for anything. --load-via auto loads that image by import,
    and the next one straight away; --load-via registry fails the order instead."""
    ns = f"{prefix}-h1"
    subprocess.run([ip(), "netns", "add", ns], check=True)
    subprocess.run([ip(), "-n", ns, "link", "set", "lo", "up"], check=True)
    server = make_server(tmp_path)
    try:
        with DockerEngine(netns=ns) as engine:
            port = free_port()
            face = ["--registry-listen", f"127.0.0.1:{port}"]
            push_archive(server, tmp_path, "apart/a:1", [layer_tar({"a": random_bytes(MiB, 41)})])
            push_archive(server, tmp_path, "apart/b:1", [layer_tar({"b": random_bytes(MiB, 42)})])
            agent = agents(server, "apart", groups=["ns"], docker_host=engine.host, extra_args=face)
            wait_for_states(server, {"apart": "online"})
            since = int(time.time())
            for name in ("apart/a:1", "apart/b:1"):
                code, _, hosts = rollout(server, name, "--hosts", "ns")
                assert code == 0, hosts
                assert engine.client.images.get(name).tags == [name]
            log = agent.log_tail(400)
            assert log.count("loading by the engine's pull from the registry face") == 1
            assert log.count("the Docker engine cannot reach the registry face") == 1
            assert len(image_events(engine, since, "import")) == 2
            assert image_events(engine, since, "pull") == []

            assert agent.stop() == 0
            push_archive(server, tmp_path, "apart/c:1", [layer_tar({"c": random_bytes(MiB, 43)})])
            agents(
                server,
                "apart",
                groups=["ns"],
                docker_host=engine.host,
                extra_args=[*face, "--load-via", "registry"],
            )
            wait_for_states(server, {"apart": "online"})
            code, _, hosts = rollout(server, "apart/c:1", "--hosts", "ns")
            assert code != 0
            assert hosts["apart"]["state"] == "failed"
            assert f"127.0.0.1:{port}" in hosts["apart"]["error"], hosts
            with pytest.raises(docker.errors.ImageNotFound):
                engine.client.images.get("apart/c:1")
    finally:
        server.stop()


@pytest.mark.docker
def test_load_via_import_registers_the_base_layer_as_it_arrives_and_leaves_no_import(
    tmp_path: Path, agents: StartAgent, agent_engines: list[DockerEngine]
) -> None:
    """--load-via import: the engine takes the base layer by `docker import` during the
    download and the rest by `docker load`; it ends with the image under its name, whose
    layers hold the pushed bytes, and without the import's own image."""
    server = make_server(tmp_path)
    try:
        base, top = random_bytes(4 * MiB, 33), random_bytes(MiB, 34)
        archive = push_archive(
            server, tmp_path, "via/import:1", [layer_tar({"a": base}), layer_tar({"b": top})]
        )
        engine = agent_engines[1]
        before = {i.id for i in engine.client.images.list(all=True)}
        agents(
            server,
            "importer",
            groups=["imp"],
            docker_host=engine.host,
            extra_args=["--load-via", "import"],
        )
        wait_for_states(server, {"importer": "online"})
        since = int(time.time())
        code, _, hosts = rollout(server, "via/import:1", "--hosts", "imp")
        assert code == 0, hosts
        assert hosts["importer"]["image_id"] == archive.config_digest
        imports = image_events(engine, since, "import")
        assert len(imports) == 1
        image = engine.client.images.get("via/import:1")
        assert image.id == archive.config_digest
        assert image.tags == ["via/import:1"]
        assert {i.id for i in engine.client.images.list(all=True)} - before == {image.id}
        container = engine.client.containers.create(image.id, command=["none"])
        try:
            for name, data in (("a", base), ("b", top)):
                stream, _ = container.get_archive(f"/{name}")
                with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                    member = tar.extractfile(name)
                    assert member is not None
                    assert member.read() == data
        finally:
            container.remove()
    finally:
        server.stop()


def test_a_lone_agent_on_a_fast_link_claims_more_at_once_and_still_gets_each_piece_once(
    tmp_path: Path, agents: StartAgent
) -> None:
    """On loopback the largest claims come back in well under 100 ms, so the agent adds
    ClaimFirstPieces calls beyond the first two; the server still hands out each piece once:
    the agent's first pieces are exactly the blob."""
    server = make_server(tmp_path)
    try:
        size = 24 * MiB
        push_archive(server, tmp_path, "fast/link:1", [layer_tar({"f": random_bytes(size, 41)})])
        agent = agents(server, "alone", groups=["fast"])
        wait_for_states(server, {"alone": "online"})
        code, _, hosts = rollout(server, "fast/link:1", "--hosts", "fast", "--prefetch-only")
        assert code == 0, hosts
        (line,) = [x for x in agent.log_tail(200).splitlines() if "blobs in the cache" in x]
        timelines = json.loads(line)["timelines"]
        layer = max(timelines, key=lambda t: t["bytes"])
        assert layer["claim_workers"] > 2
        assert layer["first_piece_bytes"] == layer["bytes"]  # all from the server, once each
        assert hosts["alone"]["first_piece_bytes"] == sum(t["bytes"] for t in timelines)
    finally:
        server.stop()
