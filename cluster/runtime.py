"""How every job connects to Ray: one place for the address rule, the loopback dashboard and the banner.

The rule (the same for ``jobs/train.py``, ``jobs/serve.py``, ``jobs/compare.py``,
``jobs/sweep.py`` and the benches):

* ``--address`` given: attach to that cluster (``auto`` = the one recorded on this machine).
* else ``RAY_ADDRESS`` set: attach to that cluster (``ray job submit`` sets it for its jobs).
* else: start a new local Ray instance for this process (``address="local"``), never
  silently attaching to some other cluster that happens to run on the machine.

Each job prints the cluster address and dashboard URL it attached to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RayAttachment:
    """Where a job's driver is connected."""

    address: str
    """The cluster's GCS address (``host:port``)."""
    dashboard_url: str | None
    """The dashboard URL, or ``None`` without a dashboard."""
    started_local: bool
    """True when this process started its own local instance."""

    def banner(self) -> str:
        """One line for the job's log."""
        how = "started a local Ray instance" if self.started_local else "attached to Ray cluster"
        return f"[trprompt] {how} at {self.address} (dashboard: {self.dashboard_url or 'none'})"


def resolve_address(address: str | None = None) -> str:
    """The address ``ray.init`` gets: ``address``, else ``RAY_ADDRESS``, else ``"local"`` (start a new instance)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def current_attachment(started_local: bool = False) -> RayAttachment:
    """The cluster this (already connected) process is attached to."""
    import ray
    from ray._private.worker import get_dashboard_url

    try:
        gcs = ray.get_runtime_context().gcs_address
    except Exception:  # Ray client mode has no GCS address
        gcs = os.environ.get("RAY_ADDRESS", "unknown")
    url = get_dashboard_url() or None
    if url and "://" not in url:
        url = f"http://{url}"
    return RayAttachment(address=str(gcs), dashboard_url=url, started_local=started_local)


def init_ray(address: str | None = None, *, quiet: bool = False, **kwargs: Any) -> RayAttachment:
    """Connect to ``address`` (else ``RAY_ADDRESS``), or start a new local instance; print where.

    A no-op (apart from the banner) when this process is already connected. The
    dashboard of a locally started instance binds to 127.0.0.1 only. Returns where the
    driver is attached.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        info = current_attachment()
    else:
        target = resolve_address(address)
        local = target == "local"
        if local:
            kwargs.setdefault("dashboard_host", "127.0.0.1")
        ray.init(address=target, **kwargs)
        info = current_attachment(started_local=local)
    if not quiet:
        print(info.banner(), flush=True)
    return info
