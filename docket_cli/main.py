"""docketctl: the operator's command line for a Docket server.

Data goes to stdout, progress and diagnostics to stderr. Every failure prints one line,
``docketctl: error: …``, and exits non-zero (1; 2 for a misused command).
"""

from __future__ import annotations

import sys

import click

from docket_cli.agents import agents_cmd
from docket_cli.client import DEFAULT_SERVER, ServerError
from docket_cli.command import GlobalOptions
from docket_cli.config import ConfigError
from docket_cli.images import images_cmd, inspect_cmd, rm_cmd
from docket_cli.pull import PullError, pull_cmd
from docket_cli.pulls import pulls_cmd
from docket_cli.push import PushError, push_cmd
from docket_cli.rollout import rollout_cmd, rollouts_group
from docket_cli.security import audit_cmd, contexts_cmd, login_cmd, logout_cmd, tokens_group
from docket_common.archive import ArchiveError
from docket_common.bt import TorrentSessionError
from docket_common.fetch import FetchError
from docket_common.loadable import LoadError
from docket_common.reference import InvalidReferenceError
from docket_common.selector import InvalidSelectorError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--server",
    envvar="DOCKET_SERVER",
    default=None,
    help=f"The Docket server, HOST:PORT. Also from $DOCKET_SERVER; default: the current "
    f"context's (docketctl login), else {DEFAULT_SERVER}.",
)
@click.option(
    "--token",
    envvar="DOCKET_TOKEN",
    default=None,
    help="The token to call with. Also from $DOCKET_TOKEN; default: the context's.",
)
@click.option(
    "--ca",
    envvar="DOCKET_CA",
    type=click.Path(dir_okay=False),
    default=None,
    help="The CA certificate (PEM) to verify the server by. Also from $DOCKET_CA; default: "
    "the context's, else the system's CAs.",
)
@click.option(
    "--context",
    "context_name",
    default=None,
    help="A context saved by `docketctl login` (default: the current one).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Talk plaintext, with no token, to a server running with --insecure (a lab).",
)
@click.version_option(package_name="docket", prog_name="docketctl")
@click.pass_context
def cli(
    ctx: click.Context,
    server: str | None,
    token: str | None,
    ca: str | None,
    context_name: str | None,
    insecure: bool,
) -> None:
    """Push Docker images to a Docket server, manage them, and see the fleet.

    \b
    Image references are Docker's: NAME[:TAG] (TAG defaults to latest) or NAME@sha256:….
    Start with `docketctl login SERVER --token TOKEN --ca ca.pem`.
    """
    ctx.obj = GlobalOptions(server, token, ca, insecure, context_name)


cli.add_command(push_cmd)
cli.add_command(images_cmd)
cli.add_command(inspect_cmd)
cli.add_command(rm_cmd)
cli.add_command(agents_cmd)
cli.add_command(rollout_cmd)
cli.add_command(rollouts_group)
cli.add_command(pull_cmd)
cli.add_command(pulls_cmd)
cli.add_command(login_cmd)
cli.add_command(logout_cmd)
cli.add_command(contexts_cmd)
cli.add_command(tokens_group)
cli.add_command(audit_cmd)


def main() -> None:
    try:
        # Outside standalone mode click returns a command's exit code instead of exiting.
        code = cli.main(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Abort:
        _fail("interrupted", code=130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except ServerError as e:
        _fail(f"{e.message} [{e.reason}]" if e.reason else e.message)
    except (
        ArchiveError,
        InvalidReferenceError,
        InvalidSelectorError,
        PushError,
        PullError,
        FetchError,
        LoadError,
        TorrentSessionError,
        ConfigError,
    ) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    except BrokenPipeError:
        sys.exit(1)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"docketctl: error: {message}", err=True)
    sys.exit(code)
