"""Secure by default, against real servers, agents and libtorrent peers: every call and route
against every role, tokens that expire and are revoked, CAs that are wrong, plaintext against
TLS, join tokens and their limits and pins, enrolled names, removed agents, SSL torrents that
let no stranger in, certificates replaced and renewed, the audit log, and contexts."""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from docket_common.pb import (
    agent_admin_service_pb2,
    agent_service_pb2,
    audit_service_pb2,
    image_service_pb2,
    pull_service_pb2,
    rollout_service_pb2,
    token_service_pb2,
)
from docket_common.pki import (
    KeyPair,
    fingerprint,
    issue_peer,
    issue_server,
    key_pem,
    load_cert,
    load_certs,
    load_key,
    make_ca,
    write_private,
    write_public,
)
from docket_common.tls_client import fetch_chain
from docket_server.api.authz import PUBLIC_PREFIXES, ROUTES, RPCS, Guard
from docket_server.api.registry_http import RegistryApp
from docket_server.domain.security import Role
from tests.support.agents import (
    AgentProcess,
    SimIdentity,
    agent_channel,
    agents_json,
    enroll,
    wait_for_states,
)
from tests.support.archives import layer_tar, random_bytes, write_legacy_archive
from tests.support.peers import download_with_libtorrent, fleet_identity
from tests.support.server import ServerProcess, docketctl, rollout

FAST = ["--heartbeat-interval", "0.5", "--hello-timeout", "1"]
MiB = 1024 * 1024
SERVICES = (
    image_service_pb2,
    agent_service_pb2,
    agent_admin_service_pb2,
    rollout_service_pb2,
    pull_service_pb2,
    token_service_pb2,
    audit_service_pb2,
)
TOKEN_ROLES = ("admin", "publisher", "operator", "viewer", "agent")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One secure server for the tests that change nothing another test looks at."""
    data = tmp_path_factory.mktemp("secured") / "server"
    proc = ServerProcess(data_dir=data, extra_args=FAST).start()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(data_dir=tmp_path / "server", extra_args=FAST).start()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def one_error_line(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("docketctl: error: "), lines[0]
    return str(lines[0])


def push_archive(server: ServerProcess, tmp_path: Path, name: str, size: int, seed: int) -> Any:
    layer = layer_tar({"data.bin": random_bytes(size, seed)})
    archive = write_legacy_archive(tmp_path / f"{seed}.tar", name, [layer])
    result = docketctl("push", name, "--archive", str(archive.path), "-q", server=server)
    assert result.returncode == 0, result.stderr
    return archive


# --- the table: every RPC and route, every role ------------------------------------------


def all_methods() -> list[MethodDescriptor]:
    return [
        method
        for module in SERVICES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def test_every_rpc_and_every_route_is_in_the_table() -> None:
    paths = {path_of(m) for m in all_methods()}
    assert paths == set(RPCS), "every RPC says who may call it, and only RPCs are there"
    app = RegistryApp(None, None, Guard(None, None))  # type: ignore[arg-type]
    routes = {(r.name, method) for r in app.routes for method in r.methods}
    assert routes == set(ROUTES)
    for rule in [*RPCS.values(), *ROUTES.values()]:
        assert rule.roles, "a call nobody may make"
    # Admins may make every call but an agent's own (those take an enrolled certificate).
    own = {p for p, r in RPCS.items() if r.roles <= {Role.NODE, Role.AGENT}}
    assert {p for p, r in RPCS.items() if Role.ADMIN not in r.roles} == own


async def call_once(
    channel: grpc.aio.Channel, method: MethodDescriptor, agent: str = ""
) -> grpc.StatusCode:
    """Calls ``method`` with an empty request (the agent's own name where one is asked);
    the status it ends with, OK for a stream that was still going after a second."""
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = request_class()
    if agent and "agent_name" in method.input_type.fields_by_name:
        request.agent_name = agent
    path = path_of(method)
    kwargs: dict[str, Any] = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": response_class.FromString,
    }

    async def nothing() -> AsyncIterator[Any]:
        return
        yield

    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path, **kwargs)(nothing(), timeout=1)
            async for _ in call:
                break
        elif method.client_streaming:
            await channel.stream_unary(path, **kwargs)(nothing(), timeout=5)
        elif method.server_streaming:
            call = channel.unary_stream(path, **kwargs)(request, timeout=1)
            async for _ in call:
                break
        else:
            await channel.unary_unary(path, **kwargs)(request, timeout=10)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def test_each_role_against_each_rpc(secured: ServerProcess) -> None:
    tokens = {role: secured.token(role) for role in TOKEN_ROLES}
    node = await enroll(secured, "matrix-node")
    seen: dict[tuple[str, str], grpc.StatusCode] = {}
    for role, token in tokens.items():
        async with secured.aio_channel(token=token) as channel:
            for method in all_methods():
                seen[(role, path_of(method))] = await call_once(channel, method)
    async with agent_channel(secured, node) as channel:
        for method in all_methods():
            seen[("node", path_of(method))] = await call_once(channel, method, "matrix-node")
    wrong = []
    for (role, path), code in seen.items():
        allowed = Role(role) in RPCS[path].roles
        if allowed and code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            wrong.append(f"{role} refused {path}: {code.name}")
        if not allowed and code != grpc.StatusCode.PERMISSION_DENIED:
            wrong.append(f"{role} not refused {path}: {code.name}")
    assert wrong == []
    # With no token at all, nothing but health and reflection.
    async with grpc.aio.secure_channel(
        secured.address, grpc.ssl_channel_credentials(secured.ca_pem)
    ) as anonymous:
        for method in all_methods():
            assert await call_once(anonymous, method) == grpc.StatusCode.UNAUTHENTICATED, method
    assert all(not path.startswith(PUBLIC_PREFIXES) for path in RPCS)


ROUTE_PATHS = {
    "base": "/v2/",
    "catalog": "/v2/_catalog",
    "tags": "/v2/matrix/x/tags/list",
    "manifest": "/v2/matrix/x/manifests/1",
    "blob": "/v2/matrix/x/blobs/sha256:" + "0" * 64,
    "uploads": "/v2/matrix/x/blobs/uploads/",
    "upload": "/v2/matrix/x/blobs/uploads/no-such-upload",
    "referrers": "/v2/matrix/x/referrers/sha256:" + "0" * 64,
}


def test_each_role_against_each_registry_route(secured: ServerProcess) -> None:
    assert set(ROUTE_PATHS) == {name for name, _ in ROUTES}
    wrong = []
    for role in TOKEN_ROLES:
        client = secured.registry_client(token=secured.token(role))
        for (name, method), rule in sorted(ROUTES.items()):
            response = client.request(method, ROUTE_PATHS[name])
            if Role(role) in rule.roles:
                if response.status_code in (401, 403):
                    wrong.append(f"{role} refused {method} {name}: {response.status_code}")
            elif response.status_code != 403:
                wrong.append(f"{role} not refused {method} {name}: {response.status_code}")
            elif method != "HEAD":
                assert response.json()["errors"][0]["code"] == "DENIED"
    assert wrong == []
    anonymous = secured.registry_client(token="")
    for name, method in ROUTES:
        response = anonymous.request(method, ROUTE_PATHS[name])
        assert response.status_code == 401, (name, method)
        assert response.headers["WWW-Authenticate"] == 'Basic realm="docket"'


# --- tokens ------------------------------------------------------------------------------


def test_the_first_admin_token_and_the_keys_are_private(secured: ServerProcess) -> None:
    for name in ("admin.token", "ca.key", "server.key"):
        mode = stat.S_IMODE((secured.data_dir / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert secured.admin_token.startswith("dkt_")
    log = secured.log_path.read_text()
    assert str(secured.data_dir / "admin.token") in log
    assert secured.admin_token not in log  # said where, never what


def test_tokens_made_listed_expired_and_revoked(secured: ServerProcess) -> None:
    made = docketctl(
        "tokens",
        "create",
        "--role",
        "viewer",
        "--ttl",
        "2s",
        "--description",
        "brief",
        "-o",
        "json",
        server=secured,
    )
    assert made.returncode == 0, made.stderr
    brief = json.loads(made.stdout)
    assert brief["token"].startswith(f"dkt_{brief['id']}_")
    assert brief["role"] == "viewer"
    assert brief["description"] == "brief"
    lasting = secured.token("viewer")
    for token in (brief["token"], lasting):
        assert docketctl("images", server=secured, env={"DOCKET_TOKEN": token}).returncode == 0
    listed = json.loads(docketctl("tokens", "list", "-o", "json", server=secured).stdout)
    entry = next(t for t in listed if t["id"] == brief["id"])
    assert "token" not in entry
    assert brief["token"] not in json.dumps(listed)
    # The database holds hashes, never tokens.
    assert brief["token"].encode() not in (secured.data_dir / "docket.db").read_bytes()

    time.sleep(2.5)
    expired = docketctl("images", server=secured, env={"DOCKET_TOKEN": brief["token"]})
    assert "a valid token is required" in one_error_line(expired)
    assert "[UNAUTHENTICATED]" in one_error_line(expired)
    lasting_id = lasting.split("_")[1]
    revoked = docketctl("tokens", "revoke", lasting_id, server=secured)
    assert revoked.returncode == 0, revoked.stderr
    after = docketctl("images", server=secured, env={"DOCKET_TOKEN": lasting})
    assert "[UNAUTHENTICATED]" in one_error_line(after)
    registry = secured.registry_client(token=lasting)
    assert registry.request("GET", "/v2/").status_code == 401
    states = {
        t["id"]: t
        for t in json.loads(docketctl("tokens", "list", "-o", "json", server=secured).stdout)
    }
    assert states[lasting_id]["revoked"] is True
    table = docketctl("tokens", "list", server=secured).stdout
    assert any(line.startswith(brief["id"]) and "expired" in line for line in table.splitlines())
    # Bad requests lose nothing.
    for args in (
        ["--role", "viewer", "--group", "web"],  # pins are for join tokens
        ["--role", "agent", "--label", "no-equals"],
        ["--role", "viewer", "--ttl", "0s"],
    ):
        bad = docketctl("tokens", "create", *args, server=secured)
        assert bad.returncode != 0
    nothing = docketctl("tokens", "revoke", "000000000000", server=secured)
    assert "[TOKEN_NOT_FOUND]" in one_error_line(nothing)


# --- TLS, CAs, plaintext -----------------------------------------------------------------


def test_a_wrong_ca_and_plaintext_fail_with_one_line_naming_the_certificate(
    secured: ServerProcess, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(make_ca("Some other CA").cert_pem)
    served_ca = load_certs(secured.ca_pem)[0]
    wrong = docketctl("images", server=secured, env={"DOCKET_CA": str(other)})
    line = one_error_line(wrong)
    assert f"the server at {secured.address} presented" in line
    assert fingerprint(served_ca) in line
    assert f"which the CA in {other} does not trust" in line
    # No CA at all: the system's store does not know the fleet CA either.
    env = {k: v for k, v in secured.env().items() if k != "DOCKET_CA"}
    system = docketctl("images", env=env)
    assert fingerprint(served_ca) in one_error_line(system)
    # Plaintext against TLS, from docketctl and from a bare gRPC client.
    plain = docketctl("--insecure", "images", server=secured.address)
    assert "speaks TLS: drop --insecure" in one_error_line(plain)
    with grpc.insecure_channel(secured.address) as channel:
        stub = channel.unary_unary("/docket.v1.ImageService/ListImages")
        with pytest.raises(grpc.RpcError) as caught:
            stub(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://{secured.registry}/v2/", timeout=10)
    # The agent port takes no one without a fleet certificate, not even an admin's token.
    with grpc.secure_channel(secured.agent_address, secured.credentials()) as channel:
        stub = channel.unary_unary("/docket.v1.AgentAdminService/ListAgents")
        with pytest.raises(grpc.RpcError) as caught:
            stub(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_login_saves_a_context_that_later_commands_use(
    secured: ServerProcess, tmp_path: Path
) -> None:
    config = tmp_path / "config"
    base = {k: v for k, v in os.environ.items() if not k.startswith("DOCKET_")}
    env = base | {"XDG_CONFIG_HOME": str(config)}

    def ctl(*args: str, **extra: str) -> Any:
        return docketctl(*args, env=env | extra)

    ca_hash = fingerprint(load_certs(secured.ca_pem)[0])
    bad_hash = ctl(
        "login", secured.address, "--token", secured.admin_token, "--ca-hash", "sha256:" + "0" * 64
    )
    assert "none has the hash" in one_error_line(bad_hash)
    assert not (config / "docket" / "config.json").exists()  # nothing saved
    bad_token = ctl(
        "login",
        secured.address,
        "--token",
        "dkt_000000000000_nopenopenopenopenope",
        "--ca-hash",
        ca_hash,
    )
    assert "[UNAUTHENTICATED]" in one_error_line(bad_token)
    viewer = secured.token("viewer")
    done = ctl("login", secured.address, "--token", viewer, "--ca-hash", ca_hash, "--name", "lab")
    assert done.returncode == 0, done.stderr
    saved = config / "docket" / "config.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["current_context"] == "lab"
    assert ctl("images").returncode == 0  # server, CA and token from the context
    assert "lab" in ctl("contexts").stdout
    # A viewer's context reads, and may not delete.
    denied = ctl("rm", "nothing:1")
    assert "[PERMISSION_DENIED]" in one_error_line(denied)
    # The environment overrides the context's token.
    admin = ctl("tokens", "list", DOCKET_TOKEN=secured.admin_token)
    assert admin.returncode == 0, admin.stderr
    by_file = ctl(
        "login", secured.address, "--token", viewer, "--ca", str(secured.ca_path), "--name", "lab2"
    )
    assert by_file.returncode == 0, by_file.stderr
    assert ctl("--context", "lab", "images").returncode == 0
    assert ctl("logout", "lab").returncode == 0
    assert ctl("logout", "lab2").returncode == 0
    nowhere = ctl("images")  # no context: the local default, which is not there
    assert nowhere.returncode != 0


# --- agents: enrollment, names, pins, removal --------------------------------------------


def agent(
    server: ServerProcess, tmp_path: Path, name: str, *extra: str, **kwargs: Any
) -> AgentProcess:
    return AgentProcess(
        server=server, data_dir=tmp_path / name, name=name, extra_args=list(extra), **kwargs
    )


def exits_refused(proc: AgentProcess, text: str) -> None:
    assert proc.proc is not None
    assert proc.proc.wait(30) == 1, proc.log_tail()
    assert text in proc.log_tail(), proc.log_tail()


def test_a_join_token_enrolls_up_to_its_limit_and_the_name_stays_bound(
    server: ServerProcess, tmp_path: Path
) -> None:
    limited = server.token("agent", "--max-uses", "1")
    first = agent(server, tmp_path, "web1", "--join-token", limited, "--ca", str(server.ca_path))
    first.start()
    try:
        wait_for_states(server, {"web1": "online"})
        key = first.data_dir / "tls" / "agent.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert load_key(key.read_bytes())
        # Its limit reached, the token enrolls no one else.
        second = agent(
            server, tmp_path, "web2", "--join-token", limited, "--ca", str(server.ca_path)
        )
        second.start()
        exits_refused(second, "TOKEN_USED_UP")
        # Another install under the enrolled name: refused, online or not.
        impostor = agent(server, tmp_path / "other", "web1")
        impostor.start()
        exits_refused(impostor, "agent web1 is enrolled by another install")
        first.stop()
        wait_for_states(server, {"web1": "offline"})
        impostor.start()
        exits_refused(impostor, "agent web1 is enrolled by another install")
        assert agents_json(server)["web1"]["state"] == "offline"
        # The enrolled host comes back with no token: its certificate is its name.
        first.extra_args = []
        first.start()
        wait_for_states(server, {"web1": "online"})
    finally:
        first.stop()


def test_a_removed_agent_is_cut_off_and_its_name_freed(
    server: ServerProcess, tmp_path: Path
) -> None:
    host = agent(server, tmp_path, "gone")
    host.start()
    wait_for_states(server, {"gone": "online"})
    removed = docketctl("agents", "remove", "gone", server=server)
    assert removed.returncode == 0, removed.stderr
    exits_refused(host, "removed from the fleet")
    assert "gone" not in agents_json(server)
    # Its certificate no longer opens the agent port.
    host.extra_args = []
    host.start()
    exits_refused(host, "AGENT_NOT_ENROLLED")
    # The name is free: another install enrolls under it.
    again = agent(server, tmp_path / "new", "gone")
    again.start()
    try:
        wait_for_states(server, {"gone": "online"})
    finally:
        again.stop()
    missing = docketctl("agents", "remove", "never-was", server=server)
    assert "[AGENT_NOT_FOUND]" in one_error_line(missing)


def test_a_host_cannot_claim_groups_its_join_token_did_not_allow(
    server: ServerProcess, tmp_path: Path
) -> None:
    pinned = server.token("agent", "--group", "web", "--label", "env=prod")
    ca = str(server.ca_path)
    evil = agent(
        server, tmp_path, "victim", "--join-token", pinned, "--ca", ca, groups=["web", "evil"]
    )
    evil.start()
    exits_refused(evil, "may not claim the groups evil")
    labelled = agent(
        server,
        tmp_path,
        "lab1",
        "--join-token",
        pinned,
        "--ca",
        ca,
        groups=["web"],
        labels={"env": "dev"},
    )
    labelled.start()
    exits_refused(labelled, "may not claim the labels env=dev")
    fine = agent(
        server,
        tmp_path,
        "web3",
        "--join-token",
        pinned,
        "--ca",
        ca,
        groups=["web"],
        labels={"env": "prod"},
    )
    fine.start()
    try:
        agents = wait_for_states(server, {"web3": "online"})
        assert agents["web3"]["groups"] == ["web"]
        assert "victim" not in agents_json(server)
    finally:
        fine.stop()


async def test_an_enrolled_agent_acts_only_for_itself(server: ServerProcess) -> None:
    """The name in a certificate is the only name its holder may use: streams, pulls."""
    one = await enroll(server, "one")
    async with agent_channel(server, one) as channel:
        pull = channel.unary_unary(
            "/docket.v1.AgentService/StartPull",
            request_serializer=agent_service_pb2.StartPullRequest.SerializeToString,
            response_deserializer=agent_service_pb2.StartPullResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pull(agent_service_pb2.StartPullRequest(agent_name="two", image_name="x:1"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A certificate from another CA does not open the agent port.
    stranger_ca = make_ca("stranger")
    stranger = issue_peer(stranger_ca, "one", datetime.timedelta(hours=1))
    fake = SimIdentity("one", key_pem(stranger.key), stranger.cert_pem)
    async with agent_channel(server, fake) as channel:
        listing = channel.unary_unary("/docket.v1.AgentAdminService/ListAgents")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await listing(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


# --- pieces only for the fleet -----------------------------------------------------------


def test_strangers_get_no_piece_from_the_seed_or_an_agent(
    server: ServerProcess, tmp_path: Path
) -> None:
    archive = push_archive(server, tmp_path, "secret:1", 2 * MiB, 5)
    digest = archive.layer_digests[0]
    host = agent(server, tmp_path, "keeper", groups=["k"])
    host.start()
    try:
        wait_for_states(server, {"keeper": "online"})
        code, _, hosts = rollout(server, "secret:1", "--hosts", "k", "--prefetch-only")
        assert code == 0, hosts
        with server.channel() as channel:
            metainfo = channel.unary_unary(
                "/docket.v1.ImageService/GetTorrent",
                request_serializer=image_service_pb2.GetTorrentRequest.SerializeToString,
                response_deserializer=image_service_pb2.GetTorrentResponse.FromString,
            )(image_service_pb2.GetTorrentRequest(digest=digest)).torrent.metainfo
        assert b"ssl-cert" in metainfo
        assert server.ca_pem in metainfo
        agent_port = int(agents_json(server)["keeper"]["bt_endpoint"].rsplit(":", 1)[1])
        other = make_ca("other fleet")
        strangers = {
            "no certificate": None,
            "another CA's certificate": _pair(issue_peer(other, "x", datetime.timedelta(hours=1))),
        }

        def stranger(who: str, port: int) -> str:
            """How the stranger's download ended (each in its own libtorrent session)."""
            try:
                download_with_libtorrent(
                    metainfo,
                    port,
                    tmp_path / f"dl-{who}-{port}",
                    timeout=4,
                    identity=strangers[who],
                )
            except TimeoutError as e:
                return str(e)
            return "downloaded"

        tries = [(who, port) for who in strangers for port in (server.bt_port, agent_port)]
        with concurrent.futures.ThreadPoolExecutor(len(tries)) as pool:  # 4 s, not 16
            ended = list(pool.map(lambda t: stranger(*t), tries))
        for (who, port), how in zip(tries, ended, strict=True):
            assert "(0 bytes received)" in how, (who, port, how)
        # A fleet member gets the bytes from either.
        member = fleet_identity(server, "member")
        for port in (server.bt_port, agent_port):
            got = download_with_libtorrent(
                metainfo, port, tmp_path / f"dl-ok-{port}", identity=member
            )
            assert got > 0
    finally:
        host.stop()


def _pair(pair: KeyPair) -> tuple[bytes, bytes]:
    return pair.cert_pem, key_pem(pair.key)


# --- certificates replaced and renewed ---------------------------------------------------


def test_the_serving_certificate_is_replaced_while_agents_stay_connected(
    server: ServerProcess, tmp_path: Path
) -> None:
    host = agent(server, tmp_path, "steady", groups=["s"])
    host.start()
    try:
        before = wait_for_states(server, {"steady": "online"})["steady"]
        old = fetch_chain(server.address)[0]
        ca = KeyPair(
            load_key((server.data_dir / "ca.key").read_bytes()),
            load_cert(server.ca_pem),
        )
        fresh = issue_server(ca, ["127.0.0.1", "localhost"])
        # As an operator rotates it: key first, then the chain, each replaced atomically.
        write_private(server.data_dir / "server.key", fresh.key_pem)
        write_public(server.data_dir / "server.pem", fresh.cert_pem + server.ca_pem)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            served = {fetch_chain(server.address)[0], fetch_chain(server.registry)[0]}
            if served == {fresh.cert}:
                break
            time.sleep(0.2)
        # gRPC at once, the registry face within seconds: both without a restart.
        assert fetch_chain(server.address)[0] == fresh.cert
        assert fetch_chain(server.registry)[0] == fresh.cert
        assert old != fresh.cert
        assert docketctl("images", server=server).returncode == 0
        after = agents_json(server)["steady"]
        assert after["state"] == "online"
        assert after["connect_time"] == before["connect_time"]  # the same stream
        assert "TLS certificate reloaded" in server.log_tail(300)
        push_archive(server, tmp_path, "after:1", MiB, 6)
        code, _, hosts = rollout(server, "after:1", "--hosts", "s", "--prefetch-only")
        assert code == 0, hosts
    finally:
        host.stop()


def test_an_agent_renews_its_certificate_and_keeps_its_stream(tmp_path: Path) -> None:
    # Certificates for 9 s: renewed at 6 s.
    server = ServerProcess(
        data_dir=tmp_path / "server", extra_args=[*FAST, "--agent-cert-ttl", "9s"]
    ).start()
    host = agent(server, tmp_path, "renewer", groups=["r"])
    try:
        host.start()
        before = wait_for_states(server, {"renewer": "online"})["renewer"]
        cert_path = host.data_dir / "tls" / "agent.pem"
        first = load_cert(cert_path.read_bytes())
        deadline = time.monotonic() + 20
        while load_cert(cert_path.read_bytes()) == first and time.monotonic() < deadline:
            time.sleep(0.2)
        renewed = load_cert(cert_path.read_bytes())
        assert renewed != first
        assert renewed.public_key() == first.public_key()  # the same key, a new certificate
        assert "certificate renewed" in host.log_tail()
        time.sleep(4)  # past the first certificate's end
        after = agents_json(server)["renewer"]
        assert after["state"] == "online"
        assert after["connect_time"] == before["connect_time"]  # no reconnect
        push_archive(server, tmp_path, "renewed:1", MiB, 7)
        code, _, hosts = rollout(server, "renewed:1", "--hosts", "r", "--prefetch-only")
        assert code == 0, hosts
        audit = json.loads(docketctl("audit", "-o", "json", server=server).stdout)
        assert any(
            r["action"].endswith("RenewCertificate") and r["actor"] == "agent:renewer"
            for r in audit
        )
    finally:
        host.stop()
        assert server.stop() == 0, server.log_tail()


# --- the audit log -----------------------------------------------------------------------


def test_the_audit_log_says_who_did_what_and_how_it_ended(
    server: ServerProcess, tmp_path: Path
) -> None:
    push_archive(server, tmp_path, "audited:1", 64 * 1024, 8)
    viewer = server.token("viewer", "--description", "looker")
    viewer_id = viewer.split("_")[1]
    denied = docketctl("rm", "audited:1", server=server, env={"DOCKET_TOKEN": viewer})
    assert denied.returncode != 0
    assert docketctl("rm", "audited:1", server=server).returncode == 0
    registry = server.registry_client(token=viewer)
    assert registry.request("DELETE", "/v2/audited/manifests/1").status_code == 403
    records = json.loads(docketctl("audit", "-o", "json", server=server).stdout)
    admin_id = server.admin_token.split("_")[1]
    by_action: dict[str, list[dict[str, str]]] = {}
    for record in records:
        by_action.setdefault(record["action"], []).append(record)
    puts = by_action["/docket.v1.ImageService/PutImage"]
    assert puts[0]["actor"] == f"token:{admin_id} (admin)"
    assert puts[0]["outcome"] == "OK"
    deletes = by_action["/docket.v1.ImageService/DeleteImage"]
    assert {(d["actor"], d["outcome"].split(":")[0]) for d in deletes} == {
        (f"token:{viewer_id} (viewer)", "PERMISSION_DENIED"),
        (f"token:{admin_id} (admin)", "OK"),
    }
    assert all(d["target"] == "name=audited:1" for d in deletes)
    http = by_action["DELETE /v2/audited/manifests/1"]
    assert http[0]["outcome"] == "HTTP 403"
    created = by_action["/docket.v1.TokenService/CreateToken"]
    assert created[0]["target"] == "role=ROLE_VIEWER"
    assert records == sorted(records, key=lambda r: r["time"], reverse=True)  # newest first
    assert "ListImages" not in json.dumps(records)  # reads are not audited
    since = json.loads(
        docketctl("audit", "--since", "1h", "--limit", "2", "-o", "json", server=server).stdout
    )
    assert since == records[:2]
    table = docketctl("audit", server=server).stdout.splitlines()
    assert table[0].split() == ["TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "PEER"]
    refused = docketctl("audit", server=server, env={"DOCKET_TOKEN": viewer})
    assert "[PERMISSION_DENIED]" in one_error_line(refused)


# --- --insecure, only when asked ---------------------------------------------------------


def test_insecure_is_only_when_asked_and_says_so(tmp_path: Path) -> None:
    lab = ServerProcess(data_dir=tmp_path / "lab", extra_args=FAST, insecure=True).start()
    try:
        assert "INSECURE: TLS and authentication are off" in lab.log_tail()
        assert not (lab.data_dir / "admin.token").exists()
        assert docketctl("images", server=lab).returncode == 0  # docketctl --insecure
        # Plain torrents: docketctl pull takes the blobs from the seed over BitTorrent.
        push_archive(lab, tmp_path, "lab/plain:1", 2 * MiB, 41)
        env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
        out = tmp_path / "plain.tar"
        pulled = docketctl("pull", "lab/plain:1", "--output", str(out), server=lab, env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert "over gRPC" not in pulled.stdout + pulled.stderr
        assert out.stat().st_size > 2 * MiB
        tls_client = docketctl("images", server=lab.address)
        assert "does not speak TLS" in one_error_line(tls_client)
        host = AgentProcess(server=lab, data_dir=tmp_path / "labhost", name="labhost")
        host.start()
        try:
            wait_for_states(lab, {"labhost": "online"})
        finally:
            host.stop()
        refused = AgentProcess(server=lab.address, data_dir=tmp_path / "tls-host", name="tlshost")
        refused.extra_args = [
            "--join-token",
            "dkt_000000000000_xxxxxxxxxxxxxxxxxxxxxxxx",
            "--ca-hash",
            "sha256:00",
        ]
        refused.start()
        exits_refused(refused, "does not speak TLS")
        assert lab.stop() == 0
        lab.start()
        assert lab.log_tail().count("INSECURE: TLS and authentication are off") == 2  # each start
    finally:
        assert lab.stop() == 0, lab.log_tail()
