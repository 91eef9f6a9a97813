"""Hot swap and the published version (cluster/serve/versions.py, deployments.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from serve_fixtures import ADMIN, ADMIN_TOKEN, REWARD_A, REWARD_B, get_info, load_while


@pytest.mark.ray
def test_hot_swap_keeps_serving_and_switches_version(serve_client: httpx.Client, serve_url: str,
                                                     serve_runs: dict[str, Path], serve_root: Path,
                                                     tmp_path: Path) -> None:
    from cluster.serve.run_spec import write_base_run

    old = get_info(serve_client)
    # bad reloads first: nothing changes
    assert serve_client.post("/v1/admin/reload", json={"run_dir": str(serve_root / "nope")}).status_code == 422
    assert serve_client.post("/v1/admin/reload", json={"run_dir": str(tmp_path / "nope")}).status_code == 403
    other = write_base_run(serve_root / "other-base", {"model": "some-other-model", "engine": "echo"})
    r = serve_client.post("/v1/admin/reload", json={"run_dir": str(other)})
    assert r.status_code == 409 and r.json()["error"] == "base_model_mismatch"
    assert get_info(serve_client)["epoch"] == old["epoch"]

    async def reload(c: httpx.AsyncClient) -> httpx.Response:
        return await c.post("/v1/admin/reload", json={"run_dir": str(serve_runs["b"])})

    seen, resp = asyncio.run(load_while(serve_url, workers=6, action=reload))
    assert resp.status_code == 200, resp.text
    assert resp.json()["published"] is True
    assert len(seen) >= 6
    assert all(s == 200 for s, _ in seen), [b for s, b in seen if s != 200][:3]
    versions = {b["adapter_version"] for _, b in seen}
    assert versions <= {old["adapter_version"], resp.json()["current"]["adapter_version"]}

    new = get_info(serve_client)
    assert new["epoch"] > old["epoch"]
    assert new["optimal_reward"] == REWARD_B and new["validation_accuracy"] == 0.625
    assert new["adapter"] == "iter3" and new["adapter_version"] != old["adapter_version"]
    assert new["adapter_id"] != old["adapter_id"]
    assert new["loaded_adapters"] == [new["adapter_id"]]  # the old adapter was unloaded
    p = serve_client.post("/v1/prompt", json={"question": "After the swap?"}).json()
    assert REWARD_B in p["prompt"] and REWARD_A not in p["prompt"]
    assert p["adapter_version"] == new["adapter_version"] and p["epoch"] == new["epoch"]


@pytest.mark.ray
def test_reload_reaches_every_replica(serve_url: str, serve_runs: dict[str, Path]) -> None:
    """With two PromptModel replicas, the one that reloads publishes; the other adopts the version."""
    from ray import serve

    from cluster.serve.app import build_app

    app = "trp-multi"
    serve.run(build_app({"run_dir": str(serve_runs["a"]), "min_replicas": 2, "max_replicas": 2, "with_target": False,
                         "sync_interval_s": 0.3, "num_cpus": 0.1, "admin_token": ADMIN_TOKEN,
                         "run_roots": [str(serve_runs["a"].parent)]}), name=app, route_prefix="/multi", blocking=False)
    try:
        with httpx.Client(base_url=f"{serve_url}/multi", timeout=30.0, headers=ADMIN) as c:
            r = c.post("/v1/admin/reload", json={"run_dir": str(serve_runs["b"])})
            assert r.status_code == 200, r.text
            epoch = r.json()["epoch"]
            seen: dict[str, tuple[int, str, list[str]]] = {}
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                info = get_info(c)
                seen[info["replicas"]["prompt_model"]] = (info["epoch"], info["optimal_reward"],
                                                          info["loaded_adapters"])
                if len(seen) == 2 and all(v[0] == epoch for v in seen.values()):
                    break
                time.sleep(0.1)
            assert len(seen) == 2, seen
            for replica, (e, reward, loaded) in seen.items():
                assert e == epoch and reward == REWARD_B, (replica, e, reward)
                assert len(loaded) == 1  # each replica unloaded its old adapter
    finally:
        serve.delete(app)
