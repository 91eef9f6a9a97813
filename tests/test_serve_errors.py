"""Error mapping (cluster/serve/errors.py) and bad input over HTTP (cluster/serve/ingress.py)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import httpx
import pytest
from serve_fixtures import get_info


def test_error_mapping_is_json_and_never_leaks_unencodable_text() -> None:
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from cluster.serve.errors import clean_validation_errors, map_exception

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


async def _send_all(serve_url: str, cases: list[dict[str, Any]], concurrency: int = 16) -> list[tuple[int, Any]]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)

    async with httpx.AsyncClient(base_url=serve_url, timeout=30.0, limits=limits) as c:

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
def test_a_thousand_bad_requests_get_4xx_json_and_never_reach_the_engine(serve_client: httpx.Client,
                                                                         serve_url: str) -> None:
    before = get_info(serve_client)
    cases = _bad_requests(seed=1234, count=1100, max_chars=before["limits"]["max_question_chars"])
    t0 = time.perf_counter()
    results = asyncio.run(_send_all(serve_url, cases))
    elapsed = time.perf_counter() - t0
    bad = [(c, s, b) for c, (s, b) in zip(cases, results, strict=True) if not 400 <= s < 500]
    assert not bad, f"{len(bad)} non-4xx answers, e.g. {str(bad[0])[:500]}"
    not_json = [(c, b) for c, (s, b) in zip(cases, results, strict=True) if not (isinstance(b, dict) and "error" in b)]
    assert not not_json, f"{len(not_json)} non-JSON error bodies, e.g. {str(not_json[0])[:300]}"
    statuses = {s for s, _ in results}
    assert {400, 404, 405, 413, 422} <= statuses, statuses
    after = get_info(serve_client)
    for role in ("prompt_model", "target_model"):
        assert after["stats"][role]["requests"] == before["stats"][role]["requests"], "bad input reached an engine"
    assert after["epoch"] == before["epoch"]  # no junk reload went through
    r = serve_client.post("/v1/prompt", json={"question": "Still fine after the junk?"})
    assert r.status_code == 200 and "Still fine after the junk?" in r.json()["prompt"]
    print(f"fuzz: {len(cases)} bad requests in {elapsed:.1f} s, statuses {sorted(statuses)}")
