"""The registry HTTP face: the OCI Distribution API (the Docker registry protocol, v2) over
the same registry, blob store and metadata as the gRPC API.

`docker push`, `docker pull`, skopeo, containerd and crane talk to it. Handlers are thin:
they decode the request, call the registry (or the uploads), and encode the answer; every
domain error becomes the spec's JSON error in one place (registry_errors.py). Blob bodies go
out with sendfile(2), from the blob file straight to the socket.

Routes (NAME is a repository, "perl" or "team/app"; REF a tag or a digest)::

    GET|HEAD              /v2/                         API version check
    GET                   /v2/_catalog?n=&last=        repositories
    GET                   /v2/NAME/tags/list?n=&last=  tags
    GET|HEAD|PUT|DELETE   /v2/NAME/manifests/REF       manifests and indexes
    GET|HEAD              /v2/NAME/blobs/DIGEST        blobs, with Range
    POST                  /v2/NAME/blobs/uploads/      start an upload (?digest=, ?mount=&from=)
    GET|PATCH|PUT|DELETE  /v2/NAME/blobs/uploads/ID    status, chunk, commit (?digest=), cancel
    GET                   /v2/NAME/referrers/DIGEST    OCI 1.1 referrers (?artifactType=)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import structlog
from aiohttp import web
from aiohttp.client_exceptions import ClientError

from docket_common.health import HEALTH_PATHS
from docket_common.manifest import OCI_INDEX
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
)
from docket_server.api.authz import ROUTES, Guard
from docket_server.api.registry_errors import Face, domain_error_response
from docket_server.domain.errors import DocketError, PermissionDenied, Unauthenticated
from docket_server.domain.models import Manifest
from docket_server.domain.registry import Registry
from docket_server.domain.security import ANONYMOUS, Audit, Caller
from docket_server.domain.uploads import Uploads
from docket_server.metrics import ServerMetrics

log = structlog.get_logger()

CHUNK = 1024 * 1024  # body bytes gathered before each write to the blob file
MAX_MANIFEST_BODY = 4 * 1024 * 1024
REALM = "docket"

Handler = Callable[[web.Request, "re.Match[str]"], Awaitable[web.StreamResponse]]
# Each route's template, as metrics label requests (never the path: it holds names and digests).
TEMPLATES = {
    "base": "/v2/",
    "catalog": "/v2/_catalog",
    "tags": "/v2/{name}/tags/list",
    "manifest": "/v2/{name}/manifests/{reference}",
    "uploads": "/v2/{name}/blobs/uploads/",
    "upload": "/v2/{name}/blobs/uploads/{uuid}",
    "blob": "/v2/{name}/blobs/{digest}",
    "referrers": "/v2/{name}/referrers/{digest}",
}
METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True)
class Route:
    name: str  # for logs, metrics and the authorization table
    pattern: re.Pattern[str]
    face: Face
    methods: dict[str, Handler]


class RegistryApp:
    """The aiohttp application of the registry HTTP face."""

    def __init__(
        self,
        registry: Registry,
        uploads: Uploads,
        guard: Guard,
        audit: Audit | None = None,
        metrics: ServerMetrics | None = None,
    ):
        self.registry = registry
        self.uploads = uploads
        self.guard = guard
        self.audit = audit
        self.metrics = metrics
        self.routes = [
            Route("base", re.compile(r"^$"), Face.OTHER, {"GET": self.base, "HEAD": self.base}),
            Route("catalog", re.compile(r"^_catalog$"), Face.OTHER, {"GET": self.catalog}),
            Route(
                "tags",
                re.compile(r"^(?P<name>.+)/tags/list$"),
                Face.OTHER,
                {"GET": self.tags},
            ),
            Route(
                "manifest",
                re.compile(r"^(?P<name>.+)/manifests/(?P<reference>[^/]+)$"),
                Face.MANIFESTS,
                {
                    "GET": self.get_manifest,
                    "HEAD": self.get_manifest,
                    "PUT": self.put_manifest,
                    "DELETE": self.delete_manifest,
                },
            ),
            Route(
                "uploads",
                re.compile(r"^(?P<name>.+)/blobs/uploads/?$"),
                Face.UPLOADS,
                {"POST": self.start_upload},
            ),
            Route(
                "upload",
                re.compile(r"^(?P<name>.+)/blobs/uploads/(?P<upload>[^/]+)$"),
                Face.UPLOADS,
                {
                    "GET": self.upload_status,
                    "HEAD": self.upload_status,
                    "PATCH": self.patch_upload,
                    "PUT": self.finish_upload,
                    "DELETE": self.cancel_upload,
                },
            ),
            Route(
                "blob",
                re.compile(r"^(?P<name>.+)/blobs/(?P<digest>[^/]+)$"),
                Face.BLOBS,
                {"GET": self.get_blob, "HEAD": self.get_blob, "DELETE": self.delete_blob},
            ),
            Route(
                "referrers",
                re.compile(r"^(?P<name>.+)/referrers/(?P<digest>[^/]+)$"),
                Face.OTHER,
                {"GET": self.referrers},
            ),
        ]

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/v2", self._dispatch)
        app.router.add_route("*", "/v2/{tail:.*}", self._dispatch)
        return app

    # Dispatch, errors, authentication, logs

    def _route(self, request: web.Request) -> tuple[Route, re.Match[str]] | None:
        tail = request.match_info.get("tail", "")
        for route in self.routes:
            match = route.pattern.match(tail)
            if match is not None:
                return route, match
        return None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        found = self._route(request)
        if found is None:
            raise HttpError(404, Code.NAME_UNKNOWN, f"no registry endpoint at {request.path}")
        route, match = found
        handler = route.methods.get(request.method)
        if handler is None:
            raise HttpError(
                405,
                Code.UNSUPPORTED,
                f"{request.method} is not supported on {request.path}",
                {"Allow": ", ".join(route.methods)},
            )
        return await handler(request, match)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in HEALTH_PATHS:  # probes: no token, no audit, no log
            return await handler(request)
        start = time.monotonic()
        found = self._route(request) if request.path.startswith("/v2") else None
        face = found[0].face if found else Face.OTHER
        caller = ANONYMOUS
        try:
            if self.guard.secure:
                caller = self.guard.identify(_token(request))
                self._check(request, found[0] if found else None, caller)
            response: web.StreamResponse = await handler(request)
        except Unauthenticated as e:
            response = error_response(
                401,
                Code.UNAUTHORIZED,
                f"authentication required: {e.message}; log in with a Docket token as the "
                "password (docker login), or send it as a bearer token",
                headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
            )
        except PermissionDenied as e:
            response = error_response(403, Code.DENIED, e.message)
        except DocketError as e:
            response = domain_error_response(e, face)
        except HttpError as e:
            response = error_response(e.status, e.code, e.message, headers=e.headers)
        except web.HTTPException as e:  # aiohttp's own (a path outside /v2/)
            response = error_response(e.status, Code.UNSUPPORTED, e.reason)
        except (ClientError, ConnectionError, asyncio.IncompleteReadError) as e:
            log.info("registry request broken off", method=request.method, path=request.path)
            response = error_response(400, Code.BLOB_UPLOAD_INVALID, f"the request broke off: {e}")
        except Exception:
            log.exception("registry request failed", method=request.method, path=request.path)
            response = error_response(500, Code.UNKNOWN, "internal error in the server")
        if not response.prepared:
            response.headers[API_VERSION[0]] = API_VERSION[1]
        self._audited(request, found[0] if found else None, caller, response.status)
        if self.metrics is not None:
            route = TEMPLATES.get(found[0].name, "other") if found else "other"
            method = request.method if request.method in METHODS else "other"
            self.metrics.http_requests.labels(route, method, str(response.status)).inc()
            self.metrics.http_seconds.labels(route, method).observe(time.monotonic() - start)
        log.debug(
            "registry request",
            method=request.method,
            path=request.path,
            route=found[0].name if found else None,
            status=response.status,
            ms=round((time.monotonic() - start) * 1000, 1),
        )
        return response

    def _check(self, request: web.Request, route: Route | None, caller: Caller) -> None:
        """Whether the caller (a bearer token, or Basic with the token as the password) may
        (api/authz.py ROUTES); 404s and 405s are answered to any authenticated caller."""
        if route is not None and request.method in route.methods:
            self.guard.check(
                caller, ROUTES.get((route.name, request.method)), f"{request.method} {route.name}"
            )

    def _audited(
        self, request: web.Request, route: Route | None, caller: Caller, status: int
    ) -> None:
        rule = ROUTES.get((route.name, request.method)) if route is not None else None
        if self.audit is None or not ((rule is not None and rule.changes) or status == 403):
            return
        outcome = "OK" if status < 400 else f"HTTP {status}"
        self.audit.record(
            caller, f"{request.method} {request.path}", "", outcome, request.remote or ""
        )

    # /v2/, catalog, tags

    async def base(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        return web.json_response({})

    async def catalog(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        n, last = _pagination(request)
        repositories, more = await self.registry.list_repositories(n or 0, last)
        if n == 0:
            repositories, more = [], False
        response = web.json_response({"repositories": repositories})
        if more:
            response.headers["Link"] = _next_link("/v2/_catalog", n, repositories[-1])
        return response

    async def tags(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        name = match["name"]
        n, last = _pagination(request)
        found, more = await self.registry.list_tags(name, n or 0, last)
        if n == 0:
            found, more = [], False
        response = web.json_response({"name": name, "tags": found})
        if more:
            response.headers["Link"] = _next_link(f"/v2/{name}/tags/list", n, found[-1])
        return response

    # Manifests

    async def get_manifest(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        name, reference = match["name"], match["reference"]
        manifest = await self.registry.get_manifest(name, reference)
        accepted = accepted_types(request)
        if accepted is not None and not serves(manifest.media_type, accepted):
            manifest = await self._negotiate(manifest, reference, accepted)
        headers = {
            "Docker-Content-Digest": manifest.digest,
            "ETag": f'"{manifest.digest}"',
        }
        if etag_matches(request, manifest.digest):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=manifest.content, headers={**headers, "Content-Type": manifest.media_type}
        )

    async def _negotiate(self, manifest: Manifest, reference: str, accepted: set[str]) -> Manifest:
        entry = index_fallback(manifest.media_type, manifest.children, reference, accepted)
        return await self.registry.get_manifest(manifest.repository, entry.digest)

    async def put_manifest(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        name, reference = match["name"], match["reference"]
        if request.content_length is not None and request.content_length > MAX_MANIFEST_BODY:
            raise HttpError(
                400,
                Code.MANIFEST_INVALID,
                f"the manifest is {request.content_length} bytes, over {MAX_MANIFEST_BODY}",
            )
        # Read to the end: one read() returns what has arrived (over TLS, a record at a time).
        content = bytearray()
        async for chunk in request.content.iter_any():
            content += chunk
            if len(content) > MAX_MANIFEST_BODY:
                raise HttpError(
                    400, Code.MANIFEST_INVALID, f"the manifest is over {MAX_MANIFEST_BODY} bytes"
                )
        manifest = await self.registry.put_manifest(
            name, reference, bytes(content), request.headers.get("Content-Type", "")
        )
        headers = {
            "Location": f"/v2/{name}/manifests/{manifest.digest}",
            "Docker-Content-Digest": manifest.digest,
        }
        if manifest.subject is not None:
            headers["OCI-Subject"] = manifest.subject.digest
        return web.Response(status=201, headers=headers)

    async def delete_manifest(
        self, request: web.Request, match: re.Match[str]
    ) -> web.StreamResponse:
        name, reference = match["name"], match["reference"]
        if ":" in reference:
            await self.registry.delete_manifest(name, reference)
        else:
            await self.registry.delete_tag(name, reference)
        return web.Response(status=202)

    # Blobs

    async def get_blob(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        self.registry.check_repository(match["name"])
        blob, path = await self.registry.blob_file(match["digest"])
        headers = {
            "Docker-Content-Digest": blob.digest,
            "ETag": f'"{blob.digest}"',
            "Accept-Ranges": "bytes",
            "Cache-Control": "max-age=31536000",
            "Content-Type": "application/octet-stream",
        }
        if etag_matches(request, blob.digest):
            return web.Response(status=304, headers=headers)
        offset, count, status = range_of(request, blob.size, headers)
        return await send_file(request, path, offset, count, status, headers)

    async def delete_blob(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        raise HttpError(
            405,
            Code.UNSUPPORTED,
            "blobs are shared by every repository and go with the last manifest that uses "
            "them: delete manifests instead",
        )

    # Uploads

    async def start_upload(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        name = match["name"]
        self.registry.check_repository(name)
        mount, digest = request.query.get("mount"), request.query.get("digest")
        if mount:
            mounted = await self.registry.mountable_blob(mount)
            if mounted is not None:
                return _blob_created(name, mounted)
        upload = self.uploads.start(name)
        if digest is not None:  # the whole blob in this one request
            result = await self.uploads.finish(
                upload, digest, _body_chunks(request), request.content_length
            )
            return _blob_created(name, result.blob.digest)
        return _upload_response(202, name, upload.id, 0)

    async def upload_status(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        upload = self.uploads.get(match["name"], match["upload"])
        return _upload_response(204, upload.repository, upload.id, upload.offset)

    async def patch_upload(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        upload = self.uploads.get(match["name"], match["upload"])
        start, length = None, request.content_length
        header = request.headers.get("Content-Range")
        if header:
            first, last = _content_range(header)
            start = first
            if length is not None and length != last - first + 1:
                raise HttpError(
                    400,
                    Code.SIZE_INVALID,
                    f"Content-Range {header} is {last - first + 1} bytes but Content-Length "
                    f"says {length}",
                )
            length = last - first + 1
        await self.uploads.append(upload, _body_chunks(request), start=start, length=length)
        return _upload_response(202, upload.repository, upload.id, upload.offset)

    async def finish_upload(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        upload = self.uploads.get(match["name"], match["upload"])
        digest = request.query.get("digest", "")
        if not digest:
            raise HttpError(400, Code.DIGEST_INVALID, "the upload's PUT must name ?digest=")
        result = await self.uploads.finish(
            upload, digest, _body_chunks(request), request.content_length
        )
        return _blob_created(upload.repository, result.blob.digest)

    async def cancel_upload(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        upload = self.uploads.get(match["name"], match["upload"])
        self.uploads.cancel(upload)
        return web.Response(status=204, headers={"Docker-Upload-UUID": upload.id})

    # Referrers

    async def referrers(self, request: web.Request, match: re.Match[str]) -> web.StreamResponse:
        artifact_type = request.query.get("artifactType", "")
        found = await self.registry.referrers(match["name"], match["digest"], artifact_type)
        entries = []
        for m in found:
            entry: dict[str, object] = {
                "mediaType": m.media_type,
                "digest": m.digest,
                "size": len(m.content),
            }
            if m.artifact_type:
                entry["artifactType"] = m.artifact_type
            annotations = _annotations(m.content)
            if annotations:
                entry["annotations"] = annotations
            entries.append(entry)
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type else {}
        return web.Response(body=json.dumps(body).encode(), content_type=OCI_INDEX, headers=headers)


# Helpers


async def _body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The request body in chunks of about CHUNK bytes, as it arrives."""
    buffer = bytearray()
    async for data in request.content.iter_any():
        buffer += data
        if len(buffer) >= CHUNK:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


def _upload_response(status: int, name: str, upload_id: str, offset: int) -> web.Response:
    return web.Response(
        status=status,
        headers={
            "Location": f"/v2/{name}/blobs/uploads/{upload_id}",
            "Range": f"0-{max(offset - 1, 0)}",
            "Docker-Upload-UUID": upload_id,
        },
    )


def _blob_created(name: str, digest: str) -> web.Response:
    return web.Response(
        status=201,
        headers={"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest},
    )


_CONTENT_RANGE = re.compile(r"^(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?$")


def _content_range(header: str) -> tuple[int, int]:
    """The first and last byte of an upload chunk's Content-Range ("0-1023"; "bytes 0-1023"
    and "bytes=0-1023/2048" are taken too)."""
    match = _CONTENT_RANGE.match(header.strip())
    if match is None or int(match[1]) > int(match[2]):
        raise HttpError(
            416, Code.RANGE_INVALID, f"Content-Range {header!r} is not FIRST-LAST in bytes"
        )
    return int(match[1]), int(match[2])


def _pagination(request: web.Request) -> tuple[int | None, str]:
    text = request.query.get("n")
    n = None
    if text is not None:
        if not text.isdigit():
            raise HttpError(
                400, Code.PAGINATION_NUMBER_INVALID, f"n={text!r} is not a number of results"
            )
        n = int(text)
    return n, request.query.get("last", "")


def _next_link(path: str, n: int | None, last: str) -> str:
    query = urlencode({**({"n": str(n)} if n else {}), "last": last}, quote_via=quote)
    return f'<{path}?{query}>; rel="next"'


def _annotations(content: bytes) -> dict[str, str]:
    try:
        doc = json.loads(content)
    except ValueError:
        return {}
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(annotations, dict):
        return {}
    return {str(k): str(v) for k, v in annotations.items()}


def _token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    token = value.strip()
    if scheme.lower() == "basic":
        try:
            _user, _, token = base64.b64decode(token, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return ""
    elif scheme.lower() != "bearer":
        return ""
    return token
