"""A deterministic stand-in engine for tests: no model, predictable text and token counts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

from trprompt.engines.base import AdapterNotFoundError, ChatRequest, ChatResult

Responder = Callable[[ChatRequest], str]


def _last_user_message(request: ChatRequest) -> str:
    for m in reversed(list(request.messages)):
        if m["role"] == "user":
            return m["content"]
    return list(request.messages)[-1]["content"]


class EchoEngine:
    """Fake :class:`~trprompt.engines.base.Engine` whose replies come from ``responder``.

    * Text: ``responder(request)`` (called once per completion, so ``n`` calls for
      ``sampling.n == n``), or, with no responder, the last user message.
    * Stop strings cut the text before the first one found (``finish_reason`` "stop").
    * ``max_tokens`` keeps the first ``max_tokens`` whitespace-separated words, joined
      by single spaces (``finish_reason`` "length").
    * Token counts are whitespace word counts: prompt tokens over all message
      contents, completion tokens over the returned texts.
    * Adapters: ids passed to :meth:`load_adapter` (or ``adapters=``) are accepted;
      any other adapter id raises :class:`AdapterNotFoundError`.
    * Every request is appended to :attr:`seen` (once per request, in call order).
    """

    def __init__(self, responder: Responder | None = None, adapters: Iterable[str] = ()) -> None:
        self.responder = responder
        self.seen: list[ChatRequest] = []
        self.loaded: dict[str, str] = {a: "" for a in adapters}
        self.calls = 0
        self._lock = threading.Lock()

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Answer each request per the class rules; results in request order."""
        requests = list(requests)
        with self._lock:
            for r in requests:
                if r.adapter is not None and r.adapter not in self.loaded:
                    raise AdapterNotFoundError(r.adapter)
            self.calls += 1
            self.seen.extend(requests)
        return [self._answer(r) for r in requests]

    def _answer(self, request: ChatRequest) -> ChatResult:
        sp = request.sampling
        texts: list[str] = []
        reasons: list[str] = []
        for _ in range(sp.n):
            text = self.responder(request) if self.responder is not None else _last_user_message(request)
            reason = "stop"
            for s in sp.stop:
                if s and s in text:
                    text = text[: text.index(s)]
            words = text.split()
            if len(words) > sp.max_tokens:
                text = " ".join(words[: sp.max_tokens])
                reason = "length"
            texts.append(text)
            reasons.append(reason)
        return ChatResult(
            texts=texts,
            prompt_tokens=sum(len(m["content"].split()) for m in request.messages),
            completion_tokens=sum(len(t.split()) for t in texts),
            finish_reasons=reasons,
        )

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Record ``adapter_id`` (with its path) as loaded."""
        with self._lock:
            self.loaded[adapter_id] = str(path)

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget ``adapter_id``; raises :class:`AdapterNotFoundError` if it was not loaded."""
        with self._lock:
            if adapter_id not in self.loaded:
                raise AdapterNotFoundError(adapter_id)
            del self.loaded[adapter_id]
