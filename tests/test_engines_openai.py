"""OpenAIEngine (trprompt/engines/openai_engine.py) against a fake OpenAI/vLLM-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from test_engines_base import user

from trprompt.engines import AdapterNotFoundError, ChatRequest, SamplingParams


class FakeOpenAI:
    """State of a tiny OpenAI/vLLM-compatible server on 127.0.0.1."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.fail_next = 0
        self.adapters: set[str] = set()
        self.lock = threading.Lock()


def _handler(state: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, code: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.bodies.append({"path": self.path, **body})
                if state.fail_next > 0:
                    state.fail_next -= 1
                    return self._send(500, {"error": {"message": "boom", "type": "InternalServerError"}})
            if self.path == "/v1/load_lora_adapter":
                if body["lora_name"] in state.adapters:
                    return self._send(400, {"error": {"message": "The lora adapter is already loaded."}})
                state.adapters.add(body["lora_name"])
                return self._send(200, {"status": "ok"})
            if self.path == "/v1/unload_lora_adapter":
                if body["lora_name"] not in state.adapters:
                    return self._send(404, {"error": {"message": "The lora adapter cannot be found."}})
                state.adapters.discard(body["lora_name"])
                return self._send(200, {"status": "ok"})
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            model = body["model"]
            if model != "served-model" and model not in state.adapters:
                return self._send(404, {"error": {"message": f"The model `{model}` does not exist.", "code": 404}})
            question = body["messages"][-1]["content"]
            texts = [f"{model} says {question} #{i}" for i in range(body.get("n", 1))]
            prompt = sum(len(m["content"].split()) for m in body["messages"])
            return self._send(
                200,
                {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": model,
                    "choices": [
                        {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                        for i, t in enumerate(texts)
                    ],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": sum(len(t.split()) for t in texts),
                        "total_tokens": 0,
                    },
                },
            )

    return Handler


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    state = FakeOpenAI()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_engine_batch_order_params_and_usage(fake_server) -> None:
    from trprompt.engines.openai_engine import OpenAIEngine

    state, url = fake_server
    eng = OpenAIEngine("served-model", url, concurrency=4)
    sp = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=33, n=2, seed=4, stop=("\n\n",))
    reqs = [ChatRequest(user(f"question {i}"), sp) for i in range(10)]
    out = eng.generate(reqs)
    assert [r.texts[0] for r in out] == [f"served-model says question {i} #0" for i in range(10)]
    assert all(len(r.texts) == 2 and r.finish_reasons == ["stop", "stop"] for r in out)
    assert out[3].prompt_tokens == 2 and out[3].completion_tokens == 10
    body = state.bodies[0]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["n"], body["seed"], body["stop"]) == (
        0.7,
        0.9,
        33,
        2,
        4,
        ["\n\n"],
    )
    eng.generate([ChatRequest(user("x"))])
    assert "seed" not in state.bodies[-1] and "stop" not in state.bodies[-1]
    eng.close()


def test_openai_engine_retries_server_errors(fake_server) -> None:
    import openai

    from trprompt.engines.openai_engine import OpenAIEngine

    state, url = fake_server
    eng = OpenAIEngine("served-model", url, max_retries=2, backoff_s=0.01)
    state.fail_next = 1
    res = eng.generate([ChatRequest(user("retry me"))])[0]
    assert res.text == "served-model says retry me #0"
    assert len(state.bodies) == 2  # one 500, then success

    state.fail_next = 5
    with pytest.raises(openai.InternalServerError):
        eng.generate([ChatRequest(user("give up"))])
    assert len(state.bodies) == 2 + 3  # first try plus max_retries
    eng.close()


def test_openai_engine_connection_errors_are_retried_then_raised() -> None:
    import openai

    from trprompt.engines.openai_engine import OpenAIEngine

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = OpenAIEngine("m", f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_s=0.01, timeout_s=5)
    with pytest.raises(openai.APIConnectionError):
        eng.generate([ChatRequest(user("x"))])
    eng.close()


def test_openai_engine_adapters(fake_server) -> None:
    from trprompt.engines.openai_engine import OpenAIEngine

    state, url = fake_server
    eng = OpenAIEngine("served-model", url)
    with pytest.raises(AdapterNotFoundError):
        eng.generate([ChatRequest(user("q"), adapter="lora1")])
    eng.load_adapter("lora1", "/adapters/lora1")
    assert state.bodies[-1] == {"path": "/v1/load_lora_adapter", "lora_name": "lora1", "lora_path": "/adapters/lora1"}
    assert eng.generate([ChatRequest(user("q"), adapter="lora1")])[0].text == "lora1 says q #0"
    eng.load_adapter("lora1", "/adapters/lora1-v2")  # already loaded: replaced
    assert [b["path"] for b in state.bodies[-3:]] == [
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/v1/load_lora_adapter",
    ]
    eng.unload_adapter("lora1")
    with pytest.raises(AdapterNotFoundError):
        eng.unload_adapter("lora1")
    with pytest.raises(AdapterNotFoundError):
        eng.generate([ChatRequest(user("q"), adapter="lora1")])
    eng.close()


def test_openai_engine_api_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from trprompt.engines.openai_engine import OpenAIEngine

    monkeypatch.delenv("TRPROMPT_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="TRPROMPT_TEST_KEY"):
        OpenAIEngine("m", "http://127.0.0.1:9/v1", api_key_env="TRPROMPT_TEST_KEY")
    monkeypatch.setenv("TRPROMPT_TEST_KEY", "sk-test")
    eng = OpenAIEngine("m", "http://127.0.0.1:9/v1", api_key_env="TRPROMPT_TEST_KEY")
    assert eng.client.api_key == "sk-test"
    eng.close()


