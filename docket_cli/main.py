"""docketctl: the operator's command line for a Docket server.

Data goes to stdout, progress and diagnostics to stderr. Every failure prints one line,
``docketctl: error: …``, and exits non-zero (1; 2 for a misused command).
"""

from __future__ import annotations

import importlib
import sys

import click

from docket_cli.command import GlobalOptions
from docket_cli.config import DEFAULT_SERVER, ConfigError

# Each command is imported when it runs (or for --help), not at every start: importing them
# all (libtorrent, the archive and engine code, rich's progress bars) cost about a quarter of
# a second of every `docketctl rollout`.
COMMANDS = {
    "push": "docket_cli.push:push_cmd",
    "images": "docket_cli.images:images_cmd",
    "inspect": "docket_cli.images:inspect_cmd",
    "rm": "docket_cli.images:rm_cmd",
    "agents": "docket_cli.agents:agents_cmd",
    "rollout": "docket_cli.rollout:rollout_cmd",
    "rollouts": "docket_cli.rollout:rollouts_group",
    "pull": "docket_cli.pull:pull_cmd",
    "pulls": "docket_cli.pulls:pulls_cmd",
    "login": "docket_cli.security:login_cmd",
    "logout": "docket_cli.security:logout_cmd",
    "contexts": "docket_cli.security:contexts_cmd",
    "tokens": "docket_cli.security:tokens_group",
    "audit": "docket_cli.security:audit_cmd",
    "gc": "docket_cli.gc:gc_cmd",
}

# Errors that are the user's to act on: one line, exit 1. By module, so that a module not
# imported (its command did not run) is not imported only to be told so.
USER_ERRORS = {
    "docket_cli.client": ("ServerError",),
    "docket_cli.push": ("PushError",),
    "docket_cli.pull": ("PullError",),
    "docket_common.archive": ("ArchiveError",),
    "docket_common.bt": ("TorrentSessionError",),
    "docket_common.fetch": ("FetchError",),
    "docket_common.loadable": ("LoadError",),
    "docket_common.reference": ("InvalidReferenceError",),
    "docket_common.selector": ("InvalidSelectorError",),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command


def _user_error(error: BaseException) -> str | None:
    """The one line to print for an error the user can act on; None for anything else."""
    for module_name, names in USER_ERRORS.items():
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for name in names:
            if isinstance(error, getattr(module, name)):
                message = getattr(error, "message", None)
                reason = getattr(error, "reason", None)
                if name == "ServerError" and isinstance(message, str):
                    return f"{message} [{reason}]" if reason else message
                return str(error)
    return None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    except ConfigError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as e:
        message = _user_error(e)
        if message is None:
            raise
        _fail(message)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"docketctl: error: {message}", err=True)
    sys.exit(code)
