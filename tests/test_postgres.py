"""docket-server on PostgreSQL (``--database-url postgresql+asyncpg://…``): a rollout with real
agents is recorded there and outlives the server; a database it cannot use is one clear line.

The store's own tests run on PostgreSQL too (tests/test_sql_store.py)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from tests.support.agents import StartAgent, wait_for_states
from tests.support.postgres import PostgresServer
from tests.support.server import BIN, ServerProcess, free_port
from tests.test_rollouts import FAST, MiB, push, run, show


def rows(url: str, query: str, **params: str) -> list[tuple[object, ...]]:
    """The rows of one query, read straight from the database."""

    async def read() -> list[tuple[object, ...]]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                return [tuple(r) for r in await conn.execute(sa.text(query), params)]
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_a_rollout_on_postgresql_is_recorded_there_and_outlives_the_server(
    postgres_url: str, agents: StartAgent, tmp_path: Path
) -> None:
    server = ServerProcess(
        data_dir=tmp_path / "server", extra_args=[*FAST, "--database-url", postgres_url]
    ).start()
    try:
        push(server, tmp_path, "pg:1", 2 * MiB, 11)
        for name in ("h1", "h2"):
            agents(server, name, groups=["g"])
        wait_for_states(server, {"h1": "online", "h2": "online"})
        code, summary = run(server, "rollout", "pg:1", "--hosts", "g", "--prefetch-only")
        assert code == 0, summary
        assert {h["host"]: h["state"] for h in summary["hosts"]} == {
            "h1": "succeeded",
            "h2": "succeeded",
        }
        history = show(server, summary["id"])["history"]
        assert server.stop() == 0, server.log_tail()

        # Everything is in PostgreSQL; the data dir holds no SQLite database.
        assert not (server.data_dir / "docket.db").exists()
        recorded = rows(
            postgres_url,
            "SELECT agent, task_state, rollout_state FROM rollout_records"
            " WHERE rollout_id = :id ORDER BY id",
            id=summary["id"],
        )
        assert len(recorded) == len(history)
        for host in ("h1", "h2"):
            states = [task for agent, task, _ in recorded if agent == host]
            assert states[0] == "pending"
            assert states[-1] == "succeeded"
        assert [r for _, _, r in recorded if r] == ["running", "succeeded"]
        assert rows(postgres_url, "SELECT repository, tag FROM tags") == [("pg", "1")]

        # A new server on the same database shows the same rollout.
        server.start()
        again = show(server, summary["id"])
        assert again["history"] == history
        assert again["state"] == "succeeded"
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()


@pytest.mark.parametrize("case", ["wrong password", "nothing listening", "unknown database"])
def test_a_database_it_cannot_use_is_one_line_and_exit_1(
    case: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if case == "wrong password":
        postgres: PostgresServer = request.getfixturevalue("postgres")
        url, want = postgres.url("postgres", password="not-it"), "password authentication failed"
    elif case == "nothing listening":
        url = f"postgresql+asyncpg://docket:not-it@127.0.0.1:{free_port()}/docket"
        want = "Connect call failed"
    else:
        url, want = "mysql://docket:not-it@db.example/docket", "unsupported database URL"
    result = subprocess.run(
        [
            str(BIN / "docket-server"),
            "--data-dir",
            str(tmp_path / "server"),
            "--insecure",
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--bt-listen",
            f"127.0.0.1:{free_port()}",
            "--registry-listen",
            "off",
            "--database-url",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("docket-server: error: "), lines
    assert want in lines[0]
    assert "not-it" not in lines[0]
