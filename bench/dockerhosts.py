"""Docker engines in the benchmark cluster's hosts, `docker pull` on all of them at once, and
pushing a benchmark image byte for byte to a plain registry (shared by rollout_bench.py and
pull_bench.py).

* `engines_inside`: a dockerd inside each agent host's network namespace (its pulls go over
  that host's shaped link), trusting h0's docker-registry over plain HTTP;
* `pull_everywhere` / `remove_everywhere`: N parallel ``docker pull``, and ``docker rmi`` after;
* `EngineCPU`: the CPU seconds of dockerds and everything under them (their containerd,
  unpigz, ...), for CPU per GB delivered;
* `push_archive`: a ``docker save`` archive's config and layers, uncompressed, byte for byte
  as Docket holds them, into a registry with an OCI manifest (skopeo would gzip the layers,
  and the hosts would then pull other bytes than Docket's). It runs in h0, where the
  registry listens::

      python bench/dockerhosts.py push-archive IMAGE.tar 10.77.0.1:5000 bench/x:1
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (BENCH, ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from cluster import Host  # noqa: E402
from procstat import CLOCK_TICKS  # noqa: E402

if TYPE_CHECKING:
    from tests.support.dockerd import DockerEngine

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
REGISTRY_PORT = 5000  # docker-registry in h0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def engines_inside(
    hosts: Sequence[Host], h0: Host, registry_port: int = REGISTRY_PORT
) -> Iterator[dict[int, DockerEngine]]:
    """A dockerd inside each agent host's namespace, trusting h0's registry over HTTP.

    Its API socket is a unix socket, which a network namespace does not confine: an agent (in
    the host's namespace) and the bench (outside) both reach it."""
    from tests.support.dockerd import DockerEngine

    config = {"insecure-registries": [f"{h0.ip}:{registry_port}"]}
    with contextlib.ExitStack() as stack:
        engines: dict[int, DockerEngine] = {}
        for host in hosts:
            engine = stack.enter_context(
                DockerEngine(netns=host.ns, daemon_config=config, storage_drivers=("overlay2",))
            )
            engines[host.index] = engine
            log(f"dockerd in {host.name}: {engine.host}")
        yield engines


def pull_everywhere(
    engines: Sequence[DockerEngine], refs: Sequence[str], logs: Path, tag: str
) -> float:
    """`docker pull` of refs[i] by engines[i], all at once; seconds until the last is done."""
    return pull_everywhere_timed(engines, refs, logs, tag)[0]


def pull_everywhere_timed(
    engines: Sequence[DockerEngine], refs: Sequence[str], logs: Path, tag: str
) -> tuple[float, list[float]]:
    """`docker pull` of refs[i] by engines[i], all at once: (seconds until the last is done,
    each pull's seconds)."""
    procs = []
    started = time.monotonic()
    for engine, ref in zip(engines, refs, strict=True):
        err = (logs / f"{tag}-{engine.dir.name}.err").open("w")
        procs.append(
            (
                subprocess.Popen(
                    ["docker", "pull", "-q", ref],
                    env=engine.env(),
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                ),
                err,
            )
        )
    finished: dict[int, float] = {}
    while len(finished) < len(procs):
        for i, (proc, _err) in enumerate(procs):
            if i not in finished and proc.poll() is not None:
                finished[i] = time.monotonic() - started
        if time.monotonic() - started > 1800:
            for proc, _err in procs:
                if proc.poll() is None:
                    proc.kill()
            raise TimeoutError("docker pulls did not finish in 30 minutes")
        time.sleep(0.02)
    seconds = time.monotonic() - started
    failed = []
    for proc, err in procs:
        if proc.returncode != 0:
            failed.append(err.name)
        err.close()
    if failed:
        raise RuntimeError(f"docker pull failed; see {', '.join(failed)}")
    return seconds, [finished[i] for i in range(len(procs))]


def remove_everywhere(engines: Sequence[DockerEngine], ref: str) -> None:
    """`docker rmi` of an image on every engine, with its layers: the next pull fetches
    everything again."""
    for engine in engines:
        subprocess.run(["docker", "rmi", "-f", ref], env=engine.env(), capture_output=True)


# -- CPU ----------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tree_cpu_seconds(roots: Sequence[int]) -> float:
    """CPU seconds of `roots` and all their descendants so far: each live process's utime +
    stime, plus cutime + cstime (the children it has already reaped)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        parents[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = sum(int(x) for x in fields[11:15])
    wanted = {pid for pid in roots if pid in ticks}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in wanted and pid not in wanted:
                wanted.add(pid)
                grew = True
    return sum(ticks[pid] for pid in wanted) / CLOCK_TICKS


def engine_pid(engine: DockerEngine) -> int:
    return int((engine.dir / "docker.pid").read_text().strip())


class EngineCPU:
    """CPU seconds the dockerds (and their children) use between `__init__` and `stop()`."""

    def __init__(self, engines: Sequence[DockerEngine]) -> None:
        self.pids = [engine_pid(e) for e in engines]
        self.before = tree_cpu_seconds(self.pids)

    def stop(self) -> float:
        return tree_cpu_seconds(self.pids) - self.before


# -- images into a plain registry -----------------------------------------------------------------


def copy_image(source: str, dest: str, repository: str, tag: str) -> None:
    """Copies an image's manifest and blobs, byte for byte, from docket-server's registry face
    to another registry (run in h0, where both listen). The source is TLS with the admin's
    token, from the environment DocketSide gives docketctl."""
    import requests

    accept = "application/vnd.oci.image.manifest.v1+json"
    docket = requests.Session()
    docket.trust_env = False  # $REQUESTS_CA_BUNDLE would replace the CA below
    docket.verify = os.environ["DOCKET_CA"]
    docket.auth = ("docket", os.environ["DOCKET_TOKEN"])
    got = docket.get(
        f"https://{source}/v2/{repository}/manifests/{tag}", headers={"Accept": accept}, timeout=60
    )
    got.raise_for_status()
    manifest = got.json()
    for blob in [manifest["config"], *manifest["layers"]]:
        body = docket.get(
            f"https://{source}/v2/{repository}/blobs/{blob['digest']}", timeout=600
        ).content
        start = requests.post(f"http://{dest}/v2/{repository}/blobs/uploads/", timeout=60)
        start.raise_for_status()
        location = start.headers["Location"]
        if location.startswith("/"):
            location = f"http://{dest}{location}"
        done = requests.put(location, params={"digest": blob["digest"]}, data=body, timeout=600)
        done.raise_for_status()
    put = requests.put(
        f"http://{dest}/v2/{repository}/manifests/{tag}",
        data=got.content,
        headers={"Content-Type": got.headers["Content-Type"]},
        timeout=60,
    )
    put.raise_for_status()


def _request(
    registry: str,
    method: str,
    path: str,
    body: Any = None,
    length: int | None = None,
    headers: dict[str, str] | None = None,
) -> http.client.HTTPResponse:
    host, _, port = registry.partition(":")
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=600)
    conn.putrequest(method, path)
    for name, value in (headers or {}).items():
        conn.putheader(name, value)
    conn.putheader("Content-Length", str(length or 0))
    conn.endheaders()
    if body is not None:
        while chunk := body.read(1 << 20):
            conn.send(chunk)
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status >= 300:
        raise RuntimeError(f"{method} http://{registry}{path}: HTTP {response.status}")
    return response


def push_archive(archive: Path, registry: str, reference: str) -> None:
    """The archive's config and layers, as they are (uncompressed tars), into `registry`
    under `reference` (name:tag), with an OCI manifest: blobs streamed, never whole in
    memory."""
    import hashlib
    import io

    repository, _, tag = reference.rpartition(":")
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        file = tar.extractfile(members["manifest.json"])
        assert file is not None
        (entry,) = json.load(file)

        def upload(name: str) -> tuple[str, int]:
            member = members[name]
            sha = hashlib.sha256()
            source = tar.extractfile(member)
            assert source is not None
            while chunk := source.read(1 << 20):
                sha.update(chunk)
            digest = "sha256:" + sha.hexdigest()
            started = _request(registry, "POST", f"/v2/{repository}/blobs/uploads/")
            location = started.headers["Location"]
            if location.startswith("http"):
                location = "/" + location.split("/", 3)[3]
            glue = "&" if "?" in location else "?"
            body = tar.extractfile(member)
            _request(registry, "PUT", f"{location}{glue}digest={digest}", body, member.size)
            return digest, member.size

        config = upload(entry["Config"])
        layers = [upload(name) for name in entry["Layers"]]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config[0], "size": config[1]},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": digest, "size": size} for digest, size in layers
            ],
        }
    ).encode()
    _request(
        registry,
        "PUT",
        f"/v2/{repository}/manifests/{tag}",
        io.BytesIO(manifest),
        len(manifest),
        {"Content-Type": OCI_MANIFEST},
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["push-archive"] and len(args) == 4:
        push_archive(Path(args[1]), args[2], args[3])
        return 0
    print(
        "usage: dockerhosts.py push-archive ARCHIVE REGISTRY NAME:TAG  (run where REGISTRY "
        "listens)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
