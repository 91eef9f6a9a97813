"""The HTTP routes of cluster/serve/ingress.py on the echo app, and the metrics they export."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from serve_fixtures import REWARD_A, get_info


@pytest.mark.ray
def test_healthz_and_info(serve_client: httpx.Client, serve_runs: dict[str, Path]) -> None:
    r = serve_client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    info = get_info(serve_client)
    assert info["run_id"].startswith("run-a@")
    assert info["optimal_reward"] == REWARD_A
    assert info["validation_accuracy"] == 0.5
    assert info["adapter"] == "iter2" and info["adapter_version"].startswith("iter2@")
    assert info["adapter_id"] in info["loaded_adapters"] and len(info["loaded_adapters"]) == 1
    assert info["models"]["prompt_model"]["engine"] == "echo"
    assert info["models"]["target_model"]["shared_with_prompt_model"] is False
    assert info["batching"] == {"enabled": True, "max_batch_size": 32, "batch_wait_timeout_s": 0.02}
    assert serve_client.get("/docs").status_code == 200
    paths = serve_client.get("/openapi.json").json()["paths"]
    assert {"/v1/prompt", "/v1/solve", "/healthz", "/v1/info", "/v1/admin/reload"} <= set(paths)


@pytest.mark.ray
def test_prompt_returns_query_aware_prompts(serve_client: httpx.Client) -> None:
    q = "A baker has 12 trays with 7 rolls each. How many rolls?"
    r = serve_client.post("/v1/prompt", json={"question": q, "n": 3, "temperature": 0.5, "dataset": "gsm8k"})
    assert r.status_code == 200, r.text
    body = r.json()
    info = get_info(serve_client)
    assert len(body["prompts"]) == 3 and body["prompt"] == body["prompts"][0]
    # the echo prompt model returns its input: the question and t* went into Π's request
    assert q in body["prompt"] and REWARD_A in body["prompt"]
    assert body["run_id"] == info["run_id"]
    assert body["adapter_version"] == info["adapter_version"]
    assert body["optimal_reward_version"] == info["optimal_reward_version"]
    assert body["tokens"]["prompt"] > 0 and body["tokens"]["completion"] >= 3 * len(body["prompt"].split())
    assert body["warning"] is None
    r2 = serve_client.post("/v1/prompt", json={"question": q, "dataset": "svamp"})
    assert r2.status_code == 200 and "gsm8k" in r2.json()["warning"]


@pytest.mark.ray
def test_solve_returns_answer_and_extraction(serve_client: httpx.Client) -> None:
    from trprompt.grading import extract_answer

    q = "What is 19 + 23?"
    r = serve_client.post("/v1/solve", json={"question": q})
    assert r.status_code == 200, r.text
    body = r.json()
    assert REWARD_A in body["prompt"]
    # the echo target answers with "question + instruction"
    assert body["answer"].startswith(q) and body["prompt"] in body["answer"]
    assert body["extracted"] == extract_answer(body["answer"]) and body["extracted"] is not None
    roles = body["tokens_by_role"]
    assert roles["prompt_model"]["prompt"] > 0 and roles["target_model"]["completion"] > 0
    assert body["tokens"]["prompt"] == roles["prompt_model"]["prompt"] + roles["target_model"]["prompt"]
    assert get_info(serve_client)["stats"]["target_model"]["requests"] >= 1


@pytest.mark.ray
def test_custom_metrics_are_exported(serve_client: httpx.Client) -> None:
    """The ingress and model replicas export request, batch and token metrics to Ray's metrics agent."""
    import ray

    try:
        port = ray._private.worker.global_worker.node.metrics_export_port
    except Exception:  # private API moved: nothing to check against
        pytest.skip("no metrics export port")
    assert serve_client.post("/v1/prompt", json={"question": "Metrics?"}).status_code == 200
    assert serve_client.post("/v1/prompt", json={"question": " "}).status_code == 422
    wanted = ['trprompt_serve_requests_total{', 'route="/v1/prompt"', 'status="422"', 'status="200"',
              "trprompt_serve_batch_size_bucket", "trprompt_serve_request_latency_s_bucket",
              'trprompt_serve_tokens_total{', 'role="prompt_model"', "trprompt_serve_engine_calls_total"]
    text = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(1.0)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
