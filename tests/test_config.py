"""Configuration files, --print-config and SIGHUP (docket_common/config.py), and health
(docket_common/health.py): the logic with click's runner, then the real server and agent."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import time
import tomllib
from pathlib import Path

import aiohttp
import click
import pytest
import requests
import structlog
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from docket_agent.main import main as agent_main
from docket_common.config import ConfigError, Reloader, config_options, read_config
from docket_common.health import Health
from docket_common.logs import configure_logging, set_log_level
from docket_common.oci_http import HttpFace
from docket_server.main import main as server_main
from tests.support.agents import StartAgent
from tests.support.postgres import PostgresServer
from tests.support.server import BIN, ServerProcess, docketctl


def print_config(command: click.Command, *args: str) -> tuple[dict[str, object], str]:
    result = CliRunner().invoke(command, [*args, "--print-config"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.output), result.output


def source_of(output: str, key: str) -> str:
    [line] = [x for x in output.splitlines() if x.startswith(f"{key} = ")]
    return line.rsplit("# ", 1)[1]


def test_a_file_sets_what_the_flags_set_and_a_flag_wins(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(
        'listen = "0.0.0.0:7900"\n'
        "max_upload_rate = 1000000\n"  # the underscore spelling works too
        'tls-san = ["a.example", "b.example"]\n'
        'agent-cert-ttl = "12h"\n'
        'peer-source = "both"\n'
    )
    values, output = print_config(
        server_main, "--config", str(config), "--agent-listen", "0.0.0.0:7999"
    )
    assert values["listen"] == "0.0.0.0:7900"
    assert values["max-upload-rate"] == 1000000
    assert values["tls-san"] == ["a.example", "b.example"]
    assert values["agent-cert-ttl"] == "12h"
    assert values["agent-listen"] == "0.0.0.0:7999"
    assert values["registry-listen"] == "127.0.0.1:5000"
    assert source_of(output, "listen") == "config file"
    assert source_of(output, "agent-listen") == "flag"
    assert source_of(output, "registry-listen") == "default"

    # A flag given on the command line wins over the file.
    values, output = print_config(
        server_main, "--config", str(config), "--listen", "127.0.0.1:1234"
    )
    assert values["listen"] == "127.0.0.1:1234"
    assert source_of(output, "listen") == "flag"


def test_print_config_is_a_config_file_that_gives_the_same_config(tmp_path: Path) -> None:
    first = tmp_path / "agent.toml"
    first.write_text(
        'name = "web-1"\ngroup = ["web", "eu"]\nlabel = ["zone=a", "rack=7"]\n'
        "no-docker = true\nmax-download-rate = 5000\nload-while-downloading = false\n"
        'platform = "linux/arm64"\n'
    )
    values, output = print_config(agent_main, "--config", str(first))
    assert values["label"] == ["zone=a", "rack=7"]
    assert values["platform"] == "linux/arm64/v8"  # as the agent normalizes it
    assert values["load-while-downloading"] is False
    second = tmp_path / "printed.toml"
    second.write_text(output)
    again, _ = print_config(agent_main, "--config", str(second))
    assert again == values


def test_print_config_says_off_for_what_is_turned_off(tmp_path: Path) -> None:
    first = tmp_path / "server.toml"
    first.write_text('registry-listen = "off"\ngc-interval = "off"\nmin-free-bytes = "2Gi"\n')
    values, output = print_config(server_main, "--config", str(first))
    assert values["registry-listen"] == "off"
    assert values["gc-interval"] == "off"
    assert values["min-free-bytes"] == 2 * 1024**3
    second = tmp_path / "printed.toml"
    second.write_text(output)
    again, _ = print_config(server_main, "--config", str(second))
    assert again == values


def test_print_config_hides_secrets(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('join-token = "dkt_secret_value"\n')
    values, output = print_config(agent_main, "--config", str(config))
    assert "dkt_secret_value" not in output
    assert "join-token" not in values
    assert "# join-token = (set, hidden)" in output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1\n", "unknown key 'bogus'"),
        ("listen = \n", "is not valid TOML"),
        ('listen = ["a:1", "b:2"]\n', "'listen' takes one value, not a list"),
        ("insecure = 1\n", "'insecure' wants true or false"),
        ("[listen]\nx = 1\n", "'listen' is a table"),
        ('listen = "1.2.3.4:5"\nlisten_ = 1\n', "unknown key 'listen_'"),
        ('listen = "no-port"\n', "'no-port' is not HOST:PORT"),
        ('agent-cert-ttl = "soon"\n', "want a duration"),
    ],
)
def test_a_bad_file_is_refused_with_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "server.toml"
    config.write_text(text)
    result = CliRunner().invoke(server_main, ["--config", str(config), "--print-config"])
    assert result.exit_code == 2
    assert message in result.output


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(server_main, ["--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "cannot read" in result.output
    assert "nope.toml" in result.output


def test_the_file_can_come_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('listen = "0.0.0.0:7911"\n')
    result = CliRunner().invoke(
        server_main, ["--print-config"], env={"DOCKET_SERVER_CONFIG": str(config)}
    )
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.output)["listen"] == "0.0.0.0:7911"


@click.command()
@config_options("TEST_CONFIG")
@click.option("--rate", type=int, default=0)
@click.option("--level", default="info")
@click.option("--name", default="n")
@click.pass_context
def _probe(ctx: click.Context, rate: int, level: str, name: str) -> None:
    ctx.obj = Reloader(ctx)


def test_reload_reports_changes_keeps_flags_and_goes_back_to_defaults(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('rate = 5\nlevel = "warning"\nname = "from-file"\n')
    ctx = _probe.make_context("probe", ["--config", str(config), "--name", "from-flag"])
    with ctx:
        _probe.invoke(ctx)
    reloader: Reloader = ctx.obj
    assert reloader.current == {"rate": 5, "level": "warning", "name": "from-flag"}

    config.write_text('rate = 7\nname = "changed-in-file"\n')  # level: back to its default
    reload = reloader.reload()
    assert reload is not None
    assert reload.changed == {"rate": 7, "level": "info"}  # the flag's name stays
    again = reloader.reload()
    assert again is not None
    assert again.changed == {}

    config.write_text('rate = "many"\n')
    with pytest.raises(click.BadParameter):
        reloader.reload()
    config.write_text("unknown = 1\n")
    with pytest.raises(ConfigError):
        reloader.reload()
    assert reloader.current == {"rate": 7, "level": "info", "name": "from-flag"}


def test_read_config_takes_both_spellings_once(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("max-upload-rate = 1\nmax_upload_rate = 2\n")
    with pytest.raises(ConfigError, match="given twice"):
        read_config(server_main, config)


def test_set_log_level_changes_loggers_already_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", json=True)
    try:
        logger = structlog.get_logger("probe")
        logger.debug("hidden")
        logger.info("shown")
        set_log_level("debug")
        logger.debug("now shown")
        set_log_level("error")
        logger.warning("hidden again")
        logger.exception("errors pass")
        events = [json.loads(x)["event"] for x in capsys.readouterr().err.splitlines()]
        assert events == ["shown", "now shown", "errors pass"]
    finally:  # the next tests log as tests do (not to this test's captured stderr)
        structlog.reset_defaults()
        set_log_level("info")


async def test_health_reports_each_check_and_serves_probes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("docket_common.health.CHECK_TIMEOUT", 0.2)
    state = {"db": None, "slow": False}

    async def db() -> str | None:
        return state["db"]  # type: ignore[return-value]

    async def broken() -> str | None:
        raise RuntimeError("boom")

    async def slow() -> str | None:
        if state["slow"]:
            await asyncio.sleep(10)
        return None

    health = Health(interval=3600)
    health.add("database", db)
    health.add("slow", slow)
    seen: list[bool] = []

    async def listener(ready: bool) -> None:
        seen.append(ready)

    health.on_change(listener)
    assert not health.ready  # nothing checked yet
    assert await health.check_now()
    state["db"] = "the database does not answer"
    assert not await health.check_now()
    assert health.problems == {"database": "the database does not answer"}
    assert seen == [True, False]

    state["db"] = None
    health.add("broken", broken)
    await health.check_now()  # /readyz answers with a round under a second old as it is
    app = aiohttp.web.Application()
    health.add_routes(app)
    face = HttpFace(app, "127.0.0.1", 0)
    port = await face.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
            async with session.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 503
                body = await r.json()
                assert body == {
                    "ready": False,
                    "checks": {"database": "ok", "slow": "ok", "broken": "check failed: boom"},
                }
        health._checks.pop("broken")
        health.results.pop("broken")
        state["slow"] = True
        assert not await health.check_now()
        assert health.problems == {"slow": "no answer in 0.2s"}
    finally:
        await face.stop(1)


# Real processes


def _server_config(path: Path, server: ServerProcess, **more: object) -> None:
    lines = [
        f'listen = "{server.address}"',
        f'agent-listen = "{server.agent_address}"',
        f'bt-listen = "127.0.0.1:{server.bt_port}"',
        f'registry-listen = "{server.registry}"',
        f'data-dir = "{server.data_dir}"',
        "log-json = true",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in more.items()]
    path.write_text("\n".join(lines) + "\n")


def _wait_for_log(server: ServerProcess, event: str, since: int, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log_path.read_text().splitlines()[since:]:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event:
                return entry  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"no {event!r} in the log:\n{server.log_tail()}")


def _log_lines(server: ServerProcess) -> int:
    return len(server.log_path.read_text().splitlines())


def test_the_server_runs_from_a_file_and_sighup_reloads_it(tmp_path: Path) -> None:
    server = ServerProcess(data_dir=tmp_path / "server")
    config = tmp_path / "server.toml"
    _server_config(config, server, **{"log-level": "info", "heartbeat-interval": 5.0})
    with server.log_path.open("ab") as log:
        server.proc = subprocess.Popen(
            [str(BIN / "docket-server"), "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        server.wait_serving(30)  # on the ports the file names
        server.log_in_registry_clients()
        ca = str(server.ca_path)

        # Probes need no token; the registry itself still does.
        assert requests.get(f"{server.registry_url}/healthz", verify=ca, timeout=5).text == "ok\n"
        ready = requests.get(f"{server.registry_url}/readyz", verify=ca, timeout=5)
        assert ready.status_code == 200
        assert ready.json() == {
            "ready": True,
            "checks": {"database": "ok", "seed": "ok", "disk": "ok"},
        }
        assert requests.get(f"{server.registry_url}/v2/", verify=ca, timeout=5).status_code == 401

        # A token revoked in the database by someone else (another server on the same
        # database, a restore): it works until SIGHUP re-reads the tokens.
        token = server.token("viewer", "--description", "revoked behind its back")
        listed = json.loads(docketctl("tokens", "list", "-o", "json", server=server).stdout)
        [token_id] = [t["id"] for t in listed if t["description"] == "revoked behind its back"]
        with sqlite3.connect(server.data_dir / "docket.db") as db:
            db.execute("UPDATE tokens SET revoked = 1 WHERE id = ?", (token_id,))

        def registry_requests_logged() -> int:
            return sum(
                1
                for line in server.log_path.read_text().splitlines()
                if '"registry request"' in line
            )

        admin = ("docket", server.admin_token)
        requests.get(f"{server.registry_url}/v2/", verify=ca, auth=admin, timeout=5)
        assert registry_requests_logged() == 0  # debug lines: not at info

        _server_config(
            config,
            server,
            **{"log-level": "debug", "max-upload-rate": 500_000, "heartbeat-interval": 2.0},
        )
        since = _log_lines(server)
        server.proc.send_signal(signal.SIGHUP)
        _wait_for_log(server, "tokens reloaded", since)
        reloaded = _wait_for_log(server, "config reloaded", since)
        assert reloaded["applied"] == "log-level, max-upload-rate"
        kept = _wait_for_log(
            server, "config changed but not applied: restart docket-server to apply", since
        )
        assert kept["settings"] == "heartbeat-interval"

        requests.get(f"{server.registry_url}/v2/", verify=ca, auth=admin, timeout=5)
        assert registry_requests_logged() == 1  # the new level is in effect
        refused = docketctl("images", server=server, env={"DOCKET_TOKEN": token})
        assert refused.returncode != 0
        assert "revoked" in refused.stderr

        # A broken file changes nothing, and the server goes on.
        config.write_text(config.read_text() + "bogus = 1\n")
        since = _log_lines(server)
        server.proc.send_signal(signal.SIGHUP)
        error = _wait_for_log(server, "config not reloaded: nothing changed", since)
        assert "unknown key 'bogus'" in error["error"]
        assert server.alive()
        assert docketctl("images", server=server).returncode == 0
    finally:
        assert server.stop() == 0


def test_the_agent_is_ready_only_while_connected(tmp_path: Path, agents: StartAgent) -> None:
    server = ServerProcess(data_dir=tmp_path / "server").start()
    try:
        agent = agents(server, "probe-host")
        url = f"http://{agent.registry}/readyz"

        def wait_ready(want: bool) -> dict[str, object]:
            deadline = time.monotonic() + 40
            body: dict[str, object] = {}
            while time.monotonic() < deadline:
                try:
                    r = requests.get(url, timeout=5)
                    body = r.json()
                    if (r.status_code == 200) == want:
                        assert body["ready"] is want
                        return body
                except requests.ConnectionError:
                    pass
                time.sleep(0.2)
            raise AssertionError(f"readyz never {want}: {body}\n{agent.log_tail()}")

        assert wait_ready(True)["checks"] == {"server": "ok", "bittorrent": "ok", "disk": "ok"}
        assert requests.get(f"http://{agent.registry}/healthz", timeout=5).status_code == 200
        server.stop()
        body = wait_ready(False)
        assert body["checks"] == {
            "server": f"not connected to the server at {server.address}",
            "bittorrent": "ok",
            "disk": "ok",
        }
        server.start()
        wait_ready(True)
    finally:
        server.stop()


def test_sighup_changes_the_agent_log_level(tmp_path: Path, agents: StartAgent) -> None:
    server = ServerProcess(data_dir=tmp_path / "server").start()
    try:
        config = tmp_path / "agent.toml"
        config.write_text('log-level = "info"\nmax-download-rate = 0\n')
        agent = agents(server, "hup-host", extra_args=["--config", str(config)])
        deadline = time.monotonic() + 20
        while "agent starting" not in agent.log_path.read_text():
            assert time.monotonic() < deadline, agent.log_tail()
            time.sleep(0.1)
        config.write_text(
            'log-level = "debug"\nmax-download-rate = 1000000\nname = "other"\n'
            "fallback-after = 10.0\n"
        )
        agent.signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while True:
            events = [
                json.loads(x) for x in agent.log_path.read_text().splitlines() if x.startswith("{")
            ]
            reloaded = [e for e in events if e.get("event") == "config reloaded"]
            kept = [e for e in events if e.get("event", "").startswith("config changed but not")]
            if reloaded and kept:
                break
            assert time.monotonic() < deadline, agent.log_tail()
            time.sleep(0.1)
        assert reloaded[0]["applied"] == "log-level, max-download-rate"
        # --name is given as a flag by the test: the flag wins, so it did not change at all.
        assert kept[0]["settings"] == "fallback-after"
    finally:
        server.stop()


def test_the_server_is_not_serving_while_its_database_is_gone(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.create_database()
    database = url.rsplit("/", 1)[1]
    server = ServerProcess(data_dir=tmp_path / "server", extra_args=["--database-url", url]).start()
    ca = str(server.ca_path)

    def wait_for(serving: bool) -> dict[str, object]:
        want = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        deadline = time.monotonic() + 30
        with server.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                ready = requests.get(f"{server.registry_url}/readyz", verify=ca, timeout=10)
                statuses = {
                    service: stub.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=10
                    ).status
                    for service in ("", "docket.v1.RolloutService")
                }
                if (ready.status_code == 200) == serving and set(statuses.values()) == {want}:
                    return ready.json()  # type: ignore[no-any-return]
                assert time.monotonic() < deadline, (ready.text, statuses, server.log_tail())
                time.sleep(0.2)

    try:
        assert wait_for(True)["checks"] == {"database": "ok", "seed": "ok", "disk": "ok"}
        # The database goes away: no new connection, the open ones ended.
        postgres._admin(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        postgres._admin(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'"
        )
        checks = wait_for(False)["checks"]
        assert isinstance(checks, dict)
        assert checks["seed"] == "ok"
        assert checks["disk"] == "ok"
        assert str(checks["database"]).startswith("the database does not answer")
        # It comes back, and so does the server, by itself.
        postgres._admin(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        wait_for(True)
        assert server.alive()
    finally:
        postgres._admin(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        server.stop()
