"""Health: named checks of what a process needs to do its work, run every few seconds.

The results feed ``grpc.health.v1`` on the server and ``/healthz`` and ``/readyz`` on every
HTTP face, for load balancers and Kubernetes probes:

- ``/healthz`` (liveness): 200 while the process answers at all (its event loop turns);
- ``/readyz`` (readiness): 200 when every check passes (run again when the latest round is
  over a second old), else 503; the body says each check's result either way:
  ``{"ready": false, "checks": {"database": "ok", "seed": "ok", "disk": "3.1 MiB free in
  /var/lib/docket/server, below the 1 GiB reserve (--min-free-bytes): uploads are refused"}}``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

log = structlog.get_logger()

# A check says why the process is not ready, or None when it is.
Check = Callable[[], Awaitable[str | None]]
CHECK_INTERVAL = 5.0  # seconds between rounds
CHECK_TIMEOUT = 3.0  # a check that takes longer fails
FRESH_SECONDS = 1.0  # /readyz runs the checks again when the last round is older
OK = "ok"
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})


class Health:
    def __init__(self, interval: float = CHECK_INTERVAL) -> None:
        self.interval = interval
        self._checks: dict[str, Check] = {}
        # Not ready until the first round has run.
        self.results: dict[str, str] = {}
        self.checked_at = 0.0
        self._listeners: list[Callable[[bool], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._round: asyncio.Future[bool] | None = None

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check
        self.results[name] = "not checked yet"

    def on_change(self, listener: Callable[[bool], Awaitable[None]]) -> None:
        """Calls ``listener(ready)`` after every round (the gRPC health servicer's status)."""
        self._listeners.append(listener)

    @property
    def ready(self) -> bool:
        return all(result == OK for result in self.results.values())

    @property
    def problems(self) -> dict[str, str]:
        return {name: result for name, result in self.results.items() if result != OK}

    async def _one(self, name: str, check: Check) -> str:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                why = await check()
        except TimeoutError:
            return f"no answer in {CHECK_TIMEOUT:g}s"
        except Exception as e:  # a check that breaks says so: the process is not ready
            log.warning("health check failed", check=name, error=str(e))
            return f"check failed: {e}"
        return OK if why is None else why

    async def check_now(self) -> bool:
        """Runs every check (at once) and returns whether all passed; callers at the same
        time share one round."""
        if self._round is None or self._round.done():
            self._round = asyncio.ensure_future(self._check_all())
        return await asyncio.shield(self._round)

    async def _check_all(self) -> bool:
        was = self.problems
        names = list(self._checks)
        results = await asyncio.gather(*(self._one(n, self._checks[n]) for n in names))
        self.results = dict(zip(names, results, strict=True))
        self.checked_at = time.monotonic()
        now = self.problems
        if now != was:
            if now:
                log.warning("not ready", problems=now)
            else:
                log.info("ready: every health check passes", checks=names)
        for listener in self._listeners:
            await listener(self.ready)
        return self.ready

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="health-checks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_now()

    def body(self) -> dict[str, object]:
        return {"ready": self.ready, "checks": dict(self.results)}

    def add_routes(self, app: web.Application) -> None:
        """``/healthz`` and ``/readyz`` on an HTTP face (before it starts)."""
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)

    async def _healthz(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.StreamResponse:
        if time.monotonic() - self.checked_at > FRESH_SECONDS:  # a probe sees the state now
            await self.check_now()
        return web.Response(
            status=200 if self.ready else 503,
            text=json.dumps(self.body()) + "\n",
            content_type="application/json",
        )
