"""The messages the ingress and the model deployments exchange (plain dataclasses, pickled by Ray)."""

from __future__ import annotations

from dataclasses import dataclass

from trprompt.engines.base import Message, SamplingParams


@dataclass
class PromptJob:
    """One /v1/prompt request after validation."""

    question: str
    n: int = 1
    temperature: float | None = None


@dataclass
class PromptOutcome:
    """Π's instructions for one question, with the version that wrote them."""

    prompts: list[str]
    prompt_tokens: int
    completion_tokens: int
    run_id: str
    adapter_version: str
    adapter_id: str | None
    reward_version: str
    epoch: int
    replica: str
    target_messages: list[Message]
    target_sampling: SamplingParams
    batch_size: int


@dataclass
class AnswerJob:
    """One target-model request."""

    messages: list[Message]
    sampling: SamplingParams


@dataclass
class AnswerOutcome:
    """The target model's answer."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    replica: str
    batch_size: int
    finish_reason: str = "stop"
