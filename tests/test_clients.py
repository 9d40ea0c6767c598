"""Clients without docket_common: the TypeScript example (clients/typescript, generated with
buf and protoc-gen-es) against a real server and agent, and a Python client that learns the
API from server reflection alone.

The TypeScript tests need node and clients/typescript/node_modules (`npm ci --prefix
clients/typescript`, which scripts/setup.sh runs). Without them they skip, except under CI,
where that is a failure.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.support.agents import AgentProcess, wait_for_states
from tests.support.archives import layer_tar, random_bytes, write_legacy_archive
from tests.support.server import ServerProcess, docketctl

ROOT = Path(__file__).resolve().parent.parent
TYPESCRIPT = ROOT / "clients" / "typescript"
TSX = TYPESCRIPT / "node_modules" / ".bin" / "tsx"
FLEET = "examples/fleet.ts"
FAST = ["--heartbeat-interval", "0.5", "--hello-timeout", "2"]
IMAGE = "clients/demo:1"


def running_under_ci() -> bool:
    """True when CI is set to anything but empty/0/false/no (as tests/conftest.py reads it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@dataclass
class Pushed:
    name: str
    digest: str
    size_bytes: int


Fleet = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def fleet() -> Fleet:
    """Runs examples/fleet.ts with tsx: fleet(server, *args, token=None), calling the
    server over TLS as its admin (or with ``token``)."""
    reason = None
    if shutil.which("node") is None:
        reason = "node is not installed"
    elif not TSX.exists():
        reason = f"{TSX.relative_to(ROOT)} is missing: run npm ci --prefix clients/typescript"
    if reason is not None:
        if running_under_ci():
            pytest.fail(f"CI needs the TypeScript client's toolchain: {reason}", pytrace=False)
        pytest.skip(reason)

    def run(
        server: ServerProcess, *args: str, token: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = server.env(token)
        return subprocess.run(
            [str(TSX), FLEET, *args],
            cwd=TYPESCRIPT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


def start_server(tmp_path: Path, name: str, *args: str) -> ServerProcess:
    return ServerProcess(data_dir=tmp_path / name, extra_args=[*FAST, *args]).start()


def stop_server(proc: ServerProcess) -> None:
    code = proc.stop()
    assert code == 0, f"docket-server exited {code}:\n{proc.log_tail()}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = start_server(tmp_path, "server")
    yield proc
    stop_server(proc)


@pytest.fixture
def agent(tmp_path: Path, server: ServerProcess) -> Iterator[AgentProcess]:
    proc = AgentProcess(
        server=server, data_dir=tmp_path / "host1", name="host1", groups=["g"]
    ).start()
    try:
        wait_for_states(server, {"host1": "online"})
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def pushed(tmp_path: Path, server: ServerProcess) -> Pushed:
    layer = layer_tar({"data": random_bytes(512 * 1024, seed=7)})
    archive = write_legacy_archive(tmp_path / "image.tar", IMAGE, [layer])
    result = docketctl("push", IMAGE, "--archive", str(archive.path), "-o", "json", server=server)
    assert result.returncode == 0, result.stderr
    image = json.loads(result.stdout)["image"]
    return Pushed(image["name"], image["digest"], image["size_bytes"])


def lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return result.stdout.splitlines()


def test_typescript_client_lists_and_follows_a_prefetch_rollout(
    fleet: Fleet, server: ServerProcess, agent: AgentProcess, pushed: Pushed
) -> None:
    listed = fleet(server)
    assert listed.returncode == 0, listed.stderr
    assert lines(listed) == [
        f"image {pushed.name} {pushed.digest} {pushed.size_bytes}",
        "images 1",
        "agent host1 AGENT_STATE_ONLINE g",
        "agents 1",
    ]

    started = fleet(server, "--start", pushed.name, "g", "--prefetch-only")
    assert started.returncode == 0, started.stdout + started.stderr
    out = lines(started)
    created = next(line for line in out if line.startswith("rollout "))
    _, rollout_id, image, hosts = created.split(" ")
    assert (image, hosts) == (pushed.name, "1")
    events = out[out.index(created) + 1 :]
    assert events[0].startswith(f"event snapshot {rollout_id} ROLLOUT_STATE_")
    host_states = [e.split(" ")[3] for e in events if e.startswith("event host host1 ")]
    assert host_states, events
    assert host_states[-1] == "TASK_STATE_SUCCEEDED", events
    assert all(a != b for a, b in itertools.pairwise(host_states)), "only changes are printed"
    succeeded = next(e for e in events if "TASK_STATE_SUCCEEDED" in e)
    assert f" {pushed.size_bytes}/{pushed.size_bytes}" in succeeded
    assert events[-1] == "event state ROLLOUT_STATE_SUCCEEDED"

    # The server agrees, and watching the ended rollout gives its snapshot and final state.
    shown = docketctl("rollouts", "show", rollout_id, "-o", "json", server=server)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["state"] == "succeeded"
    watched = fleet(server, rollout_id)
    assert watched.returncode == 0, watched.stderr
    assert lines(watched)[-3:] == [
        f"event snapshot {rollout_id} ROLLOUT_STATE_SUCCEEDED 1",
        f"event host host1 TASK_STATE_SUCCEEDED {pushed.size_bytes}/{pushed.size_bytes}"
        " prefetched: cached and seeding",
        "event state ROLLOUT_STATE_SUCCEEDED",
    ]


def test_typescript_client_reports_code_and_reason(
    fleet: Fleet, server: ServerProcess, pushed: Pushed
) -> None:
    missing = fleet(server, "no-such-rollout")
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        "error NOT_FOUND ROLLOUT_NOT_FOUND rollout no-such-rollout not found"
    ]

    no_image = fleet(server, "--start", "no/such:1", "all", "--prefetch-only")
    assert no_image.returncode == 1
    assert no_image.stderr.startswith("error NOT_FOUND IMAGE_NOT_FOUND "), no_image.stderr

    no_hosts = fleet(server, "--start", pushed.name, "nobody", "--prefetch-only")
    assert no_hosts.returncode == 1
    assert no_hosts.stderr.startswith("error FAILED_PRECONDITION NO_HOSTS "), no_hosts.stderr


def test_typescript_client_sends_its_token_over_tls(
    fleet: Fleet, server: ServerProcess, pushed: Pushed
) -> None:
    refused = fleet(server, token="")
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.startswith("error UNAUTHENTICATED UNAUTHENTICATED "), refused.stderr

    wrong = fleet(server, token="dkt_000000000000_not-the-token-at-all")
    assert wrong.stderr.startswith("error UNAUTHENTICATED UNAUTHENTICATED "), wrong.stderr

    viewer = fleet(server, token=server.token("viewer"))
    assert viewer.returncode == 0, viewer.stderr
    assert lines(viewer) == [
        f"image {pushed.name} {pushed.digest} {pushed.size_bytes}",
        "images 1",
        "agents 0",
    ]
    # A viewer reads; starting a rollout is an operator's.
    start = fleet(server, "--start", pushed.name, "g", token=server.token("viewer"))
    assert start.stderr.startswith("error PERMISSION_DENIED PERMISSION_DENIED "), start.stderr


def test_reflection_alone_is_enough_to_call_the_api(server: ServerProcess, pushed: Pushed) -> None:
    """No generated code: the services and messages come from the server's reflection."""
    with server.channel() as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "docket.v1.ImageService",
            "docket.v1.AgentService",
            "docket.v1.AgentAdminService",
            "docket.v1.RolloutService",
            "grpc.health.v1.Health",
        } <= services

        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("docket.v1.ImageService")
        method = service.methods_by_name["ListImages"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        list_images = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response = list_images(request_class(page_size=10), timeout=10)

        # The rest of the API is there too, down to the fields of its messages.
        rollouts = pool.FindServiceByName("docket.v1.RolloutService")
        watch = rollouts.methods_by_name["WatchRollout"]
        assert watch.server_streaming
        assert "batched" in watch.input_type.fields_by_name
        assert watch.output_type.fields_by_name["events"].message_type.name == "RolloutEvent"
        event = watch.output_type.fields_by_name["event"].message_type
        assert [o.name for o in event.oneofs] == ["change"]
        assert {f.name for f in event.oneofs[0].fields} == {"snapshot", "host", "state"}

    assert [(i.name, i.digest, i.size_bytes) for i in response.images] == [
        (pushed.name, pushed.digest, pushed.size_bytes)
    ]
    assert response.images[0].layers[0].media_type == "application/vnd.oci.image.layer.v1.tar"
    assert response.next_page_token == ""
