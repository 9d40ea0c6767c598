"""Prometheus metrics: a real Prometheus scrapes a real server and two agents during a
prefetch rollout, and what it says agrees with what the rollout reported; the names pass
promtool; the Grafana dashboard asks only for metrics that exist. Plus unit tests of the
parts: the RPC interceptor's naming and codes, the agent's bytes by source."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from docket_agent.orders import SOURCES, OrderRunner
from docket_common.health import Health
from docket_common.metrics import MetricsFace
from docket_common.pb import agent_pb2
from docket_server.api.interceptors import code_of, split_method
from docket_server.domain.errors import NotFound
from docket_server.metrics import ServerMetrics
from tests.support.agents import AgentProcess, wait_for_states
from tests.support.archives import layer_tar, random_bytes, write_legacy_archive
from tests.support.dockerd import DockerEngine
from tests.support.prometheus import Prometheus, require_binary
from tests.support.server import ServerProcess, docketctl, free_port, rollout

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "docket.json"
FAST = ["--heartbeat-interval", "0.5", "--hello-timeout", "2"]
MiB = 1024 * 1024


# -- the parts -----------------------------------------------------------------------------


def test_rpc_names_split_into_service_and_method() -> None:
    assert split_method("/docket.v1.ImageService/GetImage") == (
        "docket.v1.ImageService",
        "GetImage",
    )
    assert split_method("/grpc.health.v1.Health/Check") == ("grpc.health.v1.Health", "Check")


class _Context:
    def __init__(self, code: grpc.StatusCode | None) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code


def test_rpc_codes() -> None:
    assert code_of(None, _Context(None)) == "OK"
    assert code_of(None, _Context(grpc.StatusCode.OK)) == "OK"
    assert code_of(Exception("aborted"), _Context(grpc.StatusCode.NOT_FOUND)) == "NOT_FOUND"
    assert code_of(asyncio.CancelledError(), _Context(None)) == "CANCELLED"
    assert code_of(GeneratorExit(), _Context(None)) == "CANCELLED"
    assert code_of(RuntimeError("bug"), _Context(None)) == "UNKNOWN"
    error = NotFound("IMAGE_NOT_FOUND", "no such image")  # type: ignore[arg-type]
    assert code_of(error, _Context(None)) == "NOT_FOUND"


def test_server_metrics_are_their_own_registry() -> None:
    """Two servers in one process count apart (no global registry)."""
    one, two = ServerMetrics(), ServerMetrics()
    one.upload_ended("stored", 10)
    assert one.registry.get_sample_value("docket_server_uploads_total", {"result": "stored"}) == 1
    assert two.registry.get_sample_value("docket_server_uploads_total", {"result": "stored"}) == 0
    assert one.registry.get_sample_value("docket_build_info", {"version": _version()}) == 1


async def test_the_metrics_face_serves_metrics_and_healthz_on_a_free_port() -> None:
    metrics = ServerMetrics()
    health = Health()
    face = MetricsFace(metrics.registry, "127.0.0.1:0", health)
    port = await face.start()
    try:
        assert port > 0
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                assert 'docket_build_info{version="' in await response.text()
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
                assert await response.text() == "ok\n"
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                assert response.status == 200  # no check fails (it has none)
    finally:
        await face.stop()


def _version() -> str:
    from docket_common.version import VERSION

    return VERSION


def _runner() -> OrderRunner:
    manager = SimpleNamespace(received=dict.fromkeys(SOURCES, 0))
    runner = OrderRunner.__new__(OrderRunner)
    runner.m = manager  # type: ignore[assignment]
    runner.counted = dict.fromkeys(SOURCES, 0)
    return runner


def _update(**fields: int) -> agent_pb2.TaskUpdate:
    return agent_pb2.TaskUpdate(**fields)  # type: ignore[arg-type]


def test_bytes_by_source_only_grow_and_add_up_to_the_report() -> None:
    """The seed's share is sampled from its connection, which may lag the BitTorrent total:
    each source's count only grows, and seed plus peers is always the BitTorrent bytes."""
    runner = _runner()
    received = runner.m.received
    runner._count_received(_update(bittorrent_bytes=100, server_bytes=0, cached_bytes=7))
    assert received == {"peers": 100, "seed": 0, "first_pieces": 0, "fallback": 0, "cache": 7}
    # The seed's connection now says it sent 150 of 160: the peers' 100 stay counted.
    runner._count_received(_update(bittorrent_bytes=160, server_bytes=150, cached_bytes=7))
    assert received["peers"] == 100
    assert received["seed"] == 60
    runner._count_received(
        _update(
            bittorrent_bytes=300,
            server_bytes=150,
            first_piece_bytes=40,
            fallback_bytes=5,
            cached_bytes=7,
        )
    )
    assert received == {"peers": 150, "seed": 150, "first_pieces": 40, "fallback": 5, "cache": 7}
    assert sum(received.values()) == 300 + 40 + 5 + 7


# -- the dashboard -------------------------------------------------------------------------

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
_PROMQL_WORDS |= {"unless", "bool", "offset", "inf", "nan"}


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in _PROMQL_WORDS:
            continue  # a function call, or a keyword
        names.add(match.group())
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_metric_names_in_promql() -> None:
    assert metric_names_in(
        'histogram_quantile(0.99, sum by (le, grpc_method) (rate(x_bucket{a="b"}[5m])))'
    ) == {"x_bucket"}
    assert metric_names_in("sum(a_total) + sum(rate(b_total[$__rate_interval]))") == {
        "a_total",
        "b_total",
    }


def test_dashboard_is_a_grafana_model_with_a_datasource_input() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    titles = [p["title"] for p in dashboard["panels"]]
    assert len(set(titles)) == len(titles)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert metric_names_in(target["expr"]), target["expr"]


def exposed_names(text: str) -> set[str]:
    """Every series name a scrape's text can be asked for: its samples', its TYPE lines',
    and each histogram's _bucket, _sum and _count."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


# -- end to end ----------------------------------------------------------------------------


def _push(server: ServerProcess, tmp_path: Path, name: str, size: int) -> None:
    data = random_bytes(size, 15)
    archive = write_legacy_archive(tmp_path / "image.tar", name, [layer_tar({"f": data})])
    result = docketctl("push", name, "--archive", str(archive.path), "-q", server=server)
    assert result.returncode == 0, result.stderr


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


def _promtool_check(promtool: str, text: str) -> None:
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@dataclass
class Fleet:
    """A server and two agents, each serving metrics on a port of its own."""

    server: ServerProcess
    server_port: int
    agents: dict[str, AgentProcess]
    agent_ports: dict[str, int]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    server_port = free_port()
    server = ServerProcess(
        data_dir=tmp_path / "server",
        extra_args=[*FAST, "--metrics-listen", f"127.0.0.1:{server_port}"],
    ).start()
    started = Fleet(server, server_port, {}, {})
    try:
        for name in ("m1", "m2"):
            port = started.agent_ports[name] = free_port()
            started.agents[name] = AgentProcess(
                server=server,
                data_dir=tmp_path / name,
                name=name,
                groups=["metrics"],
                extra_args=["--metrics-listen", f"127.0.0.1:{port}"],
            ).start()
        wait_for_states(server, {"m1": "online", "m2": "online"})
        yield started
    finally:
        for agent in started.agents.values():
            agent.stop()
        server.stop()


def test_prometheus_sees_a_rollout_as_it_was_reported(fleet: Fleet, tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    server, agents, server_port = fleet.server, fleet.agents, fleet.server_port
    _push(server, tmp_path, "metrics:1", 3 * MiB)
    targets = {
        "docket-server": {"server": f"127.0.0.1:{server_port}"},
        "docket-agent": {name: f"127.0.0.1:{port}" for name, port in fleet.agent_ports.items()},
    }
    with Prometheus(targets) as prometheus:
        code, _events, hosts = rollout(server, "metrics:1", "--hosts", "metrics", "--prefetch-only")
        assert code == 0, hosts
        ended = time.time()
        prometheus.wait_scraped_after(ended)

        # Each agent's bytes by source add up to what the rollout reported for its host.
        by_source = {
            name: prometheus.values(f'docket_agent_received_bytes_total{{name="{name}"}}', "source")
            for name in agents
        }
        for name in agents:
            host = hosts[name]
            got = by_source[name]
            assert set(got) == set(SOURCES), got
            assert sum(got.values()) == host["received_bytes"] + host["cached_bytes"], (got, host)
            assert got["seed"] + got["peers"] == host["bittorrent_bytes"], (got, host)
            assert got["first_pieces"] == host["first_piece_bytes"], (got, host)
            assert got["fallback"] == host["fallback_bytes"], (got, host)
            assert got["cache"] == host["cached_bytes"], (got, host)
        # The image went somewhere: all of it to each host, from someone.
        for name in agents:
            assert sum(by_source[name].values()) >= 3 * MiB, by_source

        # The agents' states: the image in each cache, nothing in flight, no engine.
        image_bytes = hosts["m1"]["total_bytes"]
        assert prometheus.values("docket_agent_cache_bytes", "name") == dict.fromkeys(
            agents, image_bytes
        )
        assert prometheus.values("docket_agent_downloads_in_flight", "name") == dict.fromkeys(
            agents, 0
        )
        assert prometheus.values("docket_agent_engine_up", "name") == dict.fromkeys(agents, 0)
        # Connections ended once the hosts had it all; none lost as a duplicate (two hosts
        # that dial each other at once).
        ended = prometheus.values("sum by (name) (docket_agent_peer_disconnects_total)", "name")
        assert set(ended) == set(agents), ended
        assert min(ended.values()) >= 1, ended
        duplicate = 'docket_agent_peer_disconnects_total{reason="duplicate peer-id"}'
        assert not any(prometheus.values(duplicate, "name").values())

        # The server: two agents online, one rollout succeeded, the calls that made it.
        assert prometheus.values("docket_server_agents", "state") == {
            "online": 2,
            "stale": 0,
            "offline": 0,
        }
        assert prometheus.value('docket_server_rollouts_ended_total{state="succeeded"}') == 1
        assert prometheus.value("docket_server_rollouts_running") == 0
        duration = 'docket_server_rollout_duration_seconds_count{state="succeeded"}'
        assert prometheus.value(duration) == 1
        create = prometheus.values(
            'grpc_server_handled_total{grpc_method="CreateRollout"}', "grpc_code"
        )
        assert create == {"OK": 1}
        assert (
            prometheus.value('grpc_server_handling_seconds_count{grpc_method="CreateRollout"}') == 1
        )
        # A call that fails counts with its status code (the Gatekeeper aborts it).
        assert docketctl("inspect", "nosuch:1", server=server).returncode != 0
        prometheus.wait_scraped_after(time.time())
        get_image = prometheus.values(
            'grpc_server_handled_total{grpc_method="GetImage"}', "grpc_code"
        )
        assert get_image.get("NOT_FOUND") == 1, get_image
        connects = prometheus.value('grpc_server_started_total{grpc_method="Connect"}')
        assert connects is not None
        assert connects >= 2
        assert prometheus.value('docket_server_uploads_total{result="stored"}') == 2  # + config
        assert prometheus.value("docket_server_blob_bytes") == image_bytes
        assert prometheus.value("docket_server_blobs") == 2
        egress = prometheus.value(
            "docket_server_seed_sent_bytes_total + docket_server_first_piece_sent_bytes_total"
        )
        assert egress is not None
        assert egress >= 3 * MiB

        # Registry HTTP requests count by route template, never by path.
        client = server.registry_client()
        assert client.request("GET", "/v2/").status_code == 200
        missing = "sha256:" + "0" * 64
        assert client.request("HEAD", f"/v2/metrics/blobs/{missing}").status_code == 404
        prometheus.wait_scraped_after(time.time())
        requests = prometheus.query("docket_registry_http_requests_total")
        labels = {
            (s["metric"]["route"], s["metric"]["method"], s["metric"]["code"]) for s in requests
        }
        assert ("/v2/", "GET", "200") in labels, labels
        assert ("/v2/{name}/blobs/{digest}", "HEAD", "404") in labels, labels
        assert not any(missing in str(s["metric"]) for s in requests), requests

        # A stream counts in grpc_server_handled_total when it ends: stop one agent.
        agents["m2"].stop()
        wait_for_states(server, {"m2": "offline"})
        prometheus.wait_scraped_after(time.time(), skip={"m2"})
        ended_streams = prometheus.values(
            'grpc_server_handled_total{grpc_method="Connect"}', "grpc_code"
        )
        assert sum(ended_streams.values()) >= 1, ended_streams
        assert prometheus.values("docket_server_agents", "state")["offline"] == 1

    # What the processes expose passes promtool, and holds every name the dashboard asks for.
    server_text = _scrape(server_port)
    agent_text = _scrape(fleet.agent_ports["m1"])
    _promtool_check(promtool, server_text)
    _promtool_check(promtool, agent_text)
    exposed = exposed_names(server_text) | exposed_names(agent_text)
    asked = set().union(*(metric_names_in(e) for e in dashboard_exprs()))
    assert asked - exposed == set()
    with urllib.request.urlopen(f"http://127.0.0.1:{server_port}/healthz", timeout=5) as r:
        assert r.status == 200


def _samples(text: str) -> dict[str, float]:
    """A scrape's unlabelled samples by name."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def test_an_agent_times_its_loads_and_sees_its_engine(
    tmp_path: Path, docker_engine: DockerEngine
) -> None:
    server = ServerProcess(data_dir=tmp_path / "server", extra_args=FAST).start()
    port = free_port()
    agent = AgentProcess(
        server=server,
        data_dir=tmp_path / "loader",
        name="loader",
        groups=["loaders"],
        docker_host=docker_engine.host,
        extra_args=["--metrics-listen", f"127.0.0.1:{port}"],
    )
    try:
        agent.start()
        wait_for_states(server, {"loader": "online"})
        assert _samples(_scrape(port))["docket_agent_load_duration_seconds_count"] == 0
        _push(server, tmp_path, "docket-metrics-loaded:1", MiB)
        code, _events, hosts = rollout(server, "docket-metrics-loaded:1", "--hosts", "loaders")
        assert code == 0, hosts
        samples = _samples(_scrape(port))
        assert samples["docket_agent_load_duration_seconds_count"] == 1
        assert samples["docket_agent_engine_up"] == 1
        assert samples["docket_agent_cache_bytes"] == hosts["loader"]["total_bytes"]
    finally:
        agent.stop()
        server.stop()
