"""`docketctl agents`: the fleet as the server sees it."""

from __future__ import annotations

from typing import Any

import click

from docket_cli.client import Connection
from docket_cli.command import output_option, with_connection
from docket_cli.render import ago, columns, human_size, print_json, ts_iso
from docket_common.pb import agent_admin_service_pb2 as pb
from docket_common.pb import agent_pb2
from docket_common.selector import SELECTOR_HELP, parse_selector

STATES = {
    agent_pb2.AGENT_STATE_ONLINE: "online",
    agent_pb2.AGENT_STATE_STALE: "stale",
    agent_pb2.AGENT_STATE_OFFLINE: "offline",
}


async def list_agents(conn: Connection, selector: str) -> list[agent_pb2.Agent]:
    agents: list[agent_pb2.Agent] = []
    token = ""
    while True:
        page = await conn.agents.ListAgents(
            pb.ListAgentsRequest(selector=selector, page_size=1000, page_token=token),
            metadata=conn.metadata,
        )
        agents.extend(page.agents)
        token = page.next_page_token
        if not token:
            return agents


def agent_json(agent: agent_pb2.Agent) -> dict[str, Any]:
    return {
        "name": agent.name,
        "agent_id": agent.agent_id,
        "groups": list(agent.groups),
        "labels": dict(agent.labels),
        "state": STATES.get(agent.state, "unknown"),
        "version": agent.version,
        "peer_address": agent.peer_address,
        "bt_endpoint": agent.bt_endpoint,
        "platform": agent.platform or None,
        "docker_version": agent.docker_version or None,
        "docker_error": agent.docker_error or None,
        "disk_free_bytes": agent.disk_free_bytes,
        "cached_digests": list(agent.cached_digests),
        "connect_time": ts_iso(agent.connect_time),
        "last_seen_time": ts_iso(agent.last_seen_time),
        "create_time": ts_iso(agent.create_time),
    }


def agents_table(agents: list[agent_pb2.Agent]) -> str:
    rows = [
        [
            "NAME",
            "STATE",
            "GROUPS",
            "LABELS",
            "BITTORRENT",
            "PLATFORM",
            "DOCKER",
            "DISK FREE",
            "BLOBS",
            "LAST SEEN",
        ]
    ]
    rows += [
        [
            a.name,
            STATES.get(a.state, "unknown"),
            ",".join(a.groups) or "-",
            ",".join(f"{k}={v}" for k, v in sorted(a.labels.items())) or "-",
            a.bt_endpoint or "-",
            a.platform or "-",
            a.docker_version or "none",
            human_size(a.disk_free_bytes),
            str(len(a.cached_digests)),
            ago(a.last_seen_time),
        ]
        for a in agents
    ]
    return columns(rows)


@click.group(
    "agents",
    invoke_without_command=True,
    help=f"List the agents (hosts) the server knows; `agents remove` removes one.\n\n"
    f"{SELECTOR_HELP}",
)
@click.option("--hosts", "selector", default="all", show_default=True, help="Host selector.")
@output_option
@click.pass_context
def agents_cmd(ctx: click.Context, selector: str, output: str) -> None:
    if ctx.invoked_subcommand is None:
        _list_agents(selector, output)


@with_connection
async def _list_agents(conn: Connection, selector: str, output: str) -> None:
    parse_selector(selector)  # a bad selector fails here, before any call
    agents = await list_agents(conn, selector)
    if output == "json":
        print_json([agent_json(a) for a in agents])
    else:
        click.echo(agents_table(agents))


@agents_cmd.command("remove")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@with_connection
async def agents_remove_cmd(conn: Connection, names: tuple[str, ...]) -> None:
    """Remove agents from the fleet: their certificates stop working, their streams close,
    and their names are free to enroll again (with a join token)."""
    for name in names:
        await conn.agents.RemoveAgent(pb.RemoveAgentRequest(name=name), metadata=conn.metadata)
        click.echo(f"Removed agent {name}")
