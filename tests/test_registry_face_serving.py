"""AgentRegistry.serve_order's book of the orders whose downloads serve the engine's pull,
without a face running: which order serves a blob while two share it, and after each ends."""

from __future__ import annotations

from typing import Any, cast

from docket_agent.registry_face import AgentRegistry


def _registry() -> AgentRegistry:
    none = cast(Any, None)  # serve_order touches none of them
    return AgentRegistry("h1", none, none, none, none, none, none)


def test_a_blob_two_orders_share_is_served_until_the_last_of_them_is_released() -> None:
    face = _registry()
    first, second = cast(Any, object()), cast(Any, object())
    a = face.serve_order(first, "sha256:m", ["sha256:config-a", "sha256:base"])
    b = face.serve_order(second, "sha256:m", ["sha256:config-b", "sha256:base"])
    assert face._serving("sha256:base") is second  # the newest serves it
    assert face._serving("sha256:config-a") is first
    assert face._serving("sha256:m") is None  # the manifest is watched, not served as a blob
    b.release()
    assert face._serving("sha256:base") is first  # the older order still being pulled
    assert face._serving("sha256:config-b") is None
    b.release()  # twice is harmless
    assert face._serving("sha256:base") is first
    a.release()
    assert face._serving("sha256:base") is None
    assert face._watched == {}
