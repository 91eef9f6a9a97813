"""An engine that talks to any OpenAI-compatible chat-completions server (vLLM, llama.cpp, OpenAI).

LoRA adapters follow vLLM's conventions: a request's ``adapter`` is sent as the
``model`` name, and :meth:`OpenAIEngine.load_adapter` / :meth:`OpenAIEngine.unload_adapter`
call vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` endpoints.
Those endpoints exist only when the server was started with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` in its environment (and ``--enable-lora``).
The adapter ``path`` must be readable by the server process, not just by this one.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import openai

from trprompt.engines.base import AdapterNotFoundError, ChatRequest, ChatResult

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRYABLE = (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError)


class OpenAIEngine:
    """The :class:`~trprompt.engines.base.Engine` protocol over an OpenAI-compatible HTTP API.

    A batch is sent as concurrent single requests (``concurrency`` at a time).
    Connection errors, timeouts, HTTP 429 and 5xx are retried ``max_retries`` times
    with exponential backoff (``backoff_s * 2**attempt`` plus jitter). The API key
    is read from the environment variable ``api_key_env``; with none, the
    placeholder ``"EMPTY"`` is sent (what vLLM expects when it has no key).
    """

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key_env: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        concurrency: int = 8,
        backoff_s: float = 0.5,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        api_key = "EMPTY"
        if api_key_env:
            api_key = os.environ.get(api_key_env, "")
            if not api_key:
                raise ValueError(f"environment variable {api_key_env} (the API key for {base_url}) is not set")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._api_key = api_key
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="openai-engine")
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Send every request (concurrently) and return the results in request order."""
        requests = list(requests)
        if not requests:
            return []
        return list(self._pool.map(self._complete, requests))

    def _complete(self, request: ChatRequest) -> ChatResult:
        sp = request.sampling
        kwargs: dict[str, Any] = {
            "model": request.adapter or self.model,
            "messages": [dict(m) for m in request.messages],
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "max_tokens": sp.max_tokens,
            "n": sp.n,
        }
        if sp.seed is not None:
            kwargs["seed"] = sp.seed
        if sp.stop:
            kwargs["stop"] = list(sp.stop)
        try:
            resp = self._with_retries(lambda: self.client.chat.completions.create(**kwargs))
        except openai.NotFoundError as e:
            if request.adapter is not None:
                raise AdapterNotFoundError(request.adapter) from e
            raise
        choices = sorted(resp.choices, key=lambda c: c.index)
        usage = resp.usage
        return ChatResult(
            texts=[c.message.content or "" for c in choices],
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reasons=[c.finish_reason or "stop" for c in choices],
        )

    def _with_retries(self, call: Callable[[], T]) -> T:
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except _RETRYABLE as e:
                if attempt == self.max_retries:
                    raise
                delay = self.backoff_s * (2**attempt) * (1.0 + 0.25 * random.random())
                log.warning("%s: %s; retry %d/%d in %.2fs", self.base_url, e, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ adapters (vLLM)

    def _admin_url(self, endpoint: str) -> str:
        root = self.base_url if self.base_url.endswith("/v1") else self.base_url + "/v1"
        return f"{root}/{endpoint}"

    def _post(self, endpoint: str, payload: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self._api_key}"}

        def call() -> httpx.Response:
            try:
                r = httpx.post(self._admin_url(endpoint), json=payload, headers=headers, timeout=self.timeout_s)
            except httpx.TransportError as e:
                raise openai.APIConnectionError(message=str(e), request=e.request) from e
            if r.status_code >= 500:
                raise openai.InternalServerError(f"{endpoint}: HTTP {r.status_code}: {r.text}", response=r, body=None)
            return r

        return self._with_retries(call)

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Ask the vLLM server to load the LoRA adapter at ``path`` (a server-side path) as ``adapter_id``.

        Loading an id that is already loaded replaces it (unload, then load).
        """
        with self._lock:
            payload = {"lora_name": adapter_id, "lora_path": str(path)}
            r = self._post("load_lora_adapter", payload)
            if r.status_code == 400 and "already" in r.text.lower():
                self._post("unload_lora_adapter", {"lora_name": adapter_id})
                r = self._post("load_lora_adapter", payload)
            if r.status_code >= 400:
                raise RuntimeError(
                    f"loading adapter {adapter_id!r} from {path} failed: HTTP {r.status_code}: {r.text} "
                    "(the vLLM server needs --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
                )

    def unload_adapter(self, adapter_id: str) -> None:
        """Ask the vLLM server to drop ``adapter_id``; unknown ids raise :class:`AdapterNotFoundError`."""
        with self._lock:
            r = self._post("unload_lora_adapter", {"lora_name": adapter_id})
            if r.status_code in (400, 404):
                raise AdapterNotFoundError(adapter_id)
            if r.status_code >= 400:
                raise RuntimeError(f"unloading adapter {adapter_id!r} failed: HTTP {r.status_code}: {r.text}")

    def close(self) -> None:
        """Release the HTTP client and the worker threads."""
        self._pool.shutdown(wait=False)
        self.client.close()
