"""`docketctl pulls`: what runtimes on the hosts pulled through their agents, and (--watch)
the pulls as they happen, with the same per-host view as a rollout."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import click
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from docket_cli.client import Connection
from docket_cli.command import output_option, with_connection
from docket_cli.render import columns, human_size, stderr
from docket_cli.rollout_view import BAD, DONE, STYLES, host_json, seconds, state_name
from docket_common.pb import pull_service_pb2 as pb

LIVE_LINES = 30


def pull_json(pull: pb.Pull) -> dict[str, Any]:
    out = host_json(pull.host)
    return {
        "id": pull.id,
        "host": out.pop("host"),
        "image": pull.image_name,
        "image_digest": pull.image_digest or None,
        "blob_digests": list(pull.blob_digests),
        "create_time": pull.create_time.ToJsonString(),
        **{k: v for k, v in out.items() if k not in ("order_id", "image_digest")},
    }


def pulls_table(pulls: list[pb.Pull]) -> str:
    rows = [
        [
            "HOST",
            "IMAGE",
            "RESULT",
            "TIME",
            "FROM PEERS",
            "FROM SERVER",
            "FALLBACK",
            "CACHED",
            "NOTE",
        ]
    ]
    for pull in pulls:
        host = pull.host
        took = seconds(host)
        note = host.error if host.state in BAD else ""
        rows.append(
            [
                host.agent_name,
                pull.image_name,
                state_name(host),
                "-" if took is None else f"{took:.1f}s",
                human_size(max(host.bittorrent_bytes - host.server_bytes, 0)),
                human_size(host.server_bytes + host.first_piece_bytes),
                human_size(host.fallback_bytes),
                human_size(host.cached_bytes),
                note,
            ]
        )
    return columns(rows)


@click.command("pulls")
@click.option(
    "--hosts", "selector", default="", help="Only these hosts (a selector, as for agents)."
)
@click.option("-w", "--watch", is_flag=True, help="Follow the pulls live, until Ctrl-C.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@output_option
@with_connection
async def pulls_cmd(conn: Connection, selector: str, watch: bool, limit: int, output: str) -> None:
    """List the pulls runtimes made through the hosts' agents (docker pull, containerd),
    newest first: each host's image, how it went, and where its bytes came from. With
    --watch, follow them live."""
    if watch:
        await _watch(conn, selector, output)
        return
    found: list[pb.Pull] = []
    token = ""
    while len(found) < limit:
        page = await conn.pulls.ListPulls(
            pb.ListPullsRequest(
                selector=selector, page_size=min(limit - len(found), 500), page_token=token
            ),
            metadata=conn.metadata,
        )
        found.extend(page.pulls)
        token = page.next_page_token
        if not token:
            break
    if output == "json":
        sys.stdout.write(json.dumps([pull_json(p) for p in found], indent=2) + "\n")
    else:
        click.echo(pulls_table(found))


async def _watch(conn: Connection, selector: str, output: str) -> None:
    loop = asyncio.get_running_loop()
    watching = asyncio.current_task()
    loop.add_signal_handler(signal.SIGINT, lambda: watching.cancel() if watching else None)
    view: _View = (
        _JsonView() if output == "json" else _LiveView() if stderr.is_terminal else _LineView()
    )
    try:
        async for response in conn.pulls.WatchPulls(
            pb.WatchPullsRequest(selector=selector), metadata=conn.metadata
        ):
            view.event(response)
    except asyncio.CancelledError:
        pass  # Ctrl-C: the end of watching, not a failure
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        view.close()


class _View:
    def __init__(self) -> None:
        self.pulls: dict[str, pb.Pull] = {}

    def event(self, response: pb.WatchPullsResponse) -> None:
        if response.HasField("snapshot"):
            self.pulls = {p.id: p for p in response.snapshot.pulls}
        elif response.HasField("pull"):
            self.pulls[response.pull.id] = response.pull

    def close(self) -> None:
        pass


class _JsonView(_View):
    def event(self, response: pb.WatchPullsResponse) -> None:
        super().event(response)
        out: dict[str, Any] = {"time": response.event_time.ToJsonString()}
        if response.HasField("snapshot"):
            out |= {"type": "snapshot", "pulls": [pull_json(p) for p in response.snapshot.pulls]}
        else:
            out |= {"type": "pull", "pull": pull_json(response.pull)}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


class _LineView(_View):
    """Off a terminal: a line on stderr whenever a pull starts or changes state."""

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[str, int] = {}

    def event(self, response: pb.WatchPullsResponse) -> None:
        super().event(response)
        changed = response.snapshot.pulls if response.HasField("snapshot") else [response.pull]
        for pull in changed:
            if self.states.get(pull.id) != pull.host.state:
                self.states[pull.id] = pull.host.state
                note = f": {pull.host.error}" if pull.host.error else ""
                click.echo(
                    f"{pull.host.agent_name} {pull.image_name} {state_name(pull.host)}{note}",
                    err=True,
                )


class _LiveView(_View):
    """On a terminal: a line per pull (in flight first, then the latest), redrawn four times
    a second."""

    def __init__(self) -> None:
        super().__init__()
        self.live = Live(self._render(), console=stderr, refresh_per_second=4)
        self.live.start()

    def event(self, response: pb.WatchPullsResponse) -> None:
        super().event(response)
        self.live.update(self._render())

    def close(self) -> None:
        self.live.update(self._render())
        self.live.stop()

    def _render(self) -> RenderableType:
        pulls = sorted(
            self.pulls.values(),
            key=lambda p: (p.host.state in DONE or p.host.state in BAD, -p.create_time.seconds),
        )
        active = sum(1 for p in pulls if p.host.state not in DONE and p.host.state not in BAD)
        rate = sum(p.host.rate_bytes_per_second for p in pulls)
        header = Text(
            f"Pulls: {active} in flight, {len(pulls) - active} done lately  "
            f"{human_size(rate)}/s  (Ctrl-C to stop watching)",
            style="bold",
        )
        table = Table.grid(padding=(0, 1))
        for column in ("host", "image", "state", "bar", "bytes", "rate", "peers"):
            table.add_column(column, no_wrap=True)
        for pull in pulls[:LIVE_LINES]:
            host = pull.host
            state = state_name(host)
            held = host.total_bytes if host.state in DONE else host.done_bytes
            row: list[RenderableType] = [
                Text(host.agent_name),
                Text(pull.image_name),
                Text(state, style=STYLES.get(state, "")),
            ]
            if host.state in BAD:
                row.append(Text(host.error or state, style=STYLES.get(state, "")))
            else:
                row += [
                    ProgressBar(total=host.total_bytes or 1, completed=held, width=30),
                    Text(f"{human_size(held)}/{human_size(host.total_bytes)}"),
                    Text(
                        f"{human_size(host.rate_bytes_per_second)}/s"
                        if host.rate_bytes_per_second
                        else ""
                    ),
                    Text(f"{host.peer_count} peers" if host.peer_count else ""),
                ]
            table.add_row(*row)
        if len(pulls) > LIVE_LINES:
            table.add_row(Text(f"… {len(pulls) - LIVE_LINES} more", style="dim"))
        return Group(header, table)
