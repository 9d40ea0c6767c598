"""Shared pytest fixtures.

Sections (append new fixtures to the section they belong to, or add a section):

1. Docker engine: a private dockerd started once per test session (`docker_engine`).
2. Test images: a busybox base and two images sharing it, made once (`test_images`).
3. Docket server: a real docket-server process per test (`server`).
4. Agents: agents started by a test (`agents`), and three engines for agent hosts
   (`agent_engines`, once per session).
5. Databases: a private PostgreSQL once per session (`postgres`), a fresh database on it per
   test (`postgres_url`), and `database_url`: each test using it runs on SQLite and on
   PostgreSQL.

Tests that use these must be marked ``@pytest.mark.docker``. Without dockerd (or root) they
are skipped, except under CI (the ``CI`` environment variable set), where that is an error.
The same goes for PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agents import AgentProcess, StartAgent
from tests.support.dockerd import DockerEngine, docker_unavailable_reason
from tests.support.images import ImagePair, make_image_pair
from tests.support.netns import running_under_ci
from tests.support.postgres import PostgresServer, postgres_unavailable_reason
from tests.support.server import REGISTRY_AUTH_ENV, ServerProcess


@pytest.fixture(scope="session", autouse=True)
def registry_logins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One docker config.json for the session, which docker and skopeo read: each secure
    ServerProcess logs its admin token in there when it starts (tests/support/server.py)."""
    config_dir = tmp_path_factory.mktemp("docker-config")
    saved = {k: os.environ.get(k) for k in ("DOCKER_CONFIG", REGISTRY_AUTH_ENV)}
    os.environ["DOCKER_CONFIG"] = str(config_dir)
    os.environ[REGISTRY_AUTH_ENV] = str(config_dir / "config.json")
    yield config_dir
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ---------------------------------------------------------------------------------------
# 1. Docker engine
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A private dockerd for the whole session (``.host``, ``.client``, ``.env()``)."""
    reason = docker_unavailable_reason()
    if reason is not None:
        if running_under_ci():
            pytest.fail(f"CI needs a Docker engine for these tests: {reason}", pytrace=False)
        pytest.skip(reason)
    with DockerEngine() as engine:
        yield engine


# ---------------------------------------------------------------------------------------
# 2. Test images
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def test_images(docker_engine: DockerEngine) -> ImagePair:
    """``docket-test/base:1`` (busybox + 2 MiB), ``docket-test/app1:1`` (base + 2 layers)
    and ``docket-test/app2:1`` (base + 1 layer), made once in the session's engine."""
    base, app1, app2 = make_image_pair(docker_engine.client)
    return ImagePair(base=base, app1=app1, app2=app2)


# ---------------------------------------------------------------------------------------
# 3. Docket server
# ---------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real docket-server process with a fresh data dir, on free 127.0.0.1 ports."""
    proc = ServerProcess(data_dir=tmp_path / "server").start()
    yield proc
    code = proc.stop()
    # A clean exit on SIGTERM is part of what every test checks.
    assert code == 0, f"docket-server exited {code}:\n{proc.log_tail()}"


# ---------------------------------------------------------------------------------------
# 4. Agents
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def agent_engines(docker_engine: DockerEngine) -> Iterator[list[DockerEngine]]:
    """Three more private Docker engines, one per agent host, for the whole session: tests
    give their images names of their own."""
    engines = [DockerEngine().start() for _ in range(3)]
    yield engines
    for engine in engines:
        engine.stop()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[StartAgent]:
    """Starts agents (``agents(server, name, groups=[...], docker_host=...)``); each is
    stopped when the test ends."""
    started: list[AgentProcess] = []

    def start(server: ServerProcess, name: str, **kwargs: Any) -> AgentProcess:
        agent = AgentProcess(server=server, data_dir=tmp_path / name, name=name, **kwargs).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


# ---------------------------------------------------------------------------------------
# 5. Databases
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the whole session (initdb in a temp dir)."""
    reason = postgres_unavailable_reason()
    if reason is not None:
        if running_under_ci():
            pytest.fail(f"CI needs PostgreSQL for these tests: {reason}", pytrace=False)
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """The SQLAlchemy URL of a new, empty database on the session's PostgreSQL."""
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty metadata database: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'docket.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
