"""How a rollout is shown: a live view on a terminal, a line per state change otherwise,
one JSON object per event with -o json; and the summary at the end. No RPCs here."""

from __future__ import annotations

import heapq
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
WAITING = {
    agent_pb2.TASK_STATE_UNSPECIFIED,
    agent_pb2.TASK_STATE_QUEUED,
    agent_pb2.TASK_STATE_PENDING,
}
FLOW = [  # the states in the order a host goes through them
    agent_pb2.TASK_STATE_QUEUED,
    agent_pb2.TASK_STATE_PENDING,
    agent_pb2.TASK_STATE_ACCEPTED,
    agent_pb2.TASK_STATE_DOWNLOADING,
    agent_pb2.TASK_STATE_VERIFYING,
    agent_pb2.TASK_STATE_LOADING,
    agent_pb2.TASK_STATE_SUCCEEDED,
    agent_pb2.TASK_STATE_FAILED,
    agent_pb2.TASK_STATE_CANCELLED,
    agent_pb2.TASK_STATE_UNSPECIFIED,
]
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
    """On a terminal: an overall bar, a line of counts by state, then a line per host.

    As many hosts as fit the terminal: all of them when they fit; otherwise the failed, then
    the active ones, slowest first, and one line for the rest. The totals are kept as events
    arrive and the screen is redrawn at most four times a second, so following 1000 hosts
    costs little more than following ten.
    """

    REFRESH_SECONDS = 0.25
    RESERVED_LINES = 5  # the lines above the hosts, the fold line, and the prompt

    def __init__(self, rollout: rollout_pb2.Rollout) -> None:
        self.started = time.monotonic()
        self._drawn = 0.0
        self._counts: dict[int, int] = {}
        self._done = 0
        self._total = 0
        self._rate = 0
        super().__init__(rollout)
        self._recount()
        self.live = Live(self._render(), console=stderr, auto_refresh=False, transient=False)
        self.live.start(refresh=True)

    # Bookkeeping: totals change by each host's difference, not by a sum over all hosts.

    def _recount(self) -> None:
        self._counts, self._done, self._total, self._rate = {}, 0, 0, 0
        for host in self.hosts.values():
            self._add(host, 1)

    def _add(self, host: rollout_pb2.RolloutHost, sign: int) -> None:
        self._counts[host.state] = self._counts.get(host.state, 0) + sign
        self._done += sign * (host.total_bytes if host.state in DONE else host.done_bytes)
        self._total += sign * host.total_bytes
        self._rate += sign * host.rate_bytes_per_second

    def host(self, host: rollout_pb2.RolloutHost) -> None:
        old = self.hosts.get(host.agent_name)
        if old is not None:
            self._add(old, -1)
        super().host(host)
        self._add(host, 1)

    def event(self, event: rollout_pb2.RolloutEvent) -> None:
        super().event(event)
        if event.WhichOneof("change") == "snapshot":
            self._recount()
        now = time.monotonic()
        if now - self._drawn >= self.REFRESH_SECONDS:
            self._drawn = now
            self.live.update(self._render(), refresh=True)

    def close(self) -> None:
        self.live.update(self._render(), refresh=True)
        self.live.stop()

    # Drawing

    def _room(self) -> int:
        return max(stderr.size.height - self.RESERVED_LINES, 5)

    def shown(self) -> tuple[list[rollout_pb2.RolloutHost], int]:
        """The hosts to draw (by name) and how many are folded into one line."""
        hosts = self.hosts.values()
        room = self._room()
        if len(self.hosts) <= room:
            return sorted(hosts, key=lambda h: h.agent_name), 0
        room -= 1  # the fold line
        failed = [h for h in hosts if h.state in BAD]
        active = [h for h in hosts if h.state not in DONE and h.state not in BAD]
        slowest = heapq.nsmallest(
            max(room - len(failed), 0),
            active,
            key=lambda h: (h.state in WAITING, h.done_bytes / (h.total_bytes or 1)),
        )
        shown = sorted(failed, key=lambda h: h.agent_name)[:room]
        shown += sorted(slowest, key=lambda h: h.agent_name)
        return shown, len(self.hosts) - len(shown)

    def _render(self) -> RenderableType:
        rollout = self.rollout
        count = len(self.hosts)
        finished = self._counts.get(agent_pb2.TASK_STATE_SUCCEEDED, 0)
        failed = sum(self._counts.get(s, 0) for s in BAD)
        header = Table.grid(padding=(0, 1))
        header.add_row(
            Text(f"{rollout.image_name}", style="bold"),
            ProgressBar(total=self._total or 1, completed=self._done, width=40),
            Text(
                f"{finished}/{count} done"
                + (f", {failed} failed" if failed else "")
                + f"  {human_size(self._done)}/{human_size(self._total)}"
                + f"  {human_size(self._rate)}/s"
                + f"  {time.monotonic() - self.started:.0f}s"
            ),
        )
        tally = Text("  ".join(f"{n} {s}" for s, n in self.tally()), style="dim")
        table = Table.grid(padding=(0, 1))
        for column in ("host", "state", "bar", "bytes", "rate", "peers", "eta"):
            table.add_column(column, no_wrap=True)
        shown, folded = self.shown()
        for host in shown:
            table.add_row(*self._host_row(host))
        if folded:
            table.add_row(Text(f"… {folded} more hosts ({finished} succeeded)", style="dim"))
        return Group(header, tally, table) if count > 1 else Group(header, table)

    def tally(self) -> list[tuple[str, int]]:
        """Hosts by state, in the order a task goes through them."""
        return [(TASK_STATES[s], self._counts[s]) for s in FLOW if self._counts.get(s)]

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
