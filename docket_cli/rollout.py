"""`docketctl rollout` and `docketctl rollouts list|show|watch|cancel`.

A rollout lives on the server. The CLI starts it and follows it; Ctrl-C only stops following
(the rollout goes on) and says how to follow it again.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import TYPE_CHECKING

import click
from google.protobuf.duration_pb2 import Duration

from docket_cli.client import Connection
from docket_cli.command import output_option, with_connection
from docket_common.cli import parse_duration
from docket_common.pb import rollout_pb2
from docket_common.pb import rollout_service_pb2 as pb
from docket_common.reference import parse_reference
from docket_common.selector import SELECTOR_HELP, parse_selector

# The views and tables (docket_cli.render, docket_cli.rollout_view: rich, about 35 ms to
# import) are imported where they are used: `docketctl rollout` sends CreateRollout first, and
# the hosts start on their orders while it imports them to follow the rollout.
if TYPE_CHECKING:
    from docket_cli.rollout_view import View

EXIT_HELP = (
    "Exit codes: 0 every host succeeded; 3 the rollout failed; 4 it was cancelled; 5 it timed "
    "out; 1 it could not start (or another error); 130 Ctrl-C (the rollout goes on)."
)


class Detached(Exception):
    """The user pressed Ctrl-C while following: the rollout goes on."""


async def follow(conn: Connection, rollout_id: str, output: str) -> rollout_pb2.Rollout:
    """Shows the rollout's events until it ends; returns it as it ended."""
    from docket_cli.render import stderr
    from docket_cli.rollout_view import JsonView, LineView, LiveView

    view: View | None = None
    loop = asyncio.get_running_loop()
    watching = asyncio.current_task()
    detached = False

    def on_interrupt() -> None:
        nonlocal detached
        detached = True
        if watching is not None:
            watching.cancel()

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        # Batched: the changes of many hosts in one message (thousands of hosts would
        # otherwise cost the server a message each). A server older than batches sends
        # one event a message whatever the request said.
        async for response in conn.rollouts.WatchRollout(
            pb.WatchRolloutRequest(id=rollout_id, batched=True), metadata=conn.metadata
        ):
            for event in watch_events(response):
                if view is None:
                    snapshot = event.snapshot
                    if output == "json":
                        view = JsonView(snapshot)
                    elif stderr.is_terminal:
                        view = LiveView(snapshot)
                    else:
                        view = LineView(snapshot)
                view.event(event)
    except asyncio.CancelledError:
        if detached:
            raise Detached from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if view is not None:
            view.close()
    ended: rollout_pb2.Rollout = (
        await conn.rollouts.GetRollout(pb.GetRolloutRequest(id=rollout_id), metadata=conn.metadata)
    ).rollout
    return ended


def watch_events(response: pb.WatchRolloutResponse) -> list[rollout_pb2.RolloutEvent]:
    """The events of one WatchRollout message, in either shape."""
    if response.HasField("event"):
        return [response.event]
    return list(response.events)


async def follow_to_the_end(conn: Connection, rollout_id: str, output: str) -> None:
    from docket_cli.rollout_view import EXIT_CODES, outcome_line, rollout_json, summary_table

    try:
        done = await follow(conn, rollout_id, output)
    except Detached:
        click.echo(
            f"\nStopped following rollout {rollout_id}; it goes on on the server.\n"
            f"Follow it again: docketctl rollouts watch {rollout_id}\n"
            f"Stop it:         docketctl rollouts cancel {rollout_id}",
            err=True,
        )
        raise click.exceptions.Exit(130) from None
    if output == "json":  # newline-delimited, like the events before it
        click.echo(json.dumps({"summary": rollout_json(done)}))
    else:
        click.echo(summary_table(done))
        click.echo(outcome_line(done), err=True)
    raise click.exceptions.Exit(EXIT_CODES.get(done.state, 1))


@click.command(
    "rollout",
    help="Put an image on every host the selector picks, and follow it live.\n\n"
    f"{SELECTOR_HELP}\n\n"
    "Hosts offline at the start get their order when they reconnect; if they are not back "
    "before --timeout they count as failed.\n\n" + EXIT_HELP,
)
@click.argument("ref")
@click.option("--hosts", "selector", required=True, help="Host selector.")
@click.option(
    "--canary",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Start this many hosts (the first by name) alone; the rest only once they succeed.",
)
@click.option(
    "--max-parallel",
    type=click.IntRange(min=0),
    default=0,
    show_default="all",
    help="At most this many hosts fetching at once.",
)
@click.option(
    "--max-failures",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Stop starting hosts once more than this many have failed (the rollout fails).",
)
@click.option(
    "--timeout",
    "time_limit",
    default="30m",
    show_default=True,
    help="Give up on hosts not done by then (90s, 10m, 1h30m).",
)
@click.option("--prefetch-only", is_flag=True, help="Download and seed only; do not load.")
@click.option("--detach", is_flag=True, help="Start it, print its id, and return.")
@output_option
@with_connection
async def rollout_cmd(
    conn: Connection,
    ref: str,
    selector: str,
    canary: int,
    max_parallel: int,
    max_failures: int,
    time_limit: str,
    prefetch_only: bool,
    detach: bool,
    output: str,
) -> None:
    name = parse_reference(ref).name
    parse_selector(selector)
    limit = Duration()
    limit.FromTimedelta(parse_duration(time_limit))
    created = await conn.rollouts.CreateRollout(
        pb.CreateRolloutRequest(
            image_name=name,
            selector=selector,
            prefetch_only=prefetch_only,
            canary=canary,
            max_parallel=max_parallel,
            max_failures=max_failures,
            timeout=limit,
        ),
        metadata=conn.metadata,
    )
    from docket_cli.render import human_size, print_json
    from docket_cli.rollout_view import rollout_json

    rollout = created.rollout
    pending = [h.agent_name for h in rollout.hosts]
    if output != "json":
        click.echo(
            f"Rollout {rollout.id}: {rollout.image_name} "
            f"({human_size(rollout.image_size_bytes)}) to {len(pending)} hosts",
            err=True,
        )
    if detach:
        if output == "json":
            print_json(rollout_json(rollout))
        else:
            click.echo(rollout.id)
        return
    await follow_to_the_end(conn, rollout.id, output)


@click.group("rollouts")
def rollouts_group() -> None:
    """List, show, follow and cancel rollouts."""


@rollouts_group.command("list")
@output_option
@with_connection
async def rollouts_list(conn: Connection, output: str) -> None:
    """List rollouts, newest first."""
    from docket_cli.render import ago, columns, print_json
    from docket_cli.rollout_view import ROLLOUT_STATES, TASK_STATES, rollout_json

    found: list[rollout_pb2.Rollout] = []
    token = ""
    while True:
        page = await conn.rollouts.ListRollouts(
            pb.ListRolloutsRequest(page_size=200, page_token=token), metadata=conn.metadata
        )
        found.extend(page.rollouts)
        token = page.next_page_token
        if not token:
            break
    if output == "json":
        print_json([rollout_json(r) for r in found])
        return
    rows = [["ID", "IMAGE", "HOSTS", "STATE", "DONE", "FAILED", "STARTED"]]
    for r in found:
        rows.append(
            [
                r.id,
                r.image_name,
                r.selector,
                ROLLOUT_STATES.get(r.state, "unknown"),
                f"{sum(1 for h in r.hosts if TASK_STATES.get(h.state) == 'succeeded')}"
                f"/{len(r.hosts)}",
                str(sum(1 for h in r.hosts if TASK_STATES.get(h.state) == "failed")),
                ago(r.create_time),
            ]
        )
    click.echo(columns(rows))


@rollouts_group.command("show")
@click.argument("rollout_id")
@output_option
@with_connection
async def rollouts_show(conn: Connection, rollout_id: str, output: str) -> None:
    """Show a rollout: its hosts, and every state change it went through."""
    from docket_cli.render import columns, print_json
    from docket_cli.rollout_view import (
        ROLLOUT_STATES,
        TASK_STATES,
        outcome_line,
        rollout_json,
        summary_table,
    )

    rollout = (
        await conn.rollouts.GetRollout(pb.GetRolloutRequest(id=rollout_id), metadata=conn.metadata)
    ).rollout
    records = (
        await conn.rollouts.ListRolloutRecords(
            pb.ListRolloutRecordsRequest(id=rollout_id), metadata=conn.metadata
        )
    ).records
    history = [
        {
            "time": r.record_time.ToJsonString(),
            "host": r.agent_name or None,
            "state": (
                TASK_STATES.get(r.task_state)
                if r.agent_name
                else ROLLOUT_STATES.get(r.rollout_state)
            ),
            "message": r.message or None,
        }
        for r in records
    ]
    if output == "json":
        print_json(rollout_json(rollout) | {"history": history})
        return
    click.echo(
        f"Rollout {rollout.id}: {rollout.image_name} to {rollout.selector!r}"
        f" (canary {rollout.canary}, max parallel {rollout.max_parallel or 'all'},"
        f" max failures {rollout.max_failures})"
    )
    click.echo(outcome_line(rollout))
    click.echo("")
    click.echo(summary_table(rollout))
    click.echo("")
    rows = [["TIME", "HOST", "STATE", "NOTE"]]
    for h in history:
        rows.append([str(h["time"]), h["host"] or "(rollout)", str(h["state"]), h["message"] or ""])
    click.echo(columns(rows))


@rollouts_group.command(
    "watch", help="Follow a rollout: a snapshot, then live events.\n\n" + EXIT_HELP
)
@click.argument("rollout_id")
@output_option
@with_connection
async def rollouts_watch(conn: Connection, rollout_id: str, output: str) -> None:
    await follow_to_the_end(conn, rollout_id, output)


@rollouts_group.command("cancel")
@click.argument("rollout_id")
@with_connection
async def rollouts_cancel(conn: Connection, rollout_id: str) -> None:
    """Stop a rollout: hosts not started stay so, hosts fetching stop and drop partial work."""
    from docket_cli.rollout_view import ROLLOUT_STATES

    rollout = (
        await conn.rollouts.CancelRollout(
            pb.CancelRolloutRequest(id=rollout_id), metadata=conn.metadata
        )
    ).rollout
    click.echo(f"Rollout {rollout.id}: {ROLLOUT_STATES.get(rollout.state)}; cancel sent")
