"""Replica failure: a killed model replica is replaced and clients lose no request."""

from __future__ import annotations

import asyncio
import time

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


@pytest.mark.ray
def test_killed_replica_loses_no_request(serve_client: httpx.Client, serve_url: str) -> None:
    """A few clients send back to back while the only PromptModel replica is killed: no client sees a failure.

    The clients do not retry: the ingress sends the requests the dead replica held (and
    those that arrive while it restarts) again, within each request's deadline.
    """
    import ray

    before = get_info(serve_client)
    alive = _replica_actor_names(ECHO_APP, "PromptModel")
    assert len(alive) == 1, alive
    stop_at: list[float] = []

    deadline = time.monotonic() + 120.0  # only if requests stall for good

    async def run() -> list[tuple[int, float, str]]:
        async with httpx.AsyncClient(base_url=serve_url, timeout=60.0) as c:

            async def worker(w: int) -> list[tuple[int, float, str]]:
                out = []
                i = after_kill = 0
                # Keep sending through the restart and after it: at least 6 s past the kill and at least three
                # requests started after it (on a loaded machine the restart alone can take longer than 6 s).
                while (not stop_at or time.monotonic() < stop_at[0] or after_kill < 3) and time.monotonic() < deadline:
                    t0 = time.monotonic()
                    after_kill += bool(stop_at)
                    path = "/v1/solve" if i % 3 == 2 else "/v1/prompt"
                    try:
                        r = await c.post(path, json={"question": f"k{w}-{i}: 5 + {i}?"})
                        out.append((r.status_code, time.monotonic() - t0, r.text[:200]))
                    except httpx.HTTPError as e:
                        out.append((-1, time.monotonic() - t0, repr(e)))
                    i += 1
                return out

            async def killer() -> None:
                await asyncio.sleep(1.0)
                ray.kill(ray.get_actor(alive[0], namespace="serve"), no_restart=True)
                stop_at.append(time.monotonic() + 6.0)

            *outs, _ = await asyncio.gather(*(worker(w) for w in range(4)), killer())
            return [x for o in outs for x in o]

    t0 = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    failed = [r for r in results if r[0] != 200]
    assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:3]}"
    assert len(results) >= 12 and time.monotonic() < deadline  # 3+ requests per client after the kill, in time
    after = get_info(serve_client)
    assert after["replicas"]["prompt_model"] != before["replicas"]["prompt_model"]  # a new replica answers
    # the restarted replica came up with the published version, not the deployed one
    assert after["epoch"] == before["epoch"] and after["optimal_reward"] == before["optimal_reward"]
    assert after["adapter_version"] == before["adapter_version"]
    latencies = sorted(r[1] for r in results)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(f"replica kill: {len(results)} requests, 0 failed, p99 {p99:.2f} s, in {elapsed:.1f} s")
