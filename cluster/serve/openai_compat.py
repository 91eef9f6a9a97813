"""The OpenAI-compatible surface: ``POST /v1/chat/completions`` and ``GET /v1/models`` bodies.

A client sends a chat; the question is the text of the **last user message** (earlier
messages are accepted and not used: TRPrompt answers one question at a time). The app
asks Π(q, t*) for a query-aware instruction, then the target model answers q + instruction,
exactly like ``/v1/solve``. The reply is a standard ``chat.completion`` (or, with
``stream: true``, ``chat.completion.chunk`` server-sent events ending in ``data: [DONE]``);
``usage`` counts the tokens of both models, and the extra field ``trprompt`` carries the
instruction, per-model usage and the served version.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.serve.messages import AnswerOutcome, PromptOutcome
from cluster.serve.security import has_visible_text
from trprompt.engines.base import SamplingParams

OWNER = "trprompt"


class TextPart(BaseModel):
    """One part of a message's content (only text parts are accepted)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str = Field(max_length=200_000)


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = Field(None)
    name: str | None = Field(None, max_length=256)
    tool_call_id: str | None = Field(None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=64)

    def text(self) -> str:
        """The message's text (parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    """``stream_options`` (``include_usage`` adds a last chunk with the usage)."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Body of ``POST /v1/chat/completions`` (the OpenAI fields this app understands).

    ``temperature``, ``top_p``, ``seed``, ``stop`` and ``max_tokens`` /
    ``max_completion_tokens`` apply to the target model (``max_tokens`` capped at the run's
    ``generation.target_max_tokens``); Π always uses the run's own sampling. ``user``,
    ``metadata``, ``store``, ``presence_penalty`` and ``frequency_penalty`` are accepted and ignored.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    n: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logprobs: Literal[False] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4 or any(not s or len(s) > 256 for s in items):
            raise ValueError("stop takes at most 4 non-empty strings of at most 256 characters")
        return v

    def question(self) -> str:
        """The text of the last user message; ``ValueError`` if there is none or it is empty."""
        for m in reversed(self.messages):
            if m.role == "user":
                text = m.text()
                if not has_visible_text(text):
                    raise ValueError("the last user message is empty")
                return text
        raise ValueError("messages must contain a user message (the question)")

    def target_sampling(self, base: SamplingParams) -> SamplingParams:
        """The target model's sampling: the run's, with this request's overrides (``max_tokens`` capped)."""
        sp = base
        limit = self.max_completion_tokens or self.max_tokens
        if limit is not None:
            sp = replace(sp, max_tokens=min(limit, base.max_tokens))
        if self.temperature is not None:
            sp = replace(sp, temperature=self.temperature, seed=sp.seed if self.temperature == 0 else None)
        if self.top_p is not None:
            sp = replace(sp, top_p=self.top_p)
        if self.seed is not None:
            sp = replace(sp, seed=self.seed)
        if self.stop:
            sp = replace(sp, stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        return sp


def model_card(model_id: str, created: int) -> dict[str, Any]:
    """One entry of ``GET /v1/models``."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}


def _usage(p: PromptOutcome, a: AnswerOutcome) -> dict[str, Any]:
    prompt, completion = p.prompt_tokens + a.prompt_tokens, p.completion_tokens + a.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extra(p: PromptOutcome, a: AnswerOutcome) -> dict[str, Any]:
    """The documented extra field ``trprompt`` of every completion."""
    return {
        "instruction": p.prompts[0],
        "usage_by_model": {
            "prompt_model": {"prompt_tokens": p.prompt_tokens, "completion_tokens": p.completion_tokens},
            "target_model": {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens},
        },
        "run_id": p.run_id,
        "adapter_version": p.adapter_version,
        "optimal_reward_version": p.reward_version,
        "epoch": p.epoch,
    }


def new_completion_id() -> str:
    """A fresh ``chatcmpl-...`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(model_id: str, p: PromptOutcome, a: AnswerOutcome) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": new_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "system_fingerprint": f"{p.adapter_version}:{p.reward_version}",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": a.text, "refusal": None},
                     "logprobs": None, "finish_reason": a.finish_reason}],
        "usage": _usage(p, a),
        "trprompt": _extra(p, a),
    }


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _pieces(text: str, size: int = 24) -> list[str]:
    """``text`` cut at whitespace into pieces of about ``size`` characters (the stream's deltas)."""
    out, cur = [], ""
    for word in text.split(" "):
        cur = f"{cur} {word}" if cur else word
        if len(cur) >= size:
            out.append(cur + " ")
            cur = ""
    if cur:
        out.append(cur)
    if out and not text.endswith(" ") and out[-1].endswith(" "):
        out[-1] = out[-1][:-1]
    return out or [""]


async def stream(model_id: str, p: PromptOutcome, a: AnswerOutcome, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of ``chat.completion.chunk`` objects for a finished answer, then ``[DONE]``."""
    base = {"id": new_completion_id(), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model_id, "system_fingerprint": f"{p.adapter_version}:{p.reward_version}"}
    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    yield _sse({**base, "choices": [first], "trprompt": _extra(p, a)})
    for piece in _pieces(a.text):
        yield _sse({**base, "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None,
                                          "finish_reason": None}]})
    yield _sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": a.finish_reason}]})
    if include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(p, a)})
    yield "data: [DONE]\n\n"
