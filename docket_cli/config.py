"""Where docketctl finds its server: contexts saved by `docketctl login`, as a kubeconfig
keeps clusters, overridden by flags and the environment.

The file is ``$XDG_CONFIG_HOME/docket/config.json`` (``~/.config/docket/config.json``),
mode 0600 because it holds tokens::

    {"current_context": "prod",
     "contexts": {"prod": {"server": "docket.example:7800", "token": "dkt_…",
                           "ca_pem": "-----BEGIN CERTIFICATE-----…", "insecure": false}}}

What a command uses, first found first: ``--server``/``--token``/``--ca``/``--insecure``;
``$DOCKET_SERVER``/``$DOCKET_TOKEN``/``$DOCKET_CA``; the context named by ``--context``, else
the context of the server named (by flag or environment), else the current context; else the
local server, 127.0.0.1:7800.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from docket_common.cli import xdg_dir

DEFAULT_SERVER = "127.0.0.1:7800"


class ConfigError(Exception):
    """The config file or a CA file is unreadable; str() says which and why."""


@dataclass
class Context:
    server: str
    token: str = ""
    ca_pem: str = ""  # empty: the system's roots
    insecure: bool = False


@dataclass
class Config:
    current_context: str = ""
    contexts: dict[str, Context] = field(default_factory=dict)

    def for_server(self, server: str) -> tuple[str, Context] | None:
        for name, context in self.contexts.items():
            if context.server == server:
                return name, context
        return None


def config_path() -> Path:
    return xdg_dir("XDG_CONFIG_HOME", ".config") / "config.json"


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    try:
        raw = json.loads(path.read_text())
        return Config(
            current_context=str(raw.get("current_context", "")),
            contexts={
                str(name): Context(
                    server=str(c["server"]),
                    token=str(c.get("token", "")),
                    ca_pem=str(c.get("ca_pem", "")),
                    insecure=bool(c.get("insecure", False)),
                )
                for name, c in dict(raw.get("contexts", {})).items()
            },
        )
    except FileNotFoundError:
        return Config()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path} is not a docketctl config: {e}") from e


def save_config(config: Config, path: Path | None = None) -> Path:
    path = path or config_path()
    body = {
        "current_context": config.current_context,
        "contexts": {name: asdict(c) for name, c in sorted(config.contexts.items())},
    }
    from docket_common.pki import write_private  # cryptography: only for a write

    write_private(path, (json.dumps(body, indent=2) + "\n").encode())
    return path


@dataclass(frozen=True)
class Target:
    """The server a command talks to, and how."""

    server: str
    token: str | None
    ca_pem: bytes | None  # None: the system's roots
    ca_source: str  # for errors: "the CA in /path", "context prod's CA", "the system"
    insecure: bool


def read_ca(path: str) -> bytes:
    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the CA file {path}: {e.strerror or e}") from e
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError(f"{path} holds no PEM certificate")
    return pem


def resolve(
    server: str | None,
    token: str | None,
    ca: str | None,
    insecure: bool,
    context_name: str | None,
    config: Config | None = None,
) -> Target:
    """What a command uses, from its flags (environment variables already folded in by
    click) and the saved contexts."""
    config = config if config is not None else load_config()
    context: Context | None = None
    name = ""
    if context_name:
        context = config.contexts.get(context_name)
        if context is None:
            known = ", ".join(sorted(config.contexts)) or "none"
            raise ConfigError(f"no context {context_name!r} (known: {known})")
        name = context_name
    elif server:
        found = config.for_server(server)
        if found is not None:
            name, context = found
    elif config.current_context in config.contexts:
        name = config.current_context
        context = config.contexts[name]
    chosen_server = server or (context.server if context else DEFAULT_SERVER)
    ca_pem: bytes | None = None
    ca_source = "the system's CA store"
    if ca:
        ca_pem, ca_source = read_ca(ca), f"the CA in {ca}"
    elif context is not None and context.ca_pem:
        ca_pem, ca_source = context.ca_pem.encode(), f"context {name}'s CA"
    return Target(
        server=chosen_server,
        token=token or (context.token if context else None) or None,
        ca_pem=ca_pem,
        ca_source=ca_source,
        insecure=insecure or (context.insecure if context is not None and not ca else False),
    )
