"""A tiny OpenAI-compatible chat-completions server for tests: deterministic replies on 127.0.0.1.

``FakeOpenAIServer(responder)`` serves ``POST /v1/chat/completions`` and ``GET /v1/models`` from a
background thread on a free port; every request body is kept in :attr:`requests`. The reply text is
``responder(messages)``; token counts are whitespace word counts.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request

Responder = Callable[[list[dict[str, Any]]], str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeOpenAIServer:
    """Start with ``with FakeOpenAIServer(fn) as srv:``; ``srv.base_url`` ends in ``/v1``."""

    def __init__(self, responder: Responder) -> None:
        import uvicorn

        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        app = FastAPI()

        @app.get("/v1/models")
        def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> dict[str, Any]:
            body = await request.json()
            with self._lock:
                self.requests.append(body)
            messages = body["messages"]
            n = int(body.get("n") or 1)
            texts = [self.responder(messages) for _ in range(n)]
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
            completion_tokens = sum(len(t.split()) for t in texts)
            return {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                            for i, t in enumerate(texts)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            }

        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def models_seen(self) -> set[str]:
        """The ``model`` names requests asked for."""
        return {r.get("model", "") for r in self.requests}
