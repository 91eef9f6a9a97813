"""The Ray Serve endpoint (cluster/serve_app.py) end to end over loopback HTTP.

One Serve instance per module on a free 127.0.0.1 port. The main app serves a run
whose engines are the deterministic echo engine (so the prompt model "writes" back
its own input and the tests can see which t* it was given) with a real peft adapter
on disk; a second app serves the tiny random Llama with real LoRA adapters.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

import fixtures_run
import httpx
import pytest
from fixtures_run import make_lora_adapter, make_run_dir

REWARD_A = "ALPHA feedback: the instruction names every quantity and asks for a final number 7."
REWARD_B = "BRAVO feedback: the instruction warns about the step most likely to go wrong, answer 9."
ECHO_APP = "trp-echo"
HF_APP = "trp-hf"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    return {
        "a": make_run_dir(root / "run-a", tiny_model_dir, "echo", REWARD_A, iteration=2, accuracy=0.5,
                          adapter_seed=1, separate_target=True),
        "b": make_run_dir(root / "run-b", tiny_model_dir, "echo", REWARD_B, iteration=3, accuracy=0.625,
                          adapter_seed=2, separate_target=True),
    }


@pytest.fixture(scope="module")
def base_url(ray_session: Any, runs: dict[str, Path]) -> Any:
    import ray
    from ray import serve

    from cluster.serve_app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # the engines are echo engines that take 0.3 s per call, shipped to the replicas by value
    ray.cloudpickle.register_pickle_by_value(fixtures_run)
    app = build_app({"run_dir": str(runs["a"]), "max_batch_size": 32, "batch_wait_timeout_s": 0.02,
                     "health_check_period_s": 1.0, "sync_interval_s": 0.5, "request_timeout_s": 30.0,
                     "num_cpus": 0.25, "engine_factory": fixtures_run.slow_echo_engine})
    serve.run(app, name=ECHO_APP, route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture()
def client(base_url: str) -> Any:
    with httpx.Client(base_url=base_url, timeout=30.0) as c:
        yield c


def _info(client: httpx.Client, prefix: str = "") -> dict[str, Any]:
    r = client.get(f"{prefix}/v1/info")
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------- pure unit checks


def test_error_mapping_is_json_and_never_leaks_unencodable_text() -> None:
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from cluster.serve_app import clean_validation_errors, map_exception

    cases = {RuntimeError("engine exploded"): 500, TimeoutError(): 504, BackPressureError(num_queued_requests=9,
             max_queued_requests=8): 503, ActorDiedError(): 503}
    for exc, status in cases.items():
        resp = map_exception(exc)
        assert resp.status_code == status
        body = json.loads(bytes(resp.body))
        assert body["error"] and body["message"]
    details = clean_validation_errors([{"loc": ("body", "\udc80" * 500), "msg": "x", "type": "extra_forbidden",
                                        "input": "\ud800"}])
    json.dumps(details).encode("utf-8")  # must not raise
    assert "input" not in details[0] and len(details[0]["loc"][1]) < 100


def test_run_spec_reads_the_run_dir(runs: dict[str, Path]) -> None:
    from cluster.serve_app import RunDirError, RunSpec, reward_hash

    a, b = RunSpec.from_run_dir(runs["a"]), RunSpec.from_run_dir(runs["b"])
    assert a.adapter_name == "iter2" and Path(a.adapter_path or "").name == "adapter"
    assert a.optimal_reward == REWARD_A and a.reward_version == reward_hash(REWARD_A)
    assert a.val_accuracy == 0.5 and b.val_accuracy == 0.625
    assert a.adapter_version != b.adapter_version  # different weights, different content hash
    with pytest.raises(RunDirError):
        RunSpec.from_run_dir(runs["a"] / "iter_2")


# ------------------------------------------------------------------------------------ happy paths


@pytest.mark.ray
def test_healthz_and_info(client: httpx.Client, runs: dict[str, Path]) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    info = _info(client)
    assert info["run_id"].startswith("run-a@")
    assert info["optimal_reward"] == REWARD_A
    assert info["validation_accuracy"] == 0.5
    assert info["adapter"] == "iter2" and info["adapter_version"].startswith("iter2@")
    assert info["adapter_id"] in info["loaded_adapters"] and len(info["loaded_adapters"]) == 1
    assert info["models"]["prompt_model"]["engine"] == "echo"
    assert info["models"]["target_model"]["shared_with_prompt_model"] is False
    assert info["batching"] == {"enabled": True, "max_batch_size": 32, "batch_wait_timeout_s": 0.02}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/prompt", "/v1/solve", "/healthz", "/v1/info", "/v1/admin/reload"} <= set(paths)


@pytest.mark.ray
def test_prompt_returns_query_aware_prompts(client: httpx.Client) -> None:
    q = "A baker has 12 trays with 7 rolls each. How many rolls?"
    r = client.post("/v1/prompt", json={"question": q, "n": 3, "temperature": 0.5, "dataset": "gsm8k"})
    assert r.status_code == 200, r.text
    body = r.json()
    info = _info(client)
    assert len(body["prompts"]) == 3 and body["prompt"] == body["prompts"][0]
    # the echo prompt model returns its input: the question and t* went into Π's request
    assert q in body["prompt"] and REWARD_A in body["prompt"]
    assert body["run_id"] == info["run_id"]
    assert body["adapter_version"] == info["adapter_version"]
    assert body["optimal_reward_version"] == info["optimal_reward_version"]
    assert body["tokens"]["prompt"] > 0 and body["tokens"]["completion"] >= 3 * len(body["prompt"].split())
    assert body["warning"] is None
    r2 = client.post("/v1/prompt", json={"question": q, "dataset": "svamp"})
    assert r2.status_code == 200 and "gsm8k" in r2.json()["warning"]


@pytest.mark.ray
def test_solve_returns_answer_and_extraction(client: httpx.Client) -> None:
    from trprompt.grading import extract_answer

    q = "What is 19 + 23?"
    r = client.post("/v1/solve", json={"question": q})
    assert r.status_code == 200, r.text
    body = r.json()
    assert REWARD_A in body["prompt"]
    # the echo target answers with "question + instruction"
    assert body["answer"].startswith(q) and body["prompt"] in body["answer"]
    assert body["extracted"] == extract_answer(body["answer"]) and body["extracted"] is not None
    roles = body["tokens_by_role"]
    assert roles["prompt_model"]["prompt"] > 0 and roles["target_model"]["completion"] > 0
    assert body["tokens"]["prompt"] == roles["prompt_model"]["prompt"] + roles["target_model"]["prompt"]
    assert _info(client)["stats"]["target_model"]["requests"] >= 1


# -------------------------------------------------------------------------------------- batching


async def _concurrent_prompts(base_url: str, n: int, prefix: str = "") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as c:
        return await asyncio.gather(*(c.post(f"{prefix}/v1/prompt", json={"question": f"Question {i}: 3 + {i}?"})
                                      for i in range(n)))


@pytest.mark.ray
def test_concurrent_requests_are_batched(client: httpx.Client, base_url: str) -> None:
    n = 24
    before = _info(client)["stats"]["prompt_model"]
    responses = asyncio.run(_concurrent_prompts(base_url, n))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for i, r in enumerate(responses):
        assert f"Question {i}: 3 + {i}?" in r.json()["prompt"]  # each reply belongs to its request
    after = _info(client)["stats"]["prompt_model"]
    calls = after["engine_calls"] - before["engine_calls"]
    assert after["requests"] - before["requests"] == n
    # each engine call takes 0.3 s: whatever arrives meanwhile must become ONE next call, not a
    # string of small ones formed every batch_wait_timeout_s (20 ms)
    assert 1 <= calls <= 4, f"{n} concurrent requests took {calls} engine calls: {after['batch_sizes']}"
    assert after["max_batch_size_seen"] >= n // 3


async def _trickle(base_url: str, n: int, gap_s: float) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as c:

        async def one(i: int) -> httpx.Response:
            await asyncio.sleep(i * gap_s)
            return await c.post("/v1/prompt", json={"question": f"Trickle {i}: 2 * {i}?"})

        return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.ray
def test_requests_arriving_during_an_engine_call_share_the_next_one(client: httpx.Client, base_url: str) -> None:
    """A steady trickle (one request per 60 ms, slower than the 20 ms batch window) while calls take 0.3 s.

    Serve's batcher alone would hand each of these to the engine as its own batch,
    queued behind the running call; the batch gate makes them wait and share a call.
    """
    n = 12
    before = _info(client)["stats"]["prompt_model"]
    responses = asyncio.run(_trickle(base_url, n, gap_s=0.06))
    assert all(r.status_code == 200 for r in responses)
    after = _info(client)["stats"]["prompt_model"]
    calls = after["engine_calls"] - before["engine_calls"]
    assert after["requests"] - before["requests"] == n
    assert calls <= 6, f"{n} trickled requests took {calls} engine calls: {after['batch_sizes']}"


# ----------------------------------------------------------------------------------- bad input


def _bad_requests(seed: int, count: int, max_chars: int) -> list[dict[str, Any]]:
    """Seeded junk: wrong types, unknown fields, bad lengths, bad encodings, broken JSON, wrong routes."""
    rng = random.Random(seed)
    junk_values: list[Any] = [None, True, False, 0, -1, 3.5, 10**30, "", " ", [], {}, ["q"], {"q": 1}, "x" * 50]

    def junk() -> Any:
        return rng.choice(junk_values)

    def ok_q() -> str:
        return f"What is {rng.randint(1, 99)} + {rng.randint(1, 99)}?"

    makers: list[Any] = [
        lambda: {"json": {"question": rng.choice([None, 1, 2.5, True, [], {}, ["a"], {"t": "x"}])}},
        lambda: {"json": {"question": rng.choice(["", " ", "\n\t ", "\u3000", "\u00a0\r\n"])}},
        lambda: {"json": {"question": "y" * rng.randint(max_chars + 1, max_chars * 3)}},
        lambda: {"json": {"question": ok_q(), "n": rng.choice([0, -3, 9, 100, 10**20, "2", 2.0, 1.5, True, None])}},
        lambda: {"json": {"question": ok_q(), "temperature": rng.choice([-0.01, 2.01, 1e9, "0.5", True, [], {}])}},
        lambda: {"json": {"question": ok_q(), "dataset": rng.choice([1, "gsm9k", "x" * 40, [], "MATH"])}},
        lambda: {"json": {"question": ok_q(), "".join(rng.choices("abcdefgh_", k=rng.randint(1, 12))) + "_x": junk()}},
        lambda: {"json": {"prompt": ok_q()}},
        lambda: {"json": rng.choice([[], ["question"], "question", 42, None, True])},
        lambda: {"json": {}},
        lambda: {"content": bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))) + b"\xff\xfe"},
        lambda: {"content": json.dumps({"question": ok_q()}).encode()[: rng.randint(0, 12)] or b"{"},
        lambda: {"content": b'{"question": "\\ud800 lone surrogate"}'},
        lambda: {"content": b'{"question": "ok?", "\\udc80\\udc81": 1}'},
        lambda: {"content": b'{"question": "ok?", "temperature": ' + rng.choice([b"NaN", b"Infinity", b"-Infinity"])
                 + b"}"},
        lambda: {"content": "{\"question\": \"caf\u00e9?\"}".encode("latin-1")},
        lambda: {"content": b"[" * rng.randint(1000, 30000)},
        lambda: {"content": b'{"question": "a", "question": 5}'},
        lambda: {"content": b'{"question": "ok?"}', "content_type": rng.choice(["text/plain", "application/xml",
                                                                                 "multipart/form-data"])},
        lambda: {"content": b"x" * rng.randint(300_000, 400_000)},
        lambda: {"method": "GET"},
        lambda: {"method": "POST", "path": rng.choice(["/v1/promptx", "/v2/prompt", "/v1/info", "/healthz",
                                                       "/v1/../etc/passwd"])},
        lambda: {"path": "/v1/admin/reload", "json": rng.choice([{}, {"run_dir": 3}, {"run_dir": "/nonexistent/x"},
                                                                 {"adapter_path": "/tmp"}, {"run_dir": ""},
                                                                 {"run_dir": "/tmp", "optimal_reward": "x"},
                                                                 {"optimal_reward": ""}, {"junk": 1}])},
    ]
    out = []
    for _ in range(count):
        case = rng.choice(makers)()
        case.setdefault("path", rng.choice(["/v1/prompt", "/v1/solve"]))
        case.setdefault("method", "POST")
        out.append(case)
    return out


async def _send_all(base_url: str, cases: list[dict[str, Any]], concurrency: int = 16) -> list[tuple[int, Any]]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)

    async with httpx.AsyncClient(base_url=base_url, timeout=30.0, limits=limits) as c:

        async def one(case: dict[str, Any]) -> tuple[int, Any]:
            async with sem:
                headers = {}
                if "content" in case:
                    headers["content-type"] = case.get("content_type", "application/json")
                r = await c.request(case["method"], case["path"], json=case.get("json"),
                                    content=case.get("content"), headers=headers)
                try:
                    body = r.json()
                except ValueError:
                    body = r.text
                return r.status_code, body

        return await asyncio.gather(*(one(c_) for c_ in cases))


@pytest.mark.ray
def test_a_thousand_bad_requests_get_4xx_json_and_never_reach_the_engine(client: httpx.Client,
                                                                         base_url: str) -> None:
    before = _info(client)
    cases = _bad_requests(seed=1234, count=1100, max_chars=before["limits"]["max_question_chars"])
    t0 = time.perf_counter()
    results = asyncio.run(_send_all(base_url, cases))
    elapsed = time.perf_counter() - t0
    bad = [(c, s, b) for c, (s, b) in zip(cases, results, strict=True) if not 400 <= s < 500]
    assert not bad, f"{len(bad)} non-4xx answers, e.g. {str(bad[0])[:500]}"
    not_json = [(c, b) for c, (s, b) in zip(cases, results, strict=True) if not (isinstance(b, dict) and "error" in b)]
    assert not not_json, f"{len(not_json)} non-JSON error bodies, e.g. {str(not_json[0])[:300]}"
    statuses = {s for s, _ in results}
    assert {400, 404, 405, 413, 422} <= statuses, statuses
    after = _info(client)
    for role in ("prompt_model", "target_model"):
        assert after["stats"][role]["requests"] == before["stats"][role]["requests"], "bad input reached an engine"
    assert after["epoch"] == before["epoch"]  # no junk reload went through
    r = client.post("/v1/prompt", json={"question": "Still fine after the junk?"})
    assert r.status_code == 200 and "Still fine after the junk?" in r.json()["prompt"]
    print(f"fuzz: {len(cases)} bad requests in {elapsed:.1f} s, statuses {sorted(statuses)}")


@pytest.mark.ray
def test_custom_metrics_are_exported(client: httpx.Client) -> None:
    """The ingress and model replicas export request, batch and token metrics to Ray's metrics agent."""
    import ray

    try:
        port = ray._private.worker.global_worker.node.metrics_export_port
    except Exception:  # private API moved: nothing to check against
        pytest.skip("no metrics export port")
    assert client.post("/v1/prompt", json={"question": "Metrics?"}).status_code == 200
    assert client.post("/v1/prompt", json={"question": " "}).status_code == 422
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


# -------------------------------------------------------------------------------------- hot swap


async def _load_while(base_url: str, workers: int, action: Any, tail_s: float = 0.5) -> tuple[list[Any], Any]:
    """Run ``workers`` clients sending /v1/prompt back to back until ``action`` (a coroutine fn) ends."""
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as c:

        async def worker(w: int) -> list[Any]:
            seen = []
            i = 0
            while not done.is_set():
                r = await c.post("/v1/prompt", json={"question": f"w{w} q{i}: what is {i} * 2?"})
                seen.append((r.status_code, r.json()))
                i += 1
            return seen

        async def driver() -> Any:
            await asyncio.sleep(0.3)
            try:
                return await action(c)
            finally:
                await asyncio.sleep(tail_s)
                done.set()

        *streams, result = await asyncio.gather(*(worker(w) for w in range(workers)), driver())
    return [x for s in streams for x in s], result


@pytest.mark.ray
def test_hot_swap_keeps_serving_and_switches_version(client: httpx.Client, base_url: str,
                                                     runs: dict[str, Path], tmp_path: Path) -> None:
    from cluster.serve_app import write_base_run

    old = _info(client)
    # bad reloads first: nothing changes
    assert client.post("/v1/admin/reload", json={"run_dir": str(tmp_path / "nope")}).status_code == 422
    other = write_base_run(tmp_path / "other-base", {"model": "some-other-model", "engine": "echo"})
    r = client.post("/v1/admin/reload", json={"run_dir": str(other)})
    assert r.status_code == 409 and r.json()["error"] == "base_model_mismatch"
    assert _info(client)["epoch"] == old["epoch"]

    async def reload(c: httpx.AsyncClient) -> httpx.Response:
        return await c.post("/v1/admin/reload", json={"run_dir": str(runs["b"])})

    seen, resp = asyncio.run(_load_while(base_url, workers=6, action=reload))
    assert resp.status_code == 200, resp.text
    assert resp.json()["published"] is True
    assert len(seen) >= 6
    assert all(s == 200 for s, _ in seen), [b for s, b in seen if s != 200][:3]
    versions = {b["adapter_version"] for _, b in seen}
    assert versions <= {old["adapter_version"], resp.json()["current"]["adapter_version"]}

    new = _info(client)
    assert new["epoch"] > old["epoch"]
    assert new["optimal_reward"] == REWARD_B and new["validation_accuracy"] == 0.625
    assert new["adapter"] == "iter3" and new["adapter_version"] != old["adapter_version"]
    assert new["adapter_id"] != old["adapter_id"]
    assert new["loaded_adapters"] == [new["adapter_id"]]  # the old adapter was unloaded
    p = client.post("/v1/prompt", json={"question": "After the swap?"}).json()
    assert REWARD_B in p["prompt"] and REWARD_A not in p["prompt"]
    assert p["adapter_version"] == new["adapter_version"] and p["epoch"] == new["epoch"]


# -------------------------------------------------------------------------------- replica failure


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
def test_killed_replica_is_restarted_and_clients_recover(client: httpx.Client, base_url: str) -> None:
    import ray

    before = _info(client)
    alive = _replica_actor_names(ECHO_APP, "PromptModel")
    assert len(alive) == 1, alive

    async def run() -> list[tuple[int, int]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as c:

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
    after = _info(client)
    assert after["replicas"]["prompt_model"] != before["replicas"]["prompt_model"]  # a new replica answers
    # the restarted replica came up with the hot-swapped version, not the deployed one
    assert after["epoch"] == before["epoch"] and after["optimal_reward"] == before["optimal_reward"]
    assert after["adapter_version"] == before["adapter_version"]
    print(f"replica kill: {len(results)} requests ok in {elapsed:.1f} s, "
          f"{sum(a > 1 for _, a in results)} needed a retry")


@pytest.mark.ray
def test_reload_reaches_every_replica(base_url: str, runs: dict[str, Path]) -> None:
    """With two PromptModel replicas, the one that reloads publishes; the other adopts the version."""
    from ray import serve

    from cluster.serve_app import build_app

    app = "trp-multi"
    serve.run(build_app({"run_dir": str(runs["a"]), "min_replicas": 2, "max_replicas": 2, "with_target": False,
                         "sync_interval_s": 0.3, "num_cpus": 0.1}), name=app, route_prefix="/multi", blocking=False)
    try:
        with httpx.Client(base_url=f"{base_url}/multi", timeout=30.0) as c:
            r = c.post("/v1/admin/reload", json={"run_dir": str(runs["b"])})
            assert r.status_code == 200, r.text
            epoch = r.json()["epoch"]
            seen: dict[str, tuple[int, str, list[str]]] = {}
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                info = _info(c)
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


# ------------------------------------------------------------------------- the tiny model for real


@pytest.mark.ray
def test_tiny_llama_with_real_lora_adapters(base_url: str, tmp_path_factory: pytest.TempPathFactory,
                                            tiny_model_dir: Path) -> None:
    from ray import serve

    from cluster.serve_app import build_app

    root = tmp_path_factory.mktemp("hf-runs")
    run_c = make_run_dir(root / "run-c", tiny_model_dir, "hf", "CHARLIE reward", iteration=1, adapter_seed=3)
    run_d = make_run_dir(root / "run-d", tiny_model_dir, "hf", "DELTA reward", iteration=2, adapter_seed=4)
    serve.run(build_app({"run_dir": str(run_c), "max_batch_size": 8, "batch_wait_timeout_s": 0.05,
                         "num_cpus": 0.25, "request_timeout_s": 60.0}),
              name=HF_APP, route_prefix="/hf", blocking=False)
    try:
        with httpx.Client(base_url=base_url, timeout=60.0) as c:
            info = _info(c, "/hf")
            assert info["models"]["prompt_model"]["engine"] == "hf"
            assert info["models"]["target_model"]["shared_with_prompt_model"] is True
            r = c.post("/hf/v1/prompt", json={"question": "What is 6 * 7?", "n": 2, "temperature": 0.8})
            assert r.status_code == 200, r.text
            assert len(r.json()["prompts"]) == 2 and r.json()["tokens"]["prompt"] > 10
            s = c.post("/hf/v1/solve", json={"question": "What is 6 * 7?"})
            assert s.status_code == 200, s.text
            assert s.json()["tokens_by_role"]["target_model"]["prompt"] > 0
            assert _info(c, "/hf")["stats"]["target_model"]["requests"] >= 1

            # real generation takes time: requests arriving meanwhile must wait and form ONE next batch
            before = _info(c, "/hf")["stats"]["prompt_model"]
            responses = asyncio.run(_concurrent_prompts(base_url, 12, prefix="/hf"))
            assert all(r.status_code == 200 for r in responses)
            after = _info(c, "/hf")["stats"]["prompt_model"]
            calls = after["engine_calls"] - before["engine_calls"]
            assert after["requests"] - before["requests"] == 12 and calls <= 4, after["batch_sizes"]

            async def reload(ac: httpx.AsyncClient) -> httpx.Response:
                return await ac.post("/v1/admin/reload", json={"run_dir": str(run_d)})

            seen, resp = asyncio.run(_load_while(f"{base_url}/hf", workers=4, action=reload, tail_s=0.2))
            assert resp.status_code == 200, resp.text
            assert seen and all(st == 200 for st, _ in seen), [b for st, b in seen if st != 200][:3]
            after = _info(c, "/hf")
            assert after["optimal_reward"] == "DELTA reward" and after["adapter"] == "iter2"
            assert after["loaded_adapters"] == [after["adapter_id"]]

            # adapter + t* without a run dir
            extra = make_lora_adapter(tiny_model_dir, root / "extra" / "adapter", seed=5)
            r = c.post("/hf/v1/admin/reload", json={"adapter_path": str(extra), "optimal_reward": "ECHO reward"})
            assert r.status_code == 200, r.text
            after2 = _info(c, "/hf")
            assert after2["optimal_reward"] == "ECHO reward" and after2["epoch"] > after["epoch"]
            assert after2["loaded_adapters"] == [after2["adapter_id"]]

            # an adapter that does not load: 4xx, and the old version keeps serving
            broken = root / "broken"
            broken.mkdir()
            (broken / "adapter_config.json").write_text("{not json")
            r = c.post("/hf/v1/admin/reload", json={"adapter_path": str(broken)})
            assert r.status_code == 422 and r.json()["error"] == "reload_failed", r.text
            assert _info(c, "/hf")["adapter_id"] == after2["adapter_id"]
            assert c.post("/hf/v1/prompt", json={"question": "Still alive?"}).status_code == 200
    finally:
        serve.delete(HF_APP)
