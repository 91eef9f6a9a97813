"""The engine protocol: batched chat generation with token accounting.

Every part of the algorithm talks to language models only through :class:`Engine`.
An engine may be an in-process transformers model, a vLLM instance, an
OpenAI-compatible server, or a pool of Ray actors hosting any of those; the
algorithm cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Message = dict[str, str]
"""One chat message: ``{"role": "system"|"user"|"assistant", "content": "..."}``."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's completions.

    ``temperature == 0`` means greedy decoding. ``n`` completions are returned per
    request. ``seed`` makes sampling reproducible where the backend supports it.
    Generation stops at EOS, after ``max_tokens`` new tokens, or at the first
    occurrence of any string in ``stop`` (the stop string is not returned).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))


@dataclass(frozen=True)
class ChatRequest:
    """One chat conversation to complete.

    ``adapter`` names a LoRA adapter previously loaded with
    :meth:`Engine.load_adapter`; ``None`` means the base model.
    """

    messages: tuple[Message, ...] | list[Message]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None

    def __post_init__(self) -> None:
        if not self.messages:
            raise ValueError("a ChatRequest needs at least one message")
        for m in self.messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each message needs 'role' and 'content', got {m!r}")


@dataclass
class ChatResult:
    """The completions for one :class:`ChatRequest` (``len(texts) == sampling.n``).

    ``prompt_tokens`` counts the rendered prompt once; ``completion_tokens`` is the
    total over all ``n`` completions.
    """

    texts: list[str]
    prompt_tokens: int
    completion_tokens: int
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The first completion."""
        return self.texts[0]


@runtime_checkable
class Engine(Protocol):
    """Batched chat generation.

    ``generate`` returns exactly one :class:`ChatResult` per request, in order.
    """

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Complete every request; results are in request order."""
        ...

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Make the LoRA adapter saved at ``path`` available under ``adapter_id``."""
        ...

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget ``adapter_id``; requests naming it afterwards fail."""
        ...


class AdapterNotFoundError(KeyError):
    """A request named a LoRA adapter the engine has not loaded."""


@dataclass
class Usage:
    """LLM calls and tokens spent by one role."""

    calls: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        """Accumulate ``other`` into this usage."""
        self.calls += other.calls
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    def as_dict(self) -> dict[str, int]:
        """Plain-dict form for JSON artifacts."""
        return {
            "calls": self.calls,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
