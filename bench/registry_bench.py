"""The registry HTTP face: how fast a blob comes out, and how a `docker push` compares with the
reference registry (Debian's docker-registry, the CNCF distribution registry), in one run.

docket-server runs as a user gets it: its registry face speaks HTTPS only and wants a token (a
bearer token, or Basic auth with the token as the password). So TLS is included in Docket's
numbers, and not in docker-registry's, which serves plain HTTP as configured here.

Part 1 (loopback): a --size-mib blob of random bytes is uploaded to a docket-server (a chunked
PATCH, then PUT ?digest=; over HTTPS with the admin token) and to a docker-registry; then,
--runs times each, `curl` GETs it to /dev/null (from Docket with --cacert and the token).
Reported: MB/s, the server's CPU seconds (utime + stime from /proc), and curl's. Over plain
HTTP docket-server sends blob bodies with sendfile(2); over TLS the bytes are read and
encrypted in the process (and decrypted in curl). The target is at least 1 GB/s for one stream.

Part 2 (needs root and dockerd): a private Docker engine (tests/support/dockerd.py) holds an
image of --push-mib MiB of random data in one layer; `docker push` sends it, --runs times
alternately, to a fresh docket-server and to a fresh docker-registry (new data dirs, so every
push uploads everything). To Docket it pushes over HTTPS, logged in (`docker login`, before the
clock starts) with the admin token; dockerd does not check the certificate, as it counts
127.0.0.0/8 as an insecure registry, but it speaks TLS. dockerd gzips each layer as it pushes,
so both sides take the same bytes; the table shows the time and each server's CPU.

    .venv/bin/python bench/registry_bench.py                       # 1 GiB blob, 1 GiB push, 3 runs
    .venv/bin/python bench/registry_bench.py --size-mib 256 --skip-push
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (BENCH, ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import requests  # noqa: E402
from resources_bench import cpu_seconds  # noqa: E402

from tests.support.registry import ReferenceRegistry, tool  # noqa: E402
from tests.support.server import ServerProcess  # noqa: E402

MiB = 1024 * 1024
MB = 1e6
TARGET_MB_S = 1000


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Endpoint:
    """One side's registry: its base URL, and how a client trusts it and logs in."""

    url: str
    ca: str | None = None  # a CA file to verify its certificate by (https)
    token: str | None = None  # sent as the password of Basic auth

    @classmethod
    def of(cls, server: ServerProcess) -> Endpoint:
        return cls(server.registry_url, str(server.ca_path), server.admin_token)


@dataclass
class Series:
    """Measurements of one side, run after run."""

    name: str
    url: str = ""
    seconds: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def random_chunks(size: int, digest: Callable[[bytes], object]) -> Iterator[bytes]:
    left = size
    block = os.urandom(4 * MiB)
    counter = 0
    while left > 0:
        # Fresh bytes for every block without paying for os.urandom each time.
        chunk = hashlib.sha256(counter.to_bytes(8, "big")).digest() * 4 + block
        chunk = chunk[: min(len(chunk), left)]
        counter += 1
        digest(chunk)
        left -= len(chunk)
        yield chunk


def upload(endpoint: Endpoint, size: int) -> str:
    """Uploads ``size`` random bytes to repository bench/blob; returns their digest."""
    base_url = endpoint.url
    hasher = hashlib.sha256()
    # verify= on every request: a Session's own is overridden by $REQUESTS_CA_BUNDLE.
    verify: str | bool = endpoint.ca or True
    auth = ("docket", endpoint.token) if endpoint.token is not None else None
    started = requests.post(
        f"{base_url}/v2/bench/blob/blobs/uploads/", verify=verify, auth=auth, timeout=60
    )
    started.raise_for_status()
    location = started.headers["Location"]
    if location.startswith("/"):
        location = base_url + location
    patched = requests.patch(
        location,
        data=random_chunks(size, hasher.update),
        verify=verify,
        auth=auth,
        timeout=600,
    )
    patched.raise_for_status()
    location = patched.headers["Location"]
    if location.startswith("/"):
        location = base_url + location
    digest = "sha256:" + hasher.hexdigest()
    done = requests.put(location, params={"digest": digest}, verify=verify, auth=auth, timeout=600)
    done.raise_for_status()
    return digest


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def curl_get(endpoint: Endpoint, url: str) -> tuple[float, float]:
    """(seconds, curl's CPU seconds) of one GET of ``url`` to /dev/null."""
    args = [tool("curl"), "-sSf", "-o", "/dev/null"]
    if endpoint.ca is not None:
        args += ["--cacert", endpoint.ca]
    # The token on stdin (a curl config), not on the command line.
    config = f'user = "docket:{endpoint.token}"\n' if endpoint.token is not None else ""
    before = children_cpu()
    start = time.monotonic()
    subprocess.run([*args, "-K", "-", url], input=config, text=True, check=True, timeout=600)
    return time.monotonic() - start, children_cpu() - before


def blob_part(size_mib: int, runs: int, tmp: Path) -> tuple[int, list[Series]]:
    size = size_mib * MiB
    docket = ServerProcess(data_dir=tmp / "docket-get").start()
    reference = ReferenceRegistry(tmp / "reference-get")
    reference.start()
    assert docket.proc is not None
    assert reference.proc is not None
    sides = [
        (Series("docket-server"), Endpoint.of(docket), docket.proc.pid),
        (Series("docker-registry"), Endpoint(f"http://{reference.address}"), reference.proc.pid),
    ]
    try:
        for series, endpoint, _pid in sides:
            log(f"uploading {size_mib} MiB to {series.name}")
            digest = upload(endpoint, size)
            series.url = f"{endpoint.url}/v2/bench/blob/blobs/{digest}"
            curl_get(endpoint, series.url)  # into the page cache
        for run in range(runs):
            for series, endpoint, pid in sides:
                before = cpu_seconds(pid)
                seconds, client = curl_get(endpoint, series.url)
                series.seconds.append(seconds)
                series.server_cpu.append(cpu_seconds(pid) - before)
                series.client_cpu.append(client)
                log(f"run {run + 1}: {series.name} {size / MB / seconds:.0f} MB/s")
    finally:
        docket.stop()
        reference.stop()
    return size, [s for s, _, _ in sides]


def blob_table(size: int, rows: Sequence[Series]) -> str:
    lines = [
        "| server | MB/s | seconds | server CPU s | server CPU s / GB | curl CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for s in rows:
        rates = [size / MB / t for t in s.seconds]
        per_gb = [c / (size / 1e9) for c in s.server_cpu]
        lines.append(
            f"| {s.name} | {spread(rates, '{:.0f}')} | {spread(s.seconds)} | "
            f"{spread(s.server_cpu)} | {spread(per_gb)} | {spread(s.client_cpu)} |"
        )
    return "\n".join(lines)


def push_part(push_mib: int, runs: int, tmp: Path) -> tuple[int, list[Series]]:
    from tests.support.dockerd import DockerEngine
    from tests.support.images import make_base_image

    docket_side = Series("docket-server")
    reference_side = Series("docker-registry")
    with DockerEngine() as engine:
        log(f"making a {push_mib} MiB image in the engine")
        make_base_image(engine.client, "bench/push:1", extra_bytes=push_mib * MiB, seed=7)
        size = int(engine.client.images.get("bench/push:1").attrs["Size"])
        # docker's own config (its logins), not the user's.
        env = engine.env() | {"DOCKER_CONFIG": str(tmp / "docker-config")}
        for run in range(runs):
            for side in (docket_side, reference_side):
                data = tmp / f"push-{side.name}-{run}"
                stop: Callable[[], object]
                if side is docket_side:
                    server = ServerProcess(data_dir=data)
                    server.start()
                    assert server.proc is not None
                    address, pid, stop = server.registry, server.proc.pid, server.stop
                    subprocess.run(
                        ["docker", "login", address, "-u", "docket", "--password-stdin"],
                        input=server.admin_token,
                        text=True,
                        env=env,
                        check=True,
                        capture_output=True,
                        timeout=60,
                    )
                else:
                    reference = ReferenceRegistry(data)
                    reference.start()
                    assert reference.proc is not None
                    address, pid, stop = reference.address, reference.proc.pid, reference.stop
                ref = f"{address}/bench/push:{run}"
                try:
                    engine.client.images.get("bench/push:1").tag(ref)
                    before = cpu_seconds(pid)
                    start = time.monotonic()
                    subprocess.run(
                        ["docker", "push", "-q", ref],
                        env=env,
                        check=True,
                        capture_output=True,
                        timeout=1800,
                    )
                    side.seconds.append(time.monotonic() - start)
                    side.server_cpu.append(cpu_seconds(pid) - before)
                    log(f"run {run + 1}: docker push to {side.name}: {side.seconds[-1]:.1f}s")
                finally:
                    engine.client.images.remove(ref)
                    stop()
                    shutil.rmtree(data, ignore_errors=True)
    return size, [docket_side, reference_side]


def push_table(size: int, rows: Sequence[Series]) -> str:
    lines = [
        "| docker push to | seconds | MB/s (uncompressed) | server CPU s |",
        "|---|---|---|---|",
    ]
    for s in rows:
        rates = [size / MB / t for t in s.seconds]
        lines.append(
            f"| {s.name} | {spread(s.seconds)} | {spread(rates, '{:.0f}')} | "
            f"{spread(s.server_cpu)} |"
        )
    docket, reference = rows
    ratio = statistics.median(docket.seconds) / statistics.median(reference.seconds)
    lines.append(f"\nDocket / docker-registry: {ratio:.2f} (medians)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="blob size for part 1")
    parser.add_argument("--push-mib", type=int, default=1024, help="image size for part 2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-get", action="store_true")
    parser.add_argument("--skip-push", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="docket-registry-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_get:
            size, rows = blob_part(args.size_mib, args.runs, tmp)
            print(
                f"\n## One blob GET over loopback ({size / MB:.0f} MB, curl to /dev/null, "
                f"medians of {args.runs}, min-max in brackets)\n"
            )
            print(blob_table(size, rows))
            rate = statistics.median(size / MB / t for t in rows[0].seconds)
            verdict = "met" if rate >= TARGET_MB_S else "NOT met"
            print(f"\nTarget >= {TARGET_MB_S} MB/s for docket-server: {verdict}.")
        if not args.skip_push:
            from tests.support.dockerd import docker_unavailable_reason

            reason = docker_unavailable_reason()
            if reason is not None:
                print(f"\ndocker push skipped: {reason}")
            else:
                size, rows = push_part(args.push_mib, args.runs, tmp)
                print(
                    f"\n## docker push of a {size / MB:.0f} MB image (one layer of random "
                    f"data), medians of {args.runs}\n"
                )
                print(push_table(size, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
