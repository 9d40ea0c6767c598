"""`docketctl rollout`: put an image on every host a selector picks, and follow it.

Prints a line whenever a host changes state, then a summary table (stdout). With -o json,
one JSON object per event, then the summary. The live terminal view comes next.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC
from typing import Any

import click

from docket_cli.client import Connection
from docket_cli.command import output_option, with_connection
from docket_cli.render import columns, human_size
from docket_common.pb import agent_pb2, rollout_pb2
from docket_common.pb import rollout_service_pb2 as pb
from docket_common.reference import parse_reference
from docket_common.selector import SELECTOR_HELP, parse_selector

TASK_STATES = {v: k.removeprefix("TASK_STATE_").lower() for k, v in agent_pb2.TaskState.items()}
ROLLOUT_STATES = {
    v: k.removeprefix("ROLLOUT_STATE_").lower() for k, v in rollout_pb2.RolloutState.items()
}


def host_json(host: rollout_pb2.RolloutHost) -> dict[str, Any]:
    return {
        "host": host.agent_name,
        "order_id": host.order_id,
        "state": TASK_STATES.get(host.state, "unknown"),
        "error": host.error or None,
        "image_id": host.image_id or None,
        "total_bytes": host.total_bytes,
        "done_bytes": host.done_bytes,
        "total_pieces": host.total_pieces,
        "done_pieces": host.done_pieces,
        "rate_bytes_per_second": host.rate_bytes_per_second,
        "peer_count": host.peer_count,
        "cached_bytes": host.cached_bytes,
        "bittorrent_bytes": host.bittorrent_bytes,
        "server_bytes": host.server_bytes,
        "peer_bytes": max(host.bittorrent_bytes - host.server_bytes, 0),
        "fallback_bytes": host.fallback_bytes,
        "seconds": _seconds(host),
    }


def _seconds(host: rollout_pb2.RolloutHost) -> float | None:
    if not host.HasField("end_time"):
        return None
    span = host.end_time.ToDatetime(tzinfo=UTC) - host.start_time.ToDatetime(tzinfo=UTC)
    return round(span.total_seconds(), 2)


def summary_table(rollout: rollout_pb2.Rollout) -> str:
    rows = [["HOST", "RESULT", "TIME", "FROM PEERS", "FROM SERVER", "FALLBACK", "CACHED", "NOTE"]]
    for host in rollout.hosts:
        seconds = _seconds(host)
        rows.append(
            [
                host.agent_name,
                TASK_STATES.get(host.state, "unknown"),
                "-" if seconds is None else f"{seconds:.1f}s",
                human_size(max(host.bittorrent_bytes - host.server_bytes, 0)),
                human_size(host.server_bytes),
                human_size(host.fallback_bytes),
                human_size(host.cached_bytes),
                host.error or "",
            ]
        )
    return columns(rows)


@click.command(
    "rollout",
    help="Put an image on every host the selector picks, at once, and follow it.\n\n"
    f"{SELECTOR_HELP}\n\nExits 0 when every host succeeded, 1 otherwise.",
)
@click.argument("ref")
@click.option("--hosts", "selector", required=True, help="Host selector.")
@click.option(
    "--prefetch-only", is_flag=True, help="Download and seed only; do not load into Docker."
)
@output_option
@with_connection
async def rollout_cmd(
    conn: Connection, ref: str, selector: str, prefetch_only: bool, output: str
) -> None:
    name = parse_reference(ref).name
    parse_selector(selector)
    created = await conn.rollouts.CreateRollout(
        pb.CreateRolloutRequest(image_name=name, selector=selector, prefetch_only=prefetch_only),
        metadata=conn.metadata,
    )
    rollout = created.rollout
    click.echo(
        f"Rollout {rollout.id}: {rollout.image_name} ({human_size(rollout.image_size_bytes)}) "
        f"to {len(rollout.hosts)} hosts",
        err=True,
    )
    states = {h.agent_name: h.state for h in rollout.hosts}
    final = rollout_pb2.ROLLOUT_STATE_UNSPECIFIED
    async for response in conn.rollouts.WatchRollout(
        pb.WatchRolloutRequest(id=rollout.id), metadata=conn.metadata
    ):
        event = response.event
        kind = event.WhichOneof("change")
        if output == "json":
            sys.stdout.write(json.dumps(_event_json(event)) + "\n")
            sys.stdout.flush()
        if kind == "host":
            host = event.host
            if states.get(host.agent_name) != host.state:
                states[host.agent_name] = host.state
                if output != "json":
                    note = f"  {host.error}" if host.error else ""
                    click.echo(f"{host.agent_name}: {TASK_STATES.get(host.state)}{note}", err=True)
        elif kind == "state":
            final = event.state
    done = (await conn.rollouts.GetRollout(pb.GetRolloutRequest(id=rollout.id))).rollout
    if output == "json":
        sys.stdout.write(
            json.dumps(
                {
                    "summary": {
                        "id": done.id,
                        "state": ROLLOUT_STATES.get(done.state),
                        "hosts": [host_json(h) for h in done.hosts],
                    }
                }
            )
            + "\n"
        )
    else:
        click.echo(summary_table(done))
        click.echo(f"Rollout {done.id} {ROLLOUT_STATES.get(final or done.state)}", err=True)
    if done.state != rollout_pb2.ROLLOUT_STATE_SUCCEEDED:
        raise click.exceptions.Exit(1)


def _event_json(event: rollout_pb2.RolloutEvent) -> dict[str, Any]:
    kind = event.WhichOneof("change")
    out: dict[str, Any] = {"time": event.event_time.ToJsonString(), "type": kind}
    if kind == "snapshot":
        out["rollout"] = {
            "id": event.snapshot.id,
            "image": event.snapshot.image_name,
            "state": ROLLOUT_STATES.get(event.snapshot.state),
            "hosts": [host_json(h) for h in event.snapshot.hosts],
        }
    elif kind == "host":
        out["host"] = host_json(event.host)
    elif kind == "state":
        out["state"] = ROLLOUT_STATES.get(event.state)
    return out
