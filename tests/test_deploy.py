"""The files for running Docket in production (deploy/): the systemd units verified and
scored by systemd's own tools, their users, and the example configuration files read by the
commands the units run."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.support.netns import running_under_ci
from tests.support.server import BIN

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = ["docket-server.service", "docket-agent.service"]
PREFIX = "/opt/docket/bin"  # where the units expect the venv (README: Running in production)
# systemd-analyze security's exposure, 0 (locked down) to 10 (unprotected), times ten.
MAX_EXPOSURE = {"docket-server.service": 20, "docket-agent.service": 20}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if running_under_ci():
            pytest.fail(f"CI needs {name} (Debian's systemd)", pytrace=False)
        pytest.skip(f"no {name}")
    return path


def _here(unit: str, tmp_path: Path) -> Path:
    """The unit with its commands in this checkout's venv instead of /opt/docket (verify
    checks that each command exists)."""
    text = (DEPLOY / "systemd" / unit).read_text()
    assert PREFIX in text
    copy = tmp_path / unit
    copy.write_text(text.replace(PREFIX, str(BIN)))
    return copy


def _directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_verifies_the_unit(unit: str, tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", str(_here(unit, tmp_path))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings either


@pytest.mark.parametrize("unit", UNITS)
def test_the_unit_is_hardened(unit: str, tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    result = subprocess.run(
        [
            analyze,
            "security",
            "--offline=true",
            f"--threshold={MAX_EXPOSURE[unit]}",
            str(_here(unit, tmp_path)),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert level is not None, result.stdout
    assert float(level.group(1)) * 10 <= MAX_EXPOSURE[unit]


def test_the_users_the_units_run_as_are_made_by_sysusers(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    result = subprocess.run(
        [sysusers, "--dry-run", f"--root={tmp_path}", str(DEPLOY / "systemd" / "docket.sysusers")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    made = result.stdout + result.stderr
    for unit in UNITS:
        [user] = _directives(unit)["User"]
        [group] = _directives(unit)["Group"]
        assert f"Creating user '{user}'" in made
        assert f"Creating group '{group}'" in made
    assert "Creating group 'docker'" in made  # for the agent's SupplementaryGroups


@pytest.mark.parametrize(("unit", "example"), [(UNITS[0], "server.toml"), (UNITS[1], "agent.toml")])
def test_the_unit_runs_its_command_with_the_example_config(
    unit: str, example: str, tmp_path: Path
) -> None:
    d = _directives(unit)
    [exec_start] = d["ExecStart"]
    argv = shlex.split(exec_start)
    config_at = argv.index("--config") + 1
    assert argv[config_at] == f"/etc/{d['ConfigurationDirectory'][0]}/{example}"
    argv[0] = argv[0].replace(PREFIX, str(BIN))
    argv[config_at] = str(DEPLOY / "config" / example)
    result = subprocess.run([*argv, "--print-config"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    # The data dir the example names is the unit's state directory.
    assert printed["data-dir"] == f"/var/lib/{d['StateDirectory'][0]}"
    [reload] = d["ExecReload"]
    assert reload == "/bin/kill -HUP $MAINPID"  # SIGHUP re-reads the config
