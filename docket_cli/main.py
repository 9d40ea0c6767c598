"""docketctl: the operator's command line for a Docket server.

Data goes to stdout, progress and diagnostics to stderr. Every failure prints one line,
``docketctl: error: …``, and exits non-zero (1; 2 for a misused command).
"""

from __future__ import annotations

import sys

import click

from docket_cli.agents import agents_cmd
from docket_cli.client import DEFAULT_SERVER, ServerError
from docket_cli.images import images_cmd, inspect_cmd, rm_cmd
from docket_cli.pull import PullError, pull_cmd
from docket_cli.pulls import pulls_cmd
from docket_cli.push import PushError, push_cmd
from docket_cli.rollout import rollout_cmd, rollouts_group
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
    default=DEFAULT_SERVER,
    show_default=True,
    help="The Docket server, HOST:PORT. Also from $DOCKET_SERVER.",
)
@click.option(
    "--token",
    envvar="DOCKET_TOKEN",
    default=None,
    help="Bearer token, when the server requires one. Also from $DOCKET_TOKEN.",
)
@click.version_option(package_name="docket", prog_name="docketctl")
@click.pass_context
def cli(ctx: click.Context, server: str, token: str | None) -> None:
    """Push Docker images to a Docket server, manage them, and see the fleet.

    \b
    Image references are Docker's: NAME[:TAG] (TAG defaults to latest) or NAME@sha256:….
    """
    ctx.obj = (server, token)


cli.add_command(push_cmd)
cli.add_command(images_cmd)
cli.add_command(inspect_cmd)
cli.add_command(rm_cmd)
cli.add_command(agents_cmd)
cli.add_command(rollout_cmd)
cli.add_command(rollouts_group)
cli.add_command(pull_cmd)
cli.add_command(pulls_cmd)


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
    ) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    except BrokenPipeError:
        sys.exit(1)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"docketctl: error: {message}", err=True)
    sys.exit(code)
