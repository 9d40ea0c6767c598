"""Small asyncio helpers shared by the server and the agent."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Waits until ``event`` is set, for at most ``seconds`` (none if negative); whether it
    is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(seconds, 0.0)):
            await event.wait()
    return event.is_set()
