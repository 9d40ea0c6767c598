"""The README's first command: a local Docket server (TLS and tokens, as it always starts),
`docketctl login`, sample images pushed with live progress, a join token and three agents
enrolled with it in two groups, a live rollout, and a `docker pull` through an agent.

Starts a private Docker engine (nothing system-wide), makes sample images in it, starts
docket-server and the agents under .demo/, and runs docketctl as a user would (its contexts
in .demo/config). On a terminal it then keeps them up until Ctrl-C and prints the environment
to use them from another shell.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.agents import AgentProcess, wait_for_states  # noqa: E402 - after the path
from tests.support.dockerd import DockerEngine  # noqa: E402
from tests.support.images import build_derived_image, make_base_image  # noqa: E402
from tests.support.server import BIN, ServerProcess, free_port  # noqa: E402


def port_or_free(port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def run(args: list[str], env: dict[str, str]) -> None:
    print(f"$ {shlex.join(args)}", flush=True)
    program = str(BIN / "docketctl") if args[0] == "docketctl" else args[0]
    subprocess.run([program, *args[1:]], env=env, check=True)


def run_out(args: list[str], env: dict[str, str]) -> str:
    """Runs docketctl, shows the command, and returns what it printed (a token: not shown)."""
    print(f"$ {shlex.join(args)}", flush=True)
    result = subprocess.run(
        [str(BIN / "docketctl"), *args[1:]], env=env, check=True, capture_output=True, text=True
    )
    print(result.stderr, end="", flush=True)
    return result.stdout.strip()


def main() -> None:
    demo_dir = ROOT / ".demo"
    shutil.rmtree(demo_dir, ignore_errors=True)  # every run starts from nothing
    demo_dir.mkdir()
    step("Starting a private Docker engine and making sample images")
    with DockerEngine() as engine:
        make_base_image(engine.client, "sample/base:1", extra_bytes=64 * 1024 * 1024, seed=1)
        build_derived_image(engine.client, "sample/base:1", "sample/web:1", [8 << 20, 1 << 20])
        build_derived_image(engine.client, "sample/base:1", "sample/worker:1", [4 << 20])
        print("sample/web:1 and sample/worker:1 share a 64 MiB base layer")

        step("Starting docket-server")
        # The registry face on its usual port when that is free, as the README's commands use.
        server = ServerProcess(data_dir=demo_dir / "server", registry_port=port_or_free(5000))
        server.start()
        print(
            f"gRPC API on {server.address}, registry (docker push/pull) on {server.registry}, "
            f"seeding on 127.0.0.1:{server.bt_port}"
        )
        print(f"data in {server.data_dir}, log in {server.log_path}")
        token_file = server.data_dir / "admin.token"
        print(f"TLS on: the fleet CA is {server.ca_path}; the first admin token is in {token_file}")
        config = demo_dir / "config"
        env = {k: v for k, v in engine.env().items() if not k.startswith("DOCKET_")}
        env["XDG_CONFIG_HOME"] = str(config)
        # Each agent host gets a Docker engine of its own, as real hosts have.
        hosts = (("web1", "web"), ("web2", "web"), ("db1", "db"))
        engines = [DockerEngine().start() for _ in hosts]
        agents: list[AgentProcess] = []
        try:
            step("Logging in: docketctl keeps the server, its CA and the token as a context")
            run(
                [
                    "docketctl",
                    "login",
                    server.address,
                    "--token",
                    server.admin_token,
                    "--ca",
                    str(server.ca_path),
                    "--name",
                    "demo",
                ],
                env,
            )
            step("Pushing sample/web:1 from the engine")
            run(["docketctl", "push", "sample/web:1"], env)
            step("Pushing sample/worker:1: the shared base is not uploaded again")
            run(["docketctl", "push", "sample/worker:1"], env)
            step("What the server holds")
            run(["docketctl", "images"], env)
            run(["docketctl", "inspect", "sample/worker:1"], env)
            step("A join token for the hosts: enrolls up to 3, into groups web and db only")
            join = run_out(
                [
                    "docketctl",
                    "tokens",
                    "create",
                    "--role",
                    "agent",
                    "--max-uses",
                    "3",
                    "--group",
                    "web",
                    "--group",
                    "db",
                    "--description",
                    "demo hosts",
                ],
                env,
            )
            step(
                "Starting three agents in two groups (web: web1, web2; db: db1): each makes "
                "its key, enrolls with the join token and then talks mutual TLS"
            )
            print(
                f"$ docket-agent --server {server.address} --join-token … --ca {server.ca_path} …"
            )
            agents += [
                AgentProcess(
                    server=server.address,
                    data_dir=demo_dir / name,
                    name=name,
                    groups=[group],
                    labels={"env": "demo"},
                    docker_host=host_engine.host,
                    registry_port=port_or_free(5001 + i),
                    extra_args=["--join-token", join, "--ca", str(server.ca_path)],
                )
                for i, ((name, group), host_engine) in enumerate(zip(hosts, engines, strict=True))
            ]
            for agent in agents:
                agent.start()
            wait_for_states(server, {a.name: "online" for a in agents})
            run(["docketctl", "agents"], env)
            run(["docketctl", "tokens", "list"], env)
            run(["docketctl", "agents", "--hosts", "web"], env)
            step(
                "Rolling sample/web:1 out to group web: each piece once from the server, "
                "the rest between the hosts"
            )
            run(["docketctl", "rollout", "sample/web:1", "--hosts", "web"], env)
            step("web1's own Docker engine now has the image")
            print(engines[0].client.images.get("sample/web:1").tags)
            step(
                f"db1's dockerd pulls sample/worker:1 through its agent ({agents[2].registry}): "
                "the server records the pull"
            )
            run(["docker", "pull", f"{agents[2].registry}/sample/worker:1"], engines[2].env())
            run(["docketctl", "pulls"], env)
            step("Who changed what: the audit log")
            run(["docketctl", "audit", "--limit", "8"], env)
            if sys.stdin.isatty():
                step("The server stays up until Ctrl-C. From another shell:")
                print(f"  export XDG_CONFIG_HOME={config} DOCKER_HOST={engine.host}")
                print(f"  export PATH={BIN}:$PATH")
                print(f"  docker login {server.registry} -u docket   # password: {token_file}")
                print("  docketctl images; docketctl agents --hosts db; docketctl rm sample/web:1")
                for agent in agents:
                    print(f"  # {agent.name}'s registry face (for docker pull): {agent.registry}")
                print(f"  docker tag sample/base:1 {server.registry}/mine:1")
                print(
                    f"  docker push {server.registry}/mine:1; docketctl rollout mine:1 --hosts db"
                )
                try:
                    server.proc.wait() if server.proc else None
                except KeyboardInterrupt:
                    print()
        finally:
            step("Stopping")
            for agent in agents:
                agent.stop()
            server.stop()
            for host_engine in engines:
                host_engine.stop()


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
