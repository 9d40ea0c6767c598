"""Pulls through the agents' registry faces, with real processes: docker pull on three
engines at once, skopeo, containerd with the mirror config (agent up and down), Docker's
registry-mirrors, the pulls the server records, and the faults (unknown images, ranges, a
corrupt peer, a cache too small, an agent restarted mid-pull, the server unreachable)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from docket_common.pb import agent_service_pb2_grpc
from docket_common.pb import image_service_pb2 as image_pb
from docket_common.pb import image_service_pb2_grpc as image_grpc
from tests.support.agents import (
    AgentProcess,
    SimulatedAgent,
    StartAgent,
    agent_channel,
    enroll,
    wait_for_states,
)
from tests.support.corrupt_peer import CorruptPeer
from tests.support.dockerd import DockerEngine
from tests.support.images import write_base_rootfs
from tests.support.oci import RegistryClient, build_image, expect_error, sha256, tar_of
from tests.support.registry import skopeo_ok, tool
from tests.support.server import BIN, ServerProcess, docketctl, free_port

FAST = ["--heartbeat-interval", "0.5", "--hello-timeout", "2"]
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def docket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("agent-registry") / "server"
    proc = ServerProcess(data_dir=data, extra_args=FAST).start()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def pulls(server: ServerProcess, *args: str) -> list[dict[str, Any]]:
    result = docketctl("pulls", "-o", "json", *args, server=server)
    assert result.returncode == 0, result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


def docker(engine: DockerEngine, *args: str) -> str:
    result = subprocess.run(
        ["docker", *args], env=engine.env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout


def random_bytes(size: int, seed: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest() * 64  # 2 KiB runs
        counter += 1
    return bytes(out[:size])


def random_layer(size: int, seed: int) -> bytes:
    return tar_of({f"data-{seed}.bin": random_bytes(size, seed)})


def push_runnable(server: ServerProcess, tmp_path: Path, repository: str, extra: int) -> Any:
    """An image docker can run (busybox), with /marker (its repository) and ``extra`` more
    bytes, pushed over HTTP as repository:1."""
    rootfs = tmp_path / f"{repository.replace('/', '_')}-rootfs.tar"
    write_base_rootfs(rootfs)
    layer = tar_of(
        {"marker": repository.encode(), "data.bin": random_bytes(extra, len(repository))}
    )
    image = build_image([rootfs.read_bytes(), layer])
    assert server.registry_client().push_image(repository, "1", image).status_code == 201
    return image


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    import requests

    response = requests.get(url, headers=headers or {}, timeout=120)
    return response.status_code, dict(response.headers), response.content


@pytest.mark.docker
def test_three_engines_pull_through_their_agents_at_once(
    tmp_path: Path,
    docket: ServerProcess,
    agent_engines: list[DockerEngine],
    agents: StartAgent,
) -> None:
    image = push_runnable(docket, tmp_path, "through/agents", 12 * MiB)
    names = ["pa1", "pa2", "pa3"]
    started = [
        agents(docket, name, groups=["pa"], docker_host=engine.host)
        for name, engine in zip(names, agent_engines, strict=True)
    ]
    wait_for_states(docket, dict.fromkeys(names, "online"))
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def pull(agent: AgentProcess, engine: DockerEngine) -> None:
        results[agent.name] = subprocess.run(
            ["docker", "pull", f"{agent.registry}/through/agents:1"],
            env=engine.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    threads = [
        threading.Thread(target=pull, args=(agent, engine))
        for agent, engine in zip(started, agent_engines, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for agent, engine in zip(started, agent_engines, strict=True):
        result = results[agent.name]
        assert result.returncode == 0, result.stderr
        assert f"Digest: {image.digest}" in result.stdout
        ref = f"{agent.registry}/through/agents:1"
        assert docker(engine, "run", "--rm", "--network", "none", ref, "cat", "/marker") == (
            "through/agents"
        )

    recorded = [p for p in pulls(docket, "--hosts", "pa") if p["image"] == "through/agents:1"]
    assert sorted(p["host"] for p in recorded) == names
    assert all(p["state"] == "succeeded" for p in recorded)
    size = sum(len(b) for b in image.blobs)
    from_server = sum(p["server_bytes"] + p["fallback_bytes"] for p in recorded)
    from_peers = sum(p["peer_bytes"] for p in recorded)
    # About one copy from the server; the hosts traded the rest.
    assert from_server <= 1.3 * size, (from_server, size, recorded)
    assert from_peers >= size
    assert all(p["image_digest"] == image.digest for p in recorded)


def test_skopeo_copies_through_an_agent(
    tmp_path: Path, docket: ServerProcess, agents: StartAgent
) -> None:
    image = build_image([random_layer(3 * MiB, 1), random_layer(MiB, 2)], indent=2)
    assert docket.registry_client().push_image("skopeo/agent", "1", image).status_code == 201
    agent = agents(docket, "sk1", groups=["sk"])
    wait_for_states(docket, {"sk1": "online"})
    out = tmp_path / "copied"
    skopeo_ok(
        "copy", "--src-tls-verify=false", f"docker://{agent.registry}/skopeo/agent:1", f"dir:{out}"
    )
    assert (out / "manifest.json").read_bytes() == image.manifest
    for blob in image.blobs:
        assert (out / sha256(blob).split(":")[1]).read_bytes() == blob
    inspected = json.loads(
        skopeo_ok("inspect", "--tls-verify=false", f"docker://{agent.registry}/skopeo/agent:1")
    )
    assert inspected["Digest"] == image.digest


@pytest.mark.docker
def test_containerd_pulls_through_the_agent_and_past_it_when_it_is_down(
    tmp_path: Path,
    docket: ServerProcess,
    docker_engine: DockerEngine,
    agents: StartAgent,
) -> None:
    first = push_runnable(docket, tmp_path, "ctr/one", MiB)
    second = push_runnable(docket, tmp_path, "ctr/two", MiB)
    agent = agents(docket, "ctr1", groups=["ctr"])
    wait_for_states(docket, {"ctr1": "online"})
    hosts_dir = tmp_path / "certs.d"
    printed = subprocess.run(
        [
            str(BIN / "docket-agent"),
            "--data-dir",
            str(agent.data_dir),
            "containerd-config",
            docket.registry,
            "--agent",
            f"http://{agent.registry}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f'server = "https://{docket.registry}"' in printed
    assert f'ca = "{agent.data_dir / "tls" / "server-ca.pem"}"' in printed
    (hosts_dir / docket.registry).mkdir(parents=True)
    (hosts_dir / docket.registry / "hosts.toml").write_text(printed)
    address = str(docker_engine.dir / "exec" / "containerd" / "containerd.sock")
    ctr = [tool("ctr"), "--address", address, "--namespace", "docket-agent-test"]
    viewer = docket.token("viewer")

    def ctr_pull(ref: str) -> None:
        result = subprocess.run(
            [
                *ctr,
                "images",
                "pull",
                "--hosts-dir",
                str(hosts_dir),
                "--user",
                f"docket:{viewer}",
                ref,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr

    ctr_pull(f"{docket.registry}/ctr/one:1")
    recorded = [p for p in pulls(docket, "--hosts", "ctr1") if p["image_digest"] == first.digest]
    assert recorded, "the pull did not go through the agent"
    assert (agent.data_dir / "blobs" / "sha256").is_dir()
    agent.stop()
    ctr_pull(f"{docket.registry}/ctr/two:1")  # straight from the server
    assert not [p for p in pulls(docket, "--hosts", "ctr1") if p["image_digest"] == second.digest]
    listed = subprocess.run([*ctr, "images", "ls"], capture_output=True, text=True, check=True)
    assert first.digest in listed.stdout
    assert second.digest in listed.stdout


def test_unknown_images_ranges_and_pushes(docket: ServerProcess, agents: StartAgent) -> None:
    layer = random_layer(600 * 1024, 3)
    image = build_image([layer])
    assert docket.registry_client().push_image("faults/range", "1", image).status_code == 201
    agent = agents(docket, "rg1", groups=["rg"])
    wait_for_states(docket, {"rg1": "online"})
    client = RegistryClient(f"http://{agent.registry}")
    expect_error(client.get_manifest("faults/nothing", "1"), 404, "MANIFEST_UNKNOWN")
    expect_error(client.request("GET", "/v2/faults/range/blobs/sha256:zz"), 400, "DIGEST_INVALID")
    unknown = client.request("GET", f"/v2/faults/range/blobs/{sha256(b'never')}")
    expect_error(unknown, 404, "BLOB_UNKNOWN")
    # A range of a blob not in the cache yet, then past its end, then of it cached.
    url = f"/v2/faults/range/blobs/{sha256(layer)}"
    part = client.request("GET", url, headers={"Range": "bytes=100000-299999"})
    assert part.status_code == 206
    assert part.content == layer[100000:300000]
    past = client.request("GET", url, headers={"Range": f"bytes={len(layer)}-"})
    expect_error(past, 416, "RANGE_INVALID")
    assert past.headers["Content-Range"] == f"bytes */{len(layer)}"
    whole = client.request("GET", url)
    assert whole.content == layer
    assert whole.headers["Docker-Content-Digest"] == sha256(layer)
    tail = client.request("GET", url, headers={"Range": "bytes=-100"})
    assert tail.content == layer[-100:]
    for method, path in [
        ("POST", "/v2/faults/range/blobs/uploads/"),
        ("PUT", "/v2/faults/range/manifests/2"),
        ("DELETE", f"/v2/faults/range/manifests/{image.digest}"),
        ("PATCH", "/v2/faults/range/blobs/uploads/x"),
    ]:
        refused = client.request(method, path, data=b"{}")
        expect_error(refused, 405, "UNSUPPORTED")
        assert "push to the Docket server" in refused.json()["errors"][0]["message"]


def test_requests_for_one_blob_share_a_download_and_a_client_leaving_stops_nothing(
    docket: ServerProcess, agents: StartAgent
) -> None:
    layer = random_layer(6 * MiB, 4)
    assert docket.registry_client().push_blob("share/blob", layer).status_code == 201
    # 2 MB/s: slow enough to catch the download in flight (and no first pieces: the limit).
    agent = agents(docket, "sh1", groups=["sh"], extra_args=["--max-download-rate", str(2 * MiB)])
    wait_for_states(docket, {"sh1": "online"})
    path = f"/v2/share/blob/blobs/{sha256(layer)}"
    with socket.create_connection(("127.0.0.1", agent.registry_port), timeout=30) as gone:
        gone.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert gone.recv(1).startswith(b"H")  # the response began: then the client leaves
    bodies: list[bytes] = []

    def fetch() -> None:
        bodies.append(get(f"http://{agent.registry}{path}")[2])

    readers = [threading.Thread(target=fetch) for _ in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert bodies == [layer, layer]
    recorded = [p for p in pulls(docket, "--hosts", "sh1") if sha256(layer) in p["blob_digests"]]
    assert len(recorded) == 1, recorded  # one download for the three requests
    assert recorded[0]["state"] == "succeeded"


def test_a_corrupt_peer_never_reaches_the_client(tmp_path: Path, agents: StartAgent) -> None:
    """The seed's advertised port is closed and the only peer lies; the agent takes no first
    pieces (a download limit), so what it serves comes through the fallback: never a byte of
    the liar's."""
    server = ServerProcess(
        data_dir=tmp_path / "server",
        extra_args=[*FAST, "--bt-advertise", f"127.0.0.1:{free_port()}"],
    ).start()
    layer = random_layer(3 * MiB, 5)
    try:
        assert server.registry_client().push_blob("liar/blob", layer).status_code == 201
        with server.channel() as channel:
            metainfo = (
                image_grpc.ImageServiceStub(channel)
                .GetTorrent(image_pb.GetTorrentRequest(digest=sha256(layer)))
                .torrent.metainfo
            )

        async def with_liar() -> bytes:
            liar_id = await enroll(server, "liar")
            with CorruptPeer(
                metainfo, layer, tmp_path / "liar", (liar_id.cert_pem, liar_id.key_pem)
            ) as liar:
                async with agent_channel(server, liar_id) as channel:
                    fake = SimulatedAgent(
                        agent_service_pb2_grpc.AgentServiceStub(channel),
                        "liar",
                        bt_endpoint=liar.endpoint,
                        cached_digests=(sha256(layer),),
                    )
                    task = asyncio.create_task(fake.run())
                    await asyncio.wait_for(fake.welcomed.wait(), 10)
                    agent = agents(
                        server,
                        "honest2",
                        groups=["h"],
                        extra_args=["--fallback-after", "2", "--max-download-rate", str(64 * MiB)],
                    )
                    await asyncio.to_thread(wait_for_states, server, {"honest2": "online"})
                    status, _, body = await asyncio.to_thread(
                        get, f"http://{agent.registry}/v2/liar/blob/blobs/{sha256(layer)}"
                    )
                    task.cancel()
                    assert status == 200
                    assert liar.uploaded_bytes() > 0  # it did send its bad bytes
                    return body

        assert asyncio.run(with_liar()) == layer
    finally:
        server.stop()


def test_a_cache_too_small_is_a_clear_error(docket: ServerProcess, agents: StartAgent) -> None:
    layer = random_layer(3 * MiB, 6)
    assert docket.registry_client().push_blob("small/cache", layer).status_code == 201
    agent = agents(docket, "cs1", groups=["cs"], extra_args=["--cache-max-bytes", str(MiB)])
    wait_for_states(docket, {"cs1": "online"})
    response = RegistryClient(f"http://{agent.registry}").request(
        "GET", f"/v2/small/cache/blobs/{sha256(layer)}"
    )
    expect_error(response, 507, "SIZE_INVALID")
    assert "cache holds 1048576 bytes at most" in response.json()["errors"][0]["message"]
    assert not (agent.data_dir / "blobs" / "sha256" / sha256(layer)[7:9]).exists()


def test_an_agent_restarted_mid_pull_resumes_when_the_client_tries_again(
    docket: ServerProcess, agents: StartAgent
) -> None:
    layer = random_layer(8 * MiB, 7)
    assert docket.registry_client().push_blob("restart/blob", layer).status_code == 201
    slow = ["--max-download-rate", str(2 * MiB)]
    agent = agents(docket, "rs1", groups=["rs"], extra_args=slow)
    wait_for_states(docket, {"rs1": "online"})
    url = f"http://{agent.registry}/v2/restart/blob/blobs/{sha256(layer)}"
    cut: list[BaseException] = []

    def first_try() -> None:
        try:
            get(url)
        except Exception as e:  # the agent dies under it
            cut.append(e)

    reader = threading.Thread(target=first_try)
    reader.start()
    partial = agent.data_dir / "partial" / sha256(layer)[7:9] / sha256(layer)[7:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        recorded = [p for p in pulls(docket, "--hosts", "rs1") if p["state"] == "downloading"]
        if recorded and recorded[0]["done_bytes"] >= 2 * MiB:
            break
        time.sleep(0.2)
    agent.signal(signal.SIGKILL)
    reader.join()
    assert cut  # the first try was broken off
    assert partial.exists()
    agent.stop()
    agent.extra_args = []  # full speed now
    agent.start()
    wait_for_states(docket, {"rs1": "online"})
    status, _, body = get(url)
    assert status == 200
    assert body == layer
    # The client can have the last byte before the agent's report that it is done reaches
    # the server.
    deadline = time.monotonic() + 10
    while (second := pulls(docket, "--hosts", "rs1")[0])["state"] != "succeeded":
        assert time.monotonic() < deadline, second
        time.sleep(0.1)
    assert second["received_bytes"] < len(layer)  # what was fetched before was kept


def test_the_server_unreachable_cached_blobs_and_seen_manifests_still_serve(
    tmp_path: Path, agents: StartAgent
) -> None:
    server = ServerProcess(data_dir=tmp_path / "server", extra_args=FAST).start()
    image = build_image([random_layer(MiB, 8)])
    assert server.registry_client().push_image("offline/img", "1", image).status_code == 201
    agent = agents(server, "of1", groups=["of"])
    wait_for_states(server, {"of1": "online"})
    client = RegistryClient(f"http://{agent.registry}")
    assert client.get_manifest("offline/img", "1").content == image.manifest
    blob = f"/v2/offline/img/blobs/{sha256(image.layers[0])}"
    assert client.request("GET", blob).content == image.layers[0]
    deadline = time.monotonic() + 10
    while not (agent.data_dir / "blobs" / "sha256" / sha256(image.layers[0])[7:9]).exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.stop()
    assert client.request("GET", blob).content == image.layers[0]
    assert client.get_manifest("offline/img", image.digest).content == image.manifest
    assert client.get_manifest("offline/img", "1").content == image.manifest  # as last seen
    expect_error(client.get_manifest("offline/img", "2"), 503, "UNAVAILABLE")
    missing = client.request("GET", f"/v2/offline/img/blobs/{sha256(b'never here')}")
    assert missing.status_code == 503


@pytest.mark.docker
def test_docker_hub_names_through_registry_mirrors(
    tmp_path: Path, docket: ServerProcess, agents: StartAgent
) -> None:
    """dockerd sends pulls of Docker Hub names to its registry-mirrors as library/NAME: the
    agent serves them from Docket's NAME."""
    push_runnable(docket, tmp_path, "mirrored", MiB)
    agent = agents(docket, "mr1", groups=["mr"])
    wait_for_states(docket, {"mr1": "online"})
    with DockerEngine(daemon_config={"registry-mirrors": [f"http://{agent.registry}"]}) as engine:
        docker(engine, "pull", "mirrored:1")
        assert docker(
            engine, "run", "--rm", "--network", "none", "mirrored:1", "cat", "/marker"
        ) == ("mirrored")
    recorded = [p for p in pulls(docket, "--hosts", "mr1") if p["image"].startswith("mirrored")]
    assert recorded
