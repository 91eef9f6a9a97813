"""How every job connects to Ray: one place for the address rule and the loopback dashboard."""

from __future__ import annotations

import os
from typing import Any


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Connect to ``address`` (else ``RAY_ADDRESS``), or start a local instance; no-op if already connected.

    The dashboard of a locally started instance binds to 127.0.0.1 only.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), dashboard_host="127.0.0.1", **kwargs)
