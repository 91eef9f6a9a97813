"""The tiny random Llama with real LoRA adapters behind the Serve app (hf engine end to end)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fixtures_run import make_lora_adapter, make_run_dir
from serve_fixtures import ADMIN, ADMIN_TOKEN, HF_APP, concurrent_prompts, get_info, load_while


@pytest.mark.ray
def test_tiny_llama_with_real_lora_adapters(serve_url: str, tmp_path_factory: pytest.TempPathFactory,
                                            tiny_model_dir: Path) -> None:
    from ray import serve

    from cluster.serve.app import build_app

    root = tmp_path_factory.mktemp("hf-runs")
    run_c = make_run_dir(root / "run-c", tiny_model_dir, "hf", "CHARLIE reward", iteration=1, adapter_seed=3)
    run_d = make_run_dir(root / "run-d", tiny_model_dir, "hf", "DELTA reward", iteration=2, adapter_seed=4)
    serve.run(build_app({"run_dir": str(run_c), "max_batch_size": 8, "batch_wait_timeout_s": 0.05,
                         "num_cpus": 0.25, "request_timeout_s": 60.0, "admin_token": ADMIN_TOKEN,
                         "run_roots": [str(root)], "allow_reward_text": True, "rate_limit_per_s": 0}),
              name=HF_APP, route_prefix="/hf", blocking=False)
    try:
        with httpx.Client(base_url=serve_url, timeout=60.0, headers=ADMIN) as c:
            info = get_info(c, "/hf")
            assert info["models"]["prompt_model"]["engine"] == "hf"
            assert info["models"]["target_model"]["shared_with_prompt_model"] is True
            r = c.post("/hf/v1/prompt", json={"question": "What is 6 * 7?", "n": 2, "temperature": 0.8})
            assert r.status_code == 200, r.text
            assert len(r.json()["prompts"]) == 2 and r.json()["tokens"]["prompt"] > 10
            s = c.post("/hf/v1/solve", json={"question": "What is 6 * 7?"})
            assert s.status_code == 200, s.text
            assert s.json()["tokens_by_role"]["target_model"]["prompt"] > 0
            assert get_info(c, "/hf")["stats"]["target_model"]["requests"] >= 1

            # real generation takes time: requests arriving meanwhile must wait and form ONE next batch
            before = get_info(c, "/hf")["stats"]["prompt_model"]
            responses = asyncio.run(concurrent_prompts(serve_url, 12, prefix="/hf"))
            assert all(r.status_code == 200 for r in responses)
            after = get_info(c, "/hf")["stats"]["prompt_model"]
            calls = after["engine_calls"] - before["engine_calls"]
            assert after["requests"] - before["requests"] == 12 and calls <= 4, after["batch_sizes"]

            async def reload(ac: httpx.AsyncClient) -> httpx.Response:
                return await ac.post("/v1/admin/reload", json={"run_dir": str(run_d)})

            seen, resp = asyncio.run(load_while(f"{serve_url}/hf", workers=4, action=reload, tail_s=0.2))
            assert resp.status_code == 200, resp.text
            assert seen and all(st == 200 for st, _ in seen), [b for st, b in seen if st != 200][:3]
            after = get_info(c, "/hf")
            assert after["optimal_reward"] == "DELTA reward" and after["adapter"] == "iter2"
            assert after["loaded_adapters"] == [after["adapter_id"]]

            # adapter + t* without a run dir
            extra = make_lora_adapter(tiny_model_dir, root / "extra" / "adapter", seed=5)
            r = c.post("/hf/v1/admin/reload", json={"adapter_path": str(extra), "optimal_reward": "ECHO reward"})
            assert r.status_code == 200, r.text
            after2 = get_info(c, "/hf")
            assert after2["optimal_reward"] == "ECHO reward" and after2["epoch"] > after["epoch"]
            assert after2["loaded_adapters"] == [after2["adapter_id"]]

            # an adapter that does not load: 4xx, and the old version keeps serving
            broken = root / "broken"
            broken.mkdir()
            (broken / "adapter_config.json").write_text("{not json")
            r = c.post("/hf/v1/admin/reload", json={"adapter_path": str(broken)})
            assert r.status_code == 422 and r.json()["error"] == "reload_failed", r.text
            assert get_info(c, "/hf")["adapter_id"] == after2["adapter_id"]
            assert c.post("/hf/v1/prompt", json={"question": "Still alive?"}).status_code == 200
    finally:
        serve.delete(HF_APP)
