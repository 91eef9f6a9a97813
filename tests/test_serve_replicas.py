"""Replica failure: a killed model replica is replaced and clients lose no request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from serve_fixtures import ECHO_APP, get_info


def _replica_actor_names(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of ``app``'s ``deployment``.

    With this session's dashboard up, ask the state API by class name; without one
    (the test session runs Ray without it, and 127.0.0.1:8265 may be another Ray
    instance on this machine), read this cluster's named actors instead.
    """
    import ray
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    if url:
        from ray.util.state import list_actors

        rows = list_actors(address=url if "://" in url else f"http://{url}",
                           filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")])
        return [r.name for r in rows]
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"{app}#{deployment}#" in a["name"]]


async def _post_with_retries(c: httpx.AsyncClient, body: dict[str, Any], retries: int = 3) -> tuple[int, int]:
    """POST /v1/prompt, retrying up to ``retries`` times on 5xx or transport errors; (status, attempts)."""
    status = 0
    for attempt in range(retries + 1):
        try:
            r = await c.post("/v1/prompt", json=body)
            status = r.status_code
            if status < 500:
                return status, attempt + 1
        except httpx.TransportError:
            status = -1
        await asyncio.sleep(1.0 * 2**attempt)
    return status, retries + 1


@pytest.mark.ray
def test_killed_replica_is_restarted_and_clients_recover(serve_client: httpx.Client, serve_url: str) -> None:
    import ray

    before = get_info(serve_client)
    alive = _replica_actor_names(ECHO_APP, "PromptModel")
    assert len(alive) == 1, alive

    async def run() -> list[tuple[int, int]]:
        async with httpx.AsyncClient(base_url=serve_url, timeout=30.0) as c:

            async def worker(w: int) -> list[tuple[int, int]]:
                return [await _post_with_retries(c, {"question": f"k{w}-{i}: 5 + {i}?"}) for i in range(6)]

            async def killer() -> None:
                await asyncio.sleep(0.2)
                handle = ray.get_actor(alive[0], namespace="serve")
                ray.kill(handle, no_restart=True)

            *outs, _ = await asyncio.gather(*(worker(w) for w in range(6)), killer())
            return [x for o in outs for x in o]

    t0 = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    assert all(status == 200 for status, _ in results), results
    assert elapsed < 90
    after = get_info(serve_client)
    assert after["replicas"]["prompt_model"] != before["replicas"]["prompt_model"]  # a new replica answers
    # the restarted replica came up with the hot-swapped version, not the deployed one
    assert after["epoch"] == before["epoch"] and after["optimal_reward"] == before["optimal_reward"]
    assert after["adapter_version"] == before["adapter_version"]
    print(f"replica kill: {len(results)} requests ok in {elapsed:.1f} s, "
          f"{sum(a > 1 for _, a in results)} needed a retry")
