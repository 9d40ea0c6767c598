"""The agent's registry face: the pull half of the OCI Distribution API on the host, so that
dockerd, containerd and Kubernetes pull images through the swarm.

- **Manifests** come from the server (ImageService.GetManifest) and are kept on disk by
  digest (``manifests/<repository>/<hex>``): a manifest asked for by digest is fetched once.
  A tag is resolved at the server again after TAG_SECONDS, so a tag moved there is seen within
  that; while the server cannot be reached, the last resolution serves. A name under
  ``library/`` (what dockerd asks a registry mirror for Docker Hub's official images) is also
  looked for without that prefix.
- **Blobs** in the agent's cache are sent from disk (sendfile, ranges). A blob not in the cache
  is pulled through the agent's one libtorrent session, as an order the server makes for it
  (AgentService.StartPull: the same first pieces and peers as a rollout's), and streamed to
  the client while its pieces arrive, in order (piece deadlines ask for the next ones first).
  Only pieces libtorrent has checked are sent; for a whole blob, its sha256 is computed on
  the way and its last piece is sent only when it matches: on a mismatch the connection is
  cut (the client retries) and the blob dropped. Requests for one blob share its download; a
  client that goes away does not stop it, and what was fetched stays for the next try.
- An image manifest asked for with GET starts the pull of the image's blobs at once, so its
  layers are on their way before the runtime asks for them.
- Pushes are refused (405 UNSUPPORTED): images are pushed to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import grpc
import structlog
from aiohttp import web

from docket_agent.cache import BlobCache
from docket_agent.orders import OrderManager, OrderRunner
from docket_common.digest import is_digest, sha256_digest
from docket_common.errors import error_info
from docket_common.fetch import BlobDownload, BlobFetcher, DigestMismatchError, FetchError
from docket_common.manifest import IMAGE_CONFIG_TYPES, ManifestError, parse_manifest
from docket_common.oci_http import (
    API_VERSION,
    Code,
    HttpError,
    accepted_types,
    error_response,
    etag_matches,
    index_fallback,
    range_of,
    send_file,
    serves,
    start_body,
)
from docket_common.pb import agent_pb2, agent_service_pb2, agent_service_pb2_grpc
from docket_common.pb import image_service_pb2 as image_pb
from docket_common.pb import image_service_pb2_grpc as image_grpc
from docket_common.reference import is_repository

log = structlog.get_logger()

TAG_SECONDS = 5.0  # how long a tag's resolution at the server is trusted
PULL_START_SECONDS = 30.0  # how long a blob request waits for its download to begin
AHEAD = 16  # pieces asked of the swarm ahead of the one a stream sends
READ_AHEAD = 8  # pieces read from libtorrent ahead of the one a stream sends
EMPTY_DIGEST = sha256_digest(b"")
UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
FAILED = agent_pb2.TASK_STATE_FAILED
CANCELLED = agent_pb2.TASK_STATE_CANCELLED


@dataclass(frozen=True)
class Found:
    """A manifest as the face serves it."""

    repository: str  # where the server holds it (maybe without library/)
    digest: str
    media_type: str
    content: bytes


class ManifestCache:
    """Manifests by digest on disk, kept for good (their bytes never change)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, repository: str, digest: str) -> Path:
        # Repository names are lowercase components joined by "/", none of them "." or "..".
        return self.root / repository / digest.split(":", 1)[1]

    def get(self, repository: str, digest: str) -> bytes | None:
        try:
            return self._path(repository, digest).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, repository: str, digest: str, content: bytes) -> None:
        path = self._path(repository, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(content)
        tmp.replace(path)


@dataclass(eq=False)
class ServedOrder:
    """An order whose image the engine pulls from the face (AgentRegistry.serve_order):
    ``blobs`` come from ``runner``'s downloads. ``asked`` turns true when the engine asks for
    its manifest or one of its blobs; call ``release()`` once the engine's pull has ended."""

    runner: OrderRunner
    blobs: frozenset[str]
    release: Callable[[], None]
    asked: bool = False


class AgentRegistry:
    """The aiohttp application of the agent's registry face."""

    def __init__(
        self,
        agent_name: str,
        images: image_grpc.ImageServiceStub,
        agents: agent_service_pb2_grpc.AgentServiceStub,
        orders: OrderManager,
        fetcher: BlobFetcher,
        cache: BlobCache,
        manifests: ManifestCache,
    ) -> None:
        self.agent_name = agent_name
        self.images = images
        self.agents = agents
        self.orders = orders
        self.fetcher = fetcher
        self.cache = cache
        self.manifests = manifests
        self._tags: dict[tuple[str, str], tuple[str, float]] = {}  # -> (digest, when)
        self._named: dict[tuple[str, str], str] = {}  # (repository, digest) -> a tag of it
        self._pulls: dict[str, OrderRunner] = {}  # blob digest -> the order pulling it
        # Blob digest -> the StartPull in flight that will pull it.
        self._starting: dict[str, asyncio.Future[OrderRunner | None]] = {}
        # Manifest or blob digest -> this agent's own orders whose load is the engine's pull
        # from here (serve_order), oldest first: asked for by the engine, a blob comes from
        # the newest such order's downloads, never from a pull of the face's own. Two orders
        # of one image may be pulled at once: the engine's asking counts for both.
        self._watched: dict[str, list[ServedOrder]] = {}

    def serve_order(
        self, runner: OrderRunner, manifest_digest: str, blobs: list[str]
    ) -> ServedOrder:
        """Serves the engine's pull of ``runner``'s image from that order's downloads, until
        the returned ServedOrder is released (once the engine's pull has ended: the agent
        ends it with the order, PullCancel, and dockerd may still ask meanwhile). No
        StartPull is made for these blobs meanwhile, so the server records the rollout, not
        a pull besides it; a blob of an order that ended without it is BLOB_UNKNOWN. The
        ServedOrder says whether the engine asked for the manifest or a blob at all: if it
        did not, the engine cannot reach this face."""
        watched = {manifest_digest, *blobs}

        def release() -> None:
            for digest in watched:
                orders = self._watched.get(digest, [])
                if served in orders:
                    orders.remove(served)
                if not orders:
                    self._watched.pop(digest, None)

        served = ServedOrder(runner, frozenset(blobs), release)
        for digest in watched:
            self._watched.setdefault(digest, []).append(served)
        return served

    def _serving(self, digest: str) -> OrderRunner | None:
        """The order whose downloads serve blob ``digest`` to the engine (serve_order): the
        newest one still served, if any."""
        for served in reversed(self._watched.get(digest, ())):
            if digest in served.blobs:
                return served.runner
        return None

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/v2", self._dispatch)
        app.router.add_route("*", "/v2/{tail:.*}", self._dispatch)
        return app

    # Dispatch and errors

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        routes: list[tuple[str, Callable[[web.Request, str, str], Awaitable[web.StreamResponse]]]]
        routes = [("manifests", self.manifest), ("blobs", self.blob)]
        if tail == "":
            if request.method not in ("GET", "HEAD"):
                raise _push_refused(request)
            return web.json_response({})
        if tail.endswith("/tags/list") and request.method in ("GET", "HEAD"):
            return await self.tags(request, tail.removesuffix("/tags/list"))
        for kind, handler in routes:
            name, sep, reference = tail.rpartition(f"/{kind}/")
            if sep and name and reference and "/" not in reference and name != "_catalog":
                if "/blobs/uploads" in f"/{tail}" or request.method not in ("GET", "HEAD"):
                    raise _push_refused(request)
                if not is_repository(name):
                    raise HttpError(400, Code.NAME_INVALID, f"invalid repository name {name!r}")
                for served in self._watched.get(reference, ()):
                    served.asked = True
                return await handler(request, name, reference)
        if request.method not in ("GET", "HEAD"):
            raise _push_refused(request)
        raise HttpError(
            404,
            Code.UNSUPPORTED,
            f"the agent serves manifests and blobs; {request.path} is the server's",
        )

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        start = time.monotonic()
        try:
            response = await handler(request)
        except HttpError as e:
            response = error_response(e.status, e.code, e.message, headers=e.headers)
        except web.HTTPException as e:
            response = error_response(e.status, Code.UNSUPPORTED, e.reason)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("registry request failed", method=request.method, path=request.path)
            response = error_response(500, Code.UNKNOWN, "internal error in the agent")
        if not response.prepared:
            response.headers[API_VERSION[0]] = API_VERSION[1]
        log.debug(
            "registry request",
            method=request.method,
            path=request.path,
            status=response.status,
            ms=round((time.monotonic() - start) * 1000, 1),
        )
        return response

    # Tags

    async def tags(self, request: web.Request, name: str) -> web.StreamResponse:
        """A repository's tags, as the server has them (skopeo inspect lists them)."""
        n = request.query.get("n", "")
        if n and not n.isdigit():
            raise HttpError(400, Code.PAGINATION_NUMBER_INVALID, f"n={n!r} is not a number")
        try:
            response = await self.images.ListTags(
                image_pb.ListTagsRequest(
                    repository=name,
                    page_size=int(n or "0"),
                    page_token=request.query.get("last", ""),
                ),
                timeout=10,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise HttpError(404, Code.NAME_UNKNOWN, e.details() or name) from None
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise HttpError(400, Code.NAME_INVALID, e.details() or name) from None
            raise HttpError(
                503, Code.UNAVAILABLE, f"the Docket server cannot be reached ({e.code().name})"
            ) from None
        out = web.json_response({"name": name, "tags": list(response.tags)})
        if response.next_page_token:
            query = urlencode({"n": n or str(len(response.tags)), "last": response.next_page_token})
            out.headers["Link"] = f'</v2/{name}/tags/list?{query}>; rel="next"'
        return out

    # Manifests

    async def manifest(self, request: web.Request, name: str, reference: str) -> web.StreamResponse:
        found = await self._resolve(name, reference)
        if not is_digest(reference):
            # Remembered for the pull's record: the runtime asks by digest next (for an
            # index, for its platform's image).
            self._named[(found.repository, found.digest)] = reference
            with contextlib.suppress(ManifestError):
                for child in parse_manifest(found.content, found.media_type).manifests:
                    self._named[(found.repository, child.digest)] = reference
        accepted = accepted_types(request)
        if accepted is not None and not serves(found.media_type, accepted):
            children = parse_manifest(found.content).manifests
            entry = index_fallback(found.media_type, children, reference, accepted)
            found = await self._resolve(found.repository, entry.digest)
        headers = {"Docker-Content-Digest": found.digest, "ETag": f'"{found.digest}"'}
        if etag_matches(request, found.digest):
            return web.Response(status=304, headers=headers)
        if request.method == "GET":
            self._prefetch(found, name, reference)
        return web.Response(
            body=found.content, headers={**headers, "Content-Type": found.media_type}
        )

    async def _resolve(self, name: str, reference: str) -> Found:
        """A manifest of ``name`` (or of the name without ``library/``) by tag or digest."""
        candidates = [name]
        if name.startswith("library/"):
            candidates.append(name.removeprefix("library/"))
        unreachable: str | None = None
        for repository in candidates:
            try:
                found = await self._resolve_in(repository, reference)
            except _NotThere:
                continue
            except _Unreachable as e:
                unreachable = str(e)
                continue
            if found is not None:
                return found
        if unreachable is not None:
            raise HttpError(
                503,
                Code.UNAVAILABLE,
                f"the Docket server cannot be reached ({unreachable}), and {name}:{reference} "
                "was not seen here before",
            )
        raise HttpError(404, Code.MANIFEST_UNKNOWN, f"manifest {reference} not found in {name}")

    async def _resolve_in(self, repository: str, reference: str) -> Found | None:
        by_digest = is_digest(reference)
        if not by_digest and ":" in reference:
            raise HttpError(400, Code.DIGEST_INVALID, f"invalid digest {reference!r}")
        digest = reference if by_digest else None
        if digest is None:
            known = self._tags.get((repository, reference))
            if known is not None and time.monotonic() - known[1] < TAG_SECONDS:
                digest = known[0]
        if digest is not None:
            content = self.manifests.get(repository, digest)
            if content is not None:
                return _found(repository, digest, content)
        try:
            response = await self.images.GetManifest(
                image_pb.GetManifestRequest(repository=repository, reference=reference),
                timeout=10,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise _NotThere from None
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise HttpError(400, Code.NAME_INVALID, e.details() or "invalid name") from None
            known = self._tags.get((repository, reference))
            if known is not None and e.code() in UNAVAILABLE:
                content = self.manifests.get(repository, known[0])
                if content is not None:
                    log.warning(
                        "server unreachable: serving the tag as last resolved",
                        repository=repository,
                        tag=reference,
                        digest=known[0],
                    )
                    return _found(repository, known[0], content)
            raise _Unreachable(f"{e.code().name}: {e.details()}") from None
        content = response.content
        if sha256_digest(content) != response.digest or (
            by_digest and response.digest != reference
        ):
            raise HttpError(
                502, Code.UNKNOWN, f"the server sent a manifest that is not {reference}"
            )
        self.manifests.put(repository, response.digest, content)
        if not by_digest:
            self._tags[(repository, reference)] = (response.digest, time.monotonic())
        return Found(repository, response.digest, response.media_type, content)

    def _prefetch(self, found: Found, name: str, reference: str) -> None:
        """Starts pulling an image's blobs as soon as its manifest is asked for."""
        try:
            parsed = parse_manifest(found.content, found.media_type)
        except ManifestError:
            return
        if parsed.config is None or parsed.config.media_type not in IMAGE_CONFIG_TYPES:
            return
        blobs = [parsed.config.digest, *(layer.digest for layer in parsed.layers)]
        # On their way already: pulled by the face, or an order's downloads serve them.
        if all(d in self._pulls or self._serving(d) is not None for d in blobs):
            return
        # Pulled (and recorded) even when every blob is cached: the server's record of the
        # pull then says it came from the cache.
        # The pull is asked for by digest (what was served), and recorded under the tag the
        # runtime resolved, when it did (dockerd and containerd resolve, then ask by digest).
        tag = (
            reference
            if not is_digest(reference)
            else self._named.get((found.repository, found.digest))
        )
        shown = f"{found.repository}:{tag}" if tag else f"{found.repository}@{found.digest}"
        task = asyncio.ensure_future(
            self._start_pull(
                f"{found.repository}@{found.digest}", found.repository, [], blobs, shown
            )
        )
        task.add_done_callback(_log_failure)

    # Blobs

    async def blob(self, request: web.Request, name: str, digest: str) -> web.StreamResponse:
        if not is_digest(digest):
            raise HttpError(400, Code.DIGEST_INVALID, f"invalid digest {digest!r}")
        if digest == EMPTY_DIGEST:
            return web.Response(body=b"", headers=_blob_headers(digest))
        if self.cache.has(digest):
            return await self._from_cache(request, digest)
        download = await self._fetching(name, digest)
        if download is None:  # done meanwhile
            return await self._from_cache(request, digest)
        headers = _blob_headers(digest)
        offset, count, status = range_of(request, download.spec.size, headers)
        return await self._stream(request, download, offset, count, status, headers)

    async def _from_cache(self, request: web.Request, digest: str) -> web.StreamResponse:
        path = self.cache.path(digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise HttpError(404, Code.BLOB_UNKNOWN, f"blob {digest} left the cache") from None
        self.cache.touch(digest)
        headers = _blob_headers(digest)
        if etag_matches(request, digest):
            return web.Response(status=304, headers=headers)
        offset, count, status = range_of(request, size, headers)
        return await send_file(request, path, offset, count, status, headers)

    async def _fetching(self, repository: str, digest: str) -> BlobDownload | None:
        """The blob's download: the one in flight, or one started for it; None once it is in
        the cache."""
        deadline = time.monotonic() + PULL_START_SECONDS
        starting = self._starting.get(digest)
        if starting is not None:  # its image's pull is being asked for: wait for that one
            with contextlib.suppress(HttpError):
                await asyncio.shield(starting)
        runner = self._pulls.get(digest)
        started = False
        while True:
            download = self.fetcher.in_flight(digest)
            if download is not None:
                return download
            if self.cache.has(digest):
                return None
            serving = self._serving(digest)
            if serving is not None and (_over(serving) or _failed(serving)):
                raise _order_ended(digest, serving)
            if runner is not None and _over(runner):
                if _failed(runner):
                    raise _pull_failed(digest, runner)
                runner = None  # it ended without this blob: pull it alone
            if runner is None and serving is None:
                if started:
                    raise HttpError(
                        503, Code.UNAVAILABLE, f"the pull of blob {digest} ended without it"
                    )
                runner = await self._start_pull("", repository, [digest], [digest])
                started = True
                if runner is None:  # done at once: the blob was in the cache after all
                    continue
            if time.monotonic() > deadline:
                raise HttpError(
                    503, Code.UNAVAILABLE, f"the pull of blob {digest} did not start in time"
                )
            await asyncio.sleep(0.02)

    async def _start_pull(
        self,
        image_name: str,
        repository: str,
        blob_digests: list[str],
        blobs: list[str],
        display_name: str = "",
    ) -> OrderRunner | None:
        """Asks the server for an order for an image (or for blobs) and starts it; requests
        for a blob while it is being asked for wait for that call."""
        pending = self._starting.get(blobs[0]) if len(blobs) == 1 else None
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[OrderRunner | None] = asyncio.get_running_loop().create_future()
        for digest in blobs:
            self._starting.setdefault(digest, future)
        try:
            request = agent_service_pb2.StartPullRequest(
                agent_name=self.agent_name,
                image_name=image_name,
                repository=repository if not image_name else "",
                blob_digests=blob_digests,
                display_name=display_name,
            )
            try:
                response = await self.agents.StartPull(request, timeout=30)
            except grpc.aio.AioRpcError as e:
                reason, _ = error_info(e.trailing_metadata())
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    raise HttpError(404, Code.BLOB_UNKNOWN, e.details() or reason) from None
                raise HttpError(
                    503,
                    Code.UNAVAILABLE,
                    f"the Docket server cannot start the pull ({e.code().name}: {e.details()})",
                ) from None
            runner = self.orders.pull(response.order)
            if runner is not None:
                for digest in blobs:
                    self._pulls[digest] = runner
                runner_task = runner.task
                if runner_task is not None:
                    runner_task.add_done_callback(lambda _t: self._forget(runner, blobs))
            future.set_result(runner)
            return runner
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: the callers waiting on it get it raised
            raise
        finally:
            for digest in blobs:
                if self._starting.get(digest) is future:
                    del self._starting[digest]

    def _forget(self, runner: OrderRunner, blobs: list[str]) -> None:
        """An order is over: requests waiting on it see how it ended; new ones start anew."""
        for digest in blobs:
            if self._pulls.get(digest) is runner:
                del self._pulls[digest]

    async def _stream(
        self,
        request: web.Request,
        download: BlobDownload,
        offset: int,
        count: int,
        status: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Sends bytes of a blob being fetched, piece by piece as libtorrent checks them."""
        digest = download.spec.digest
        response, body = await start_body(request, status, headers, count)
        if not body:
            return response
        # A whole blob goes out as its pieces pass the in-order sha256 the fetcher computes
        # anyway, its last piece once the blob matched; a range, as libtorrent checks pieces.
        whole = offset == 0 and count == download.spec.size
        read_next = self.fetcher.verified_piece if whole else self.fetcher.read_piece
        length = download.piece_length
        first, last = offset // length, (offset + count - 1) // length
        # Reads of the next pieces are under way while one is sent: each read is a round
        # trip through libtorrent's disk thread.
        reads: deque[asyncio.Future[bytes]] = deque()
        ahead = first
        try:
            for index in range(first, last + 1):
                self.fetcher.prioritize(download, index, AHEAD)
                while ahead <= min(last, index + READ_AHEAD - 1):
                    reads.append(asyncio.ensure_future(read_next(download, ahead)))
                    ahead += 1
                try:
                    data = await reads.popleft()
                except (FetchError, TimeoutError) as e:
                    if isinstance(e, DigestMismatchError):
                        log.error(
                            "blob failed its sha256: stream broken off, blob dropped", blob=digest
                        )
                        self.fetcher.drop(digest, delete_files=True)
                    else:
                        log.warning(
                            "stream broken off: the blob's download failed",
                            blob=digest,
                            error=str(e),
                        )
                    _cut(request)
                    return response
                begin = max(offset - index * length, 0)
                part = data[begin : min(offset + count - index * length, len(data))]
                await response.write(part)
        finally:
            for read in reads:
                read.cancel()
        await response.write_eof()
        return response


class _NotThere(Exception):
    pass


class _Unreachable(Exception):
    pass


def _found(repository: str, digest: str, content: bytes) -> Found:
    try:
        media_type = parse_manifest(content).media_type
    except ManifestError:
        media_type = "application/vnd.oci.image.manifest.v1+json"
    return Found(repository, digest, media_type, content)


def _blob_headers(digest: str) -> dict[str, str]:
    return {
        "Docker-Content-Digest": digest,
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }


def _over(runner: OrderRunner) -> bool:
    return runner.task is None or runner.task.done()


def _failed(runner: OrderRunner) -> bool:
    last = runner.last
    return last is not None and last.task_update.state in (FAILED, CANCELLED)


def _order_ended(digest: str, runner: OrderRunner) -> HttpError:
    """The answer for a blob of an order this face served (serve_order) that ended without
    it. dockerd (20.10) retries a blob broken off whatever the answer (5 s, then 10 s on;
    DENIED as well as BLOB_UNKNOWN): the agent ends its pull with the order (PullCancel)."""
    error = runner.last.task_update.error if runner.last is not None else ""
    why = f": {error}" if error else ""
    return HttpError(
        404, Code.BLOB_UNKNOWN, f"blob {digest}: order {runner.id} ended without it{why}"
    )


def _pull_failed(digest: str, runner: OrderRunner) -> HttpError:
    error = runner.last.task_update.error if runner.last is not None else "failed"
    if "cache holds" in error:
        return HttpError(507, Code.SIZE_INVALID, f"blob {digest}: {error}")
    return HttpError(503, Code.UNAVAILABLE, f"the pull of blob {digest} failed: {error}")


def _push_refused(request: web.Request) -> HttpError:
    return HttpError(
        405,
        Code.UNSUPPORTED,
        f"{request.method} {request.path}: the agent serves pulls only; push to the Docket "
        "server's registry (docket-server --registry-listen)",
    )


def _cut(request: web.Request) -> None:
    """Breaks off a response already under way: the client sees it end short and retries."""
    if request.transport is not None:
        request.transport.abort()


def _log_failure(task: asyncio.Future[OrderRunner | None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not start pulling an image's blobs", error=str(task.exception()))
