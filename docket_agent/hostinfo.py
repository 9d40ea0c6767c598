"""What an agent tells the server about its host: its identity, Docker engine and disk."""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from docket_common.manifest import Platform, normalize_platform

ID_FILE = "agent-id"
LOCK_FILE = "agent.lock"


class DataDirInUseError(Exception):
    pass


def lock_data_dir(data_dir: Path) -> int:
    """Takes the data dir for this process; returns the lock's fd (held until exit).

    Two agents on one data dir would share an id and a cache: the second one is refused.
    """
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirInUseError(f"another docket-agent is using {data_dir}") from None
    return fd


def load_agent_id(data_dir: Path) -> str:
    """The id this install keeps in its data dir, made on first start.

    The server lets a second stream under an online name in only with the same id: it is how
    an agent that reconnects before the server noticed its old stream die proves it is the
    same install, and not another host configured with the same name.
    """
    path = data_dir / ID_FILE
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = uuid.uuid4().hex
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    tmp.replace(path)
    return value


@dataclass(frozen=True)
class DockerStatus:
    version: str = ""
    error: str = ""
    platform: Platform | None = None  # what the engine runs


def probe_docker(enabled: bool) -> DockerStatus:
    """Whether a Docker engine answers at DOCKER_HOST (blocking: run it in a thread)."""
    if not enabled:
        return DockerStatus(error="disabled with --no-docker")
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=5)
    except DockerException as e:
        return DockerStatus(error=f"no Docker engine: {e}")
    try:
        version = client.version()
        platform = None
        if version.get("Os") and version.get("Arch"):
            platform = normalize_platform(str(version["Os"]), str(version["Arch"]))
        return DockerStatus(version=str(version.get("Version", "")), platform=platform)
    except (DockerException, OSError) as e:
        return DockerStatus(error=f"Docker engine not answering: {e}")
    finally:
        client.close()


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free
