"""Shared fixtures of the serving tests (tests/test_serve_*.py), loaded by tests/conftest.py.

One Serve instance per test session on a free 127.0.0.1 port. The main app serves a run
whose engines are the deterministic echo engine (so the prompt model "writes" back its
own input and the tests can see which t* it was given) with a real peft adapter on disk.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import fixtures_run
import httpx
import pytest
from fixtures_run import make_run_dir

REWARD_A = "ALPHA feedback: the instruction names every quantity and asks for a final number 7."
REWARD_B = "BRAVO feedback: the instruction warns about the step most likely to go wrong, answer 9."
ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ECHO_APP = "trp-echo"
HF_APP = "trp-hf"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def serve_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runs root the echo app may reload from."""
    return tmp_path_factory.mktemp("serve-runs")


@pytest.fixture(scope="session")
def serve_runs(serve_root: Path, tiny_model_dir: Path) -> dict[str, Path]:
    """Two finished echo-engine runs (different adapters and t*) under the runs root."""
    root = serve_root
    return {
        "a": make_run_dir(root / "run-a", tiny_model_dir, "echo", REWARD_A, iteration=2, accuracy=0.5,
                          adapter_seed=1, separate_target=True),
        "b": make_run_dir(root / "run-b", tiny_model_dir, "echo", REWARD_B, iteration=3, accuracy=0.625,
                          adapter_seed=2, separate_target=True),
    }


@pytest.fixture(scope="session")
def serve_url(ray_session: Any, serve_runs: dict[str, Path], serve_root: Path) -> Any:
    """Base URL of the echo app (Serve started once for every serving test)."""
    import ray
    from ray import serve

    from cluster.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # the engines are echo engines that take 0.3 s per call, shipped to the replicas by value
    ray.cloudpickle.register_pickle_by_value(fixtures_run)
    app = build_app({"run_dir": str(serve_runs["a"]), "max_batch_size": 32, "batch_wait_timeout_s": 0.02,
                     "health_check_period_s": 1.0, "sync_interval_s": 0.5, "request_timeout_s": 30.0,
                     "num_cpus": 0.25, "engine_factory": fixtures_run.slow_echo_engine,
                     "admin_token": ADMIN_TOKEN, "run_roots": [str(serve_root)], "rate_limit_per_s": 0})
    serve.run(app, name=ECHO_APP, route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture()
def serve_client(serve_url: str) -> Any:
    """An httpx client on the echo app that sends the admin token."""
    with httpx.Client(base_url=serve_url, timeout=30.0, headers=ADMIN) as c:
        yield c


def get_info(client: httpx.Client, prefix: str = "") -> dict[str, Any]:
    """``GET /v1/info`` (asserting 200)."""
    r = client.get(f"{prefix}/v1/info")
    assert r.status_code == 200, r.text
    return r.json()


async def concurrent_prompts(base_url: str, n: int, prefix: str = "") -> list[httpx.Response]:
    """``n`` concurrent /v1/prompt requests with distinct questions."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as c:
        return await asyncio.gather(*(c.post(f"{prefix}/v1/prompt", json={"question": f"Question {i}: 3 + {i}?"})
                                      for i in range(n)))


async def load_while(base_url: str, workers: int, action: Any, tail_s: float = 0.5) -> tuple[list[Any], Any]:
    """Run ``workers`` clients sending /v1/prompt back to back until ``action`` (a coroutine fn) ends."""
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0, headers=ADMIN) as c:

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


SECURE_PREFIX = "/secure"
API_KEY = "sk-test-key-for-the-secure-app"


@pytest.fixture(scope="session")
def secure_app(serve_url: str, serve_runs: dict[str, Path], serve_root: Path,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A second app on the same Serve instance with the secure defaults: generated admin token, API key, limits.

    Returns its URL, the token file and the token. Its rate limit (burst 20, then one request
    per 5 s) and queue bound (4 requests) are small enough to test; tests that are not about
    them send from their own loopback address (127.0.0.x) so they do not share a bucket. The
    refill is slow on purpose: at 5/s a loaded CI machine answering a request every 200 ms
    or slower refilled the bucket as fast as the test drained it, and the 429 never came.
    """
    from ray import serve

    from cluster.serve.app import build_app

    token_file = tmp_path_factory.mktemp("secrets") / "admin-token"
    app = build_app({"run_dir": str(serve_runs["a"]), "with_target": True, "num_cpus": 0.1, "max_batch_size": 4,
                     "batch_wait_timeout_s": 0.01, "engine_factory": fixtures_run.slow_echo_engine,
                     "admin_token_file": str(token_file), "api_key": API_KEY, "run_roots": [str(serve_root)],
                     "rate_limit_per_s": 0.2, "rate_limit_burst": 20, "max_pending_requests": 4,
                     "request_timeout_s": 30.0})
    serve.run(app, name="trp-secure", route_prefix=SECURE_PREFIX, blocking=False)
    yield {"url": f"{serve_url}{SECURE_PREFIX}", "token_file": token_file,
           "token": token_file.read_text().strip()}
    serve.delete("trp-secure")


def client_from(url: str, address: str, **kwargs: Any) -> httpx.Client:
    """An httpx client whose requests come from loopback ``address`` (its own rate-limit bucket)."""
    return httpx.Client(base_url=url, timeout=30.0, transport=httpx.HTTPTransport(local_address=address), **kwargs)
