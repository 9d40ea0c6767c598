"""How a rollout is shown: a live view on a terminal, a line per state change otherwise,
one JSON object per event with -o json; and the summary at the end. No RPCs here."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC
from typing import Any

import click
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from docket_cli.render import columns, human_size, stderr
from docket_common.pb import agent_pb2, rollout_pb2

TASK_STATES = {v: k.removeprefix("TASK_STATE_").lower() for k, v in agent_pb2.TaskState.items()}
ROLLOUT_STATES = {
    v: k.removeprefix("ROLLOUT_STATE_").lower() for k, v in rollout_pb2.RolloutState.items()
}
DONE = {agent_pb2.TASK_STATE_SUCCEEDED}
BAD = {agent_pb2.TASK_STATE_FAILED, agent_pb2.TASK_STATE_CANCELLED}
STYLES = {
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "yellow",
    "queued": "dim",
    "pending": "dim",
    "loading": "cyan",
    "verifying": "cyan",
}
# Exit codes of `rollout` and `rollouts watch`.
EXIT_CODES = {
    rollout_pb2.ROLLOUT_STATE_SUCCEEDED: 0,
    rollout_pb2.ROLLOUT_STATE_FAILED: 3,
    rollout_pb2.ROLLOUT_STATE_CANCELLED: 4,
    rollout_pb2.ROLLOUT_STATE_TIMED_OUT: 5,
}


def state_name(host: rollout_pb2.RolloutHost) -> str:
    return TASK_STATES.get(host.state, "unknown")


def seconds(host: rollout_pb2.RolloutHost) -> float | None:
    if not host.HasField("end_time") or not host.HasField("start_time"):
        return None
    span = host.end_time.ToDatetime(tzinfo=UTC) - host.start_time.ToDatetime(tzinfo=UTC)
    return round(span.total_seconds(), 2)


def host_json(host: rollout_pb2.RolloutHost) -> dict[str, Any]:
    return {
        "host": host.agent_name,
        "order_id": host.order_id,
        "state": state_name(host),
        "error": host.error or None,
        "image_id": host.image_id or None,
        "image_digest": host.image_digest or None,
        "platform": host.platform or None,
        "total_bytes": host.total_bytes,
        "done_bytes": host.done_bytes,
        "total_pieces": host.total_pieces,
        "done_pieces": host.done_pieces,
        "rate_bytes_per_second": host.rate_bytes_per_second,
        "peer_count": host.peer_count,
        "cached_bytes": host.cached_bytes,
        "bittorrent_bytes": host.bittorrent_bytes,
        # From the server: its seed over BitTorrent, and the first pieces it handed out.
        "server_bytes": host.server_bytes + host.first_piece_bytes,
        "first_piece_bytes": host.first_piece_bytes,
        "peer_bytes": max(host.bittorrent_bytes - host.server_bytes, 0),
        "fallback_bytes": host.fallback_bytes,
        # Everything the host took in: over BitTorrent, as first pieces, and as fallback.
        "received_bytes": host.bittorrent_bytes + host.first_piece_bytes + host.fallback_bytes,
        "seconds": seconds(host),
    }


def rollout_json(rollout: rollout_pb2.Rollout) -> dict[str, Any]:
    return {
        "id": rollout.id,
        "image": rollout.image_name,
        "image_digest": rollout.image_digest,
        "selector": rollout.selector,
        "prefetch_only": rollout.prefetch_only,
        "canary": rollout.canary,
        "max_parallel": rollout.max_parallel,
        "max_failures": rollout.max_failures,
        "state": ROLLOUT_STATES.get(rollout.state),
        "reason": rollout.reason or None,
        "create_time": rollout.create_time.ToJsonString(),
        "end_time": rollout.end_time.ToJsonString() if rollout.HasField("end_time") else None,
        "hosts": [host_json(h) for h in rollout.hosts],
    }


def summary_table(rollout: rollout_pb2.Rollout) -> str:
    rows = [["HOST", "RESULT", "TIME", "FROM PEERS", "FROM SERVER", "FALLBACK", "CACHED", "NOTE"]]
    for host in rollout.hosts:
        took = seconds(host)
        rows.append(
            [
                host.agent_name,
                state_name(host),
                "-" if took is None else f"{took:.1f}s",
                human_size(max(host.bittorrent_bytes - host.server_bytes, 0)),
                human_size(host.server_bytes + host.first_piece_bytes),
                human_size(host.fallback_bytes),
                human_size(host.cached_bytes),
                host.error or "",
            ]
        )
    return columns(rows)


def outcome_line(rollout: rollout_pb2.Rollout) -> str:
    state = ROLLOUT_STATES.get(rollout.state, "unknown")
    counts: dict[str, int] = {}
    for host in rollout.hosts:
        counts[state_name(host)] = counts.get(state_name(host), 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    reason = f": {rollout.reason}" if rollout.reason else ""
    return f"Rollout {rollout.id} {state.replace('_', ' ')} ({tally}){reason}"


class View:
    """Receives the rollout's events; shows them as it sees fit."""

    def __init__(self, rollout: rollout_pb2.Rollout) -> None:
        self.rollout = rollout
        self.hosts = {h.agent_name: h for h in rollout.hosts}

    def host(self, host: rollout_pb2.RolloutHost) -> None:
        self.hosts[host.agent_name] = host

    def event(self, event: rollout_pb2.RolloutEvent) -> None:
        kind = event.WhichOneof("change")
        if kind == "snapshot":
            self.rollout = event.snapshot
            self.hosts = {h.agent_name: h for h in event.snapshot.hosts}
        elif kind == "host":
            self.host(event.host)

    def close(self) -> None:
        pass


class LineView(View):
    """Off a terminal: one line on stderr whenever a host changes state."""

    def __init__(self, rollout: rollout_pb2.Rollout) -> None:
        super().__init__(rollout)
        self.states = {name: h.state for name, h in self.hosts.items()}

    def host(self, host: rollout_pb2.RolloutHost) -> None:
        super().host(host)
        if self.states.get(host.agent_name) != host.state:
            self.states[host.agent_name] = host.state
            note = f": {host.error}" if host.error else ""
            click.echo(f"{host.agent_name} {state_name(host)}{note}", err=True)


class JsonView(View):
    """-o json: one JSON object a line on stdout for every event."""

    def event(self, event: rollout_pb2.RolloutEvent) -> None:
        super().event(event)
        kind = event.WhichOneof("change")
        out: dict[str, Any] = {"time": event.event_time.ToJsonString(), "type": kind}
        if kind == "snapshot":
            out["rollout"] = rollout_json(event.snapshot)
        elif kind == "host":
            out["host"] = host_json(event.host)
        elif kind == "state":
            out["state"] = ROLLOUT_STATES.get(event.state)
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


class LiveView(View):
    """On a terminal: a line per host with a bar, redrawn four times a second.

    With many hosts, the finished ones fold into one line; the slow and the failed stay.
    """

    MAX_LINES = 30

    def __init__(self, rollout: rollout_pb2.Rollout) -> None:
        super().__init__(rollout)
        self.started = time.monotonic()
        self.live = Live(self._render(), console=stderr, refresh_per_second=4, transient=False)
        self.live.start()

    def event(self, event: rollout_pb2.RolloutEvent) -> None:
        super().event(event)
        self.live.update(self._render())

    def close(self) -> None:
        self.live.update(self._render())
        self.live.stop()

    def _render(self) -> RenderableType:
        rollout = self.rollout
        hosts = sorted(self.hosts.values(), key=lambda h: h.agent_name)
        total = sum(h.total_bytes for h in hosts) or 1
        done = sum(h.total_bytes if h.state in DONE else h.done_bytes for h in hosts)
        finished = sum(1 for h in hosts if h.state in DONE)
        failed = sum(1 for h in hosts if h.state in BAD)
        rate = sum(h.rate_bytes_per_second for h in hosts)
        header = Table.grid(padding=(0, 1))
        header.add_row(
            Text(f"{rollout.image_name}", style="bold"),
            ProgressBar(total=total, completed=done, width=40),
            Text(
                f"{finished}/{len(hosts)} done"
                + (f", {failed} failed" if failed else "")
                + f"  {human_size(done)}/{human_size(total)}  {human_size(rate)}/s"
                + f"  {time.monotonic() - self.started:.0f}s"
            ),
        )
        table = Table.grid(padding=(0, 1))
        for column in ("host", "state", "bar", "bytes", "rate", "peers", "eta"):
            table.add_column(column, no_wrap=True)
        shown = hosts
        folded = 0
        if len(hosts) > self.MAX_LINES:
            # Finished hosts fold away first; the failed and the slowest stay in view.
            keep = [h for h in hosts if h.state not in DONE]
            keep.sort(key=lambda h: (h.state not in BAD, h.done_bytes / (h.total_bytes or 1)))
            shown = sorted(keep[: self.MAX_LINES], key=lambda h: h.agent_name)
            folded = len(hosts) - len(shown)
        for host in shown:
            table.add_row(*self._host_row(host))
        if folded:
            table.add_row(Text(f"… {folded} more hosts ({finished} succeeded)", style="dim"))
        return Group(header, table)

    def _host_row(self, host: rollout_pb2.RolloutHost) -> list[RenderableType]:
        state = state_name(host)
        total = host.total_bytes or 1
        held = host.total_bytes if host.state in DONE else host.done_bytes
        rate = host.rate_bytes_per_second
        eta = "-"
        if rate and host.state == agent_pb2.TASK_STATE_DOWNLOADING:
            eta = f"{max(total - held, 0) / rate:.0f}s"
        if host.state in BAD:
            note = Text(host.error or state, style=STYLES.get(state, ""))
            return [Text(host.agent_name), Text(state, style=STYLES.get(state, "")), note]
        return [
            Text(host.agent_name),
            Text(state, style=STYLES.get(state, "")),
            ProgressBar(total=total, completed=held, width=30),
            Text(f"{human_size(held)}/{human_size(host.total_bytes)}"),
            Text(f"{human_size(rate)}/s" if rate else ""),
            Text(
                f"{host.peer_count} peer{'s' if host.peer_count != 1 else ''}"
                if host.peer_count and host.state not in DONE
                else ""
            ),
            Text(f"eta {eta}" if eta != "-" else ""),
        ]
