"""`docketctl login`, `logout`, `contexts`, `tokens` and `audit`: who docketctl is to the
server, and who did what."""

from __future__ import annotations

import asyncio
import ssl
import sys
from datetime import UTC, datetime
from typing import Any

import click
import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from docket_cli.client import Connection, server_error
from docket_cli.command import GlobalOptions, output_option, with_connection
from docket_cli.config import (
    ConfigError,
    Context,
    Target,
    config_path,
    load_config,
    read_ca,
    save_config,
)
from docket_cli.render import ago, columns, print_json, ts_iso
from docket_common.cli import duration, host_port
from docket_common.pb import audit_service_pb2 as audit_pb
from docket_common.pb import image_service_pb2 as image_pb
from docket_common.pb import token_service_pb2 as pb
from docket_common.pki import CertificateError, cert_pem
from docket_common.tls_client import fetch_chain, pick_ca

ROLES = {
    "admin": pb.ROLE_ADMIN,
    "publisher": pb.ROLE_PUBLISHER,
    "operator": pb.ROLE_OPERATOR,
    "viewer": pb.ROLE_VIEWER,
    "agent": pb.ROLE_AGENT,
}
ROLE_NAMES = {v: k for k, v in ROLES.items()}
ROLE_HELP = (
    "admin: everything, tokens included; publisher: push and delete images; operator: "
    "rollouts, pulls and agents; viewer: read only; agent: a join token, for enrolling hosts "
    "(docket-agent --join-token) and nothing else."
)


# login, logout, contexts


@click.command("login")
@click.argument("server", callback=host_port)
@click.option("--token", "login_token", default=None, help="The token (default: asked for).")
@click.option("--token-stdin", is_flag=True, help="Read the token from stdin.")
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="The server's CA certificate (PEM): <data-dir>/ca.pem on the server.",
)
@click.option(
    "--ca-hash",
    default=None,
    metavar="sha256:HEX",
    help="Trust the CA in the server's chain with this hash (the server logs it at start, "
    "as ca_hash); instead of --ca.",
)
@click.option(
    "--name",
    "context_name",
    default=None,
    help="The context's name (default: SERVER).",
)
@click.pass_context
def login_cmd(
    ctx: click.Context,
    server: str,
    login_token: str | None,
    token_stdin: bool,
    ca_file: str | None,
    ca_hash: str | None,
    context_name: str | None,
) -> None:
    """Check a token against SERVER and save it, with the server's CA, as a context (the
    current one) in ~/.config/docket/config.json, as kubectl keeps a kubeconfig.

    Without --ca or --ca-hash the system's CAs must trust the server (a certificate from a
    public CA); a server they do not trust is refused, with the hash of the CA it presented.
    """
    options: GlobalOptions = ctx.find_root().obj
    if ca_file and ca_hash:
        raise click.UsageError("--ca and --ca-hash are two ways to say the same: give one")
    if options.insecure and (ca_file or ca_hash):
        raise click.UsageError("--insecure turns TLS off: it takes no CA")
    token = login_token or options.token
    if token_stdin:
        token = sys.stdin.readline().strip()
    elif not token and not options.insecure:
        token = click.prompt("Token", hide_input=True).strip()
    ca_pem: bytes | None = None
    ca_source = "the system's CA store"
    try:
        if ca_file:
            ca_pem, ca_source = read_ca(ca_file), f"the CA in {ca_file}"
        elif ca_hash:
            ca_pem = cert_pem(pick_ca(_chain(server), ca_hash, server))
            ca_source = f"the CA with hash {ca_hash}"
    except CertificateError as e:
        raise ConfigError(str(e)) from None
    target = Target(server, token or None, ca_pem, ca_source, options.insecure)
    asyncio.run(_check_login(target))
    name = context_name or server
    config = load_config()
    config.contexts[name] = Context(
        server=server,
        token=token or "",
        ca_pem=ca_pem.decode() if ca_pem else "",
        insecure=options.insecure,
    )
    config.current_context = name
    path = save_config(config)
    who = f"token {token.split('_')[1]}" if token and token.count("_") >= 2 else "a token"
    click.echo(f"Logged in to {server} with {who}: context {name!r} in {path}")


def _chain(server: str) -> list[Any]:
    try:
        return fetch_chain(server)
    except ssl.SSLError as e:  # a plaintext server
        raise ConfigError(
            f"the server at {server} does not speak TLS ({e.reason}): is it running with "
            "--insecure?"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot reach {server}: {e}") from None


async def _check_login(target: Target) -> None:
    """One read with the token: the server answers, the TLS checks out, the token works."""
    async with Connection(target) as conn:
        try:
            await conn.images.ListImages(
                image_pb.ListImagesRequest(page_size=1), metadata=conn.metadata, timeout=15
            )
        except grpc.aio.AioRpcError as e:
            err = server_error(e, target)
            if err.code == grpc.StatusCode.PERMISSION_DENIED:
                err.message = (
                    "this token may not read from the server (a join token?): docketctl needs "
                    f"an admin, publisher, operator or viewer token ({err.message})"
                )
            raise err from e


@click.command("logout")
@click.argument("name", required=False)
def logout_cmd(name: str | None) -> None:
    """Forget a context (default: the current one) and its token."""
    config = load_config()
    name = name or config.current_context
    if not name or name not in config.contexts:
        raise ConfigError(f"no context {name!r} to log out of" if name else "not logged in")
    del config.contexts[name]
    if config.current_context == name:
        config.current_context = next(iter(sorted(config.contexts)), "")
    save_config(config)
    click.echo(f"Logged out of {name}")


@click.command("contexts")
@click.option("--use", "use", default=None, metavar="NAME", help="Make NAME the current context.")
def contexts_cmd(use: str | None) -> None:
    """List the saved contexts (* marks the current one), or switch with --use."""
    config = load_config()
    if use is not None:
        if use not in config.contexts:
            raise ConfigError(f"no context {use!r}")
        config.current_context = use
        save_config(config)
        click.echo(f"Switched to context {use!r}")
        return
    rows = [["CURRENT", "NAME", "SERVER", "TLS"]]
    for name, c in sorted(config.contexts.items()):
        tls = "off (--insecure)" if c.insecure else ("own CA" if c.ca_pem else "system CAs")
        rows.append(["*" if name == config.current_context else "", name, c.server, tls])
    click.echo(columns(rows) if len(rows) > 1 else f"No contexts in {config_path()}")


# tokens


def token_json(token: pb.Token) -> dict[str, Any]:
    return {
        "id": token.id,
        "role": ROLE_NAMES.get(token.role, "unknown"),
        "description": token.description,
        "create_time": ts_iso(token.create_time),
        "expire_time": ts_iso(token.expire_time) if token.HasField("expire_time") else None,
        "max_uses": token.max_uses,
        "uses": token.uses,
        "groups": list(token.groups),
        "labels": list(token.labels),
        "revoked": token.revoked,
        "creator": token.creator,
    }


def _state(token: pb.Token) -> str:
    if token.revoked:
        return "revoked"
    if token.HasField("expire_time") and token.expire_time.ToDatetime(tzinfo=UTC) <= datetime.now(
        UTC
    ):
        return "expired"
    if token.max_uses and token.uses >= token.max_uses:
        return "used up"
    return "active"


@click.group("tokens")
def tokens_group() -> None:
    """Make, list and revoke tokens (admins only)."""


@tokens_group.command("create", help=f"Make a token and print it, once.\n\n{ROLE_HELP}")
@click.option("--role", type=click.Choice(list(ROLES)), required=True)
@click.option(
    "--ttl",
    default=None,
    callback=duration,
    help="How long it works (90m, 12h, 30d; default: for ever; join tokens 24h).",
)
@click.option("--description", default="", help="What it is for.")
@click.option(
    "--max-uses",
    type=click.IntRange(min=0),
    default=0,
    show_default="no limit",
    help="Join tokens: how many hosts may enroll with it.",
)
@click.option(
    "--group",
    "groups",
    multiple=True,
    help="Join tokens: a group enrolled hosts may claim (repeatable); none: any.",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    help="Join tokens: a KEY=VALUE label enrolled hosts may claim (repeatable); none: any.",
)
@output_option
@with_connection
async def tokens_create_cmd(
    conn: Connection,
    role: str,
    ttl: Any,
    description: str,
    max_uses: int,
    groups: tuple[str, ...],
    labels: tuple[str, ...],
    output: str,
) -> None:
    request = pb.CreateTokenRequest(
        role=ROLES[role],
        description=description,
        max_uses=max_uses,
        groups=list(groups),
        labels=list(labels),
    )
    if ttl is not None:
        request.ttl.CopyFrom(_duration(ttl.total_seconds()))
    response = await conn.tokens.CreateToken(request, metadata=conn.metadata)
    if output == "json":
        print_json({"token": response.token, **token_json(response.info)})
        return
    click.echo(response.token)
    expires = (
        f"expires {ts_iso(response.info.expire_time)}"
        if response.info.HasField("expire_time")
        else "does not expire"
    )
    click.echo(
        f"token {response.info.id} ({role}) {expires}; it is shown once: keep it now", err=True
    )


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


@tokens_group.command("list")
@output_option
@with_connection
async def tokens_list_cmd(conn: Connection, output: str) -> None:
    """List the tokens (never their secrets), newest first."""
    tokens = (await conn.tokens.ListTokens(pb.ListTokensRequest(), metadata=conn.metadata)).tokens
    if output == "json":
        print_json([token_json(t) for t in tokens])
        return
    rows = [["ID", "ROLE", "STATE", "CREATED", "EXPIRES", "USES", "PINS", "DESCRIPTION"]]
    for t in tokens:
        pins = ",".join([*t.groups, *t.labels]) or "-"
        uses = f"{t.uses}/{t.max_uses}" if t.max_uses else str(t.uses)
        expires = ts_iso(t.expire_time) if t.HasField("expire_time") else "never"
        rows.append(
            [
                t.id,
                ROLE_NAMES.get(t.role, "?"),
                _state(t),
                ago(t.create_time),
                expires or "never",
                uses,
                pins,
                t.description or "-",
            ]
        )
    click.echo(columns(rows))


@tokens_group.command("revoke")
@click.argument("token_ids", nargs=-1, required=True, metavar="ID...")
@with_connection
async def tokens_revoke_cmd(conn: Connection, token_ids: tuple[str, ...]) -> None:
    """Revoke tokens: calls with them fail from now on."""
    for token_id in token_ids:
        await conn.tokens.RevokeToken(pb.RevokeTokenRequest(id=token_id), metadata=conn.metadata)
        click.echo(f"Revoked token {token_id}")


# audit


def audit_json(record: audit_pb.AuditRecord) -> dict[str, Any]:
    return {
        "time": ts_iso(record.record_time),
        "actor": record.actor,
        "action": record.action,
        "target": record.target,
        "outcome": record.outcome,
        "peer": record.peer,
    }


@click.command("audit")
@click.option(
    "--since",
    default=None,
    callback=duration,
    help="Only records this recent (10m, 24h, 7d).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="The most records to show.",
)
@output_option
@with_connection
async def audit_cmd(conn: Connection, since: Any, limit: int, output: str) -> None:
    """Show the audit log, newest first: every call that changed something (or was refused),
    who made it and how it ended (admins only)."""
    request = audit_pb.ListAuditRecordsRequest(page_size=min(limit, 1000))
    if since is not None:
        start = Timestamp()
        start.FromDatetime(datetime.now(UTC) - since)
        request.since_time.CopyFrom(start)
    records: list[audit_pb.AuditRecord] = []
    while len(records) < limit:
        page = await conn.audit.ListAuditRecords(request, metadata=conn.metadata)
        records.extend(page.records)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    records = records[:limit]
    if output == "json":
        print_json([audit_json(r) for r in records])
        return
    rows = [["TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "PEER"]]
    for r in records:
        rows.append(
            [
                ts_iso(r.record_time) or "-",
                r.actor,
                r.action.removeprefix("/docket.v1."),
                r.target or "-",
                r.outcome,
                r.peer or "-",
            ]
        )
    click.echo(columns(rows))
