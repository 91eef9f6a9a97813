"""Prompting policies, and the one place that builds the prompt model's request Π(q, t*).

A *policy* turns a batch of problems into one instruction per problem:

- :class:`FixedInstructionPolicy`: the same instruction for every problem (``plain`` is the
  empty string, ``cot`` is "Let's think step by step", ``fixed`` reads a file; see
  :func:`fixed_policy`).
- :class:`QueryAwarePolicy`: TRPrompt's policy, Π(q, t*) writes an instruction per question.

:func:`prompt_model_request` is the only function that builds Π's chat request for a
(question, optimal_reward). Training (synthetic set, validation), the optimal-reward
search, evaluation and serving all call it, so they cannot drift apart: the same
(q, t*) under the same sampling gives byte-identical requests everywhere.
:func:`eval_sampling` is Π's sampling whenever its instruction is *used* rather than
explored (validation, reward-search scoring, test, serving). :func:`policy_spec` and
:func:`policy_from_spec` turn a fitted policy into JSON and back (cached comparisons).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

from trprompt.config import GenerationConfig
from trprompt.data import Problem
from trprompt.engines.base import ChatRequest, ChatResult, Engine, SamplingParams
from trprompt.engines.wrappers import generate_in_chunks
from trprompt.templates import Templates

FIXED_POLICY_NAMES: tuple[str, ...] = ("plain", "cot", "fixed")
"""The fixed-instruction policies :func:`fixed_policy` builds."""


def prompt_model_request(
    templates: Templates,
    question: str,
    optimal_reward: str,
    sampling: SamplingParams,
    adapter: str | None = None,
) -> ChatRequest:
    """Π's chat request for ``question`` under ``optimal_reward`` (t*), with LoRA ``adapter`` (None: base)."""
    return ChatRequest(templates.prompt_model_messages(question, optimal_reward), sampling, adapter=adapter)


def eval_sampling(
    gen: GenerationConfig, seed: int | None = 0, temperature: float | None = None, n: int = 1
) -> SamplingParams:
    """Π's sampling when its instruction is used: ``gen.prompt_eval_temperature`` (or ``temperature``)."""
    temp = gen.prompt_eval_temperature if temperature is None else temperature
    return SamplingParams(temperature=temp, max_tokens=gen.prompt_max_tokens, n=n, seed=seed)


def clean_instruction(text: str) -> str:
    """Tidy a prompt-model output into an instruction (strip quotes, labels and whitespace)."""
    s = text.strip()
    for label in ("Instruction:", "instruction:", "INSTRUCTION:"):
        if s.startswith(label):
            s = s[len(label) :].strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    return s


class PromptPolicy(Protocol):
    """Gives one instruction per problem."""

    name: str

    def instructions(self, problems: Sequence[Problem]) -> list[str]:
        """One instruction per problem, in order."""
        ...


@dataclass
class FixedInstructionPolicy:
    """The same instruction for every problem (``plain`` uses the empty string)."""

    name: str
    instruction: str

    def instructions(self, problems: Sequence[Problem]) -> list[str]:
        """Repeat the fixed instruction."""
        return [self.instruction] * len(problems)


def fixed_policy(name: str, templates: Templates, prompt_file: str | Path | None = None) -> FixedInstructionPolicy:
    """Build ``plain``, ``cot`` or ``fixed`` (instruction read from ``prompt_file``)."""
    if name == "plain":
        return FixedInstructionPolicy("plain", "")
    if name == "cot":
        return FixedInstructionPolicy("cot", templates.cot_instruction)
    if name == "fixed":
        if prompt_file is None:
            raise ValueError("method 'fixed' needs --prompt-file with the instruction text")
        text = Path(prompt_file).read_text().strip()
        if not text:
            raise ValueError(f"{prompt_file} is empty")
        return FixedInstructionPolicy("fixed", text)
    raise ValueError(f"unknown fixed-instruction method {name!r}; choose {', '.join(FIXED_POLICY_NAMES)}")


@dataclass
class QueryAwarePolicy:
    """TRPrompt's policy: Π(q, t*) writes an instruction for each question."""

    prompt_engine: Engine
    templates: Templates
    optimal_reward: str
    adapter: str | None = None
    temperature: float = 0.0
    max_tokens: int = 96
    seed: int | None = 0
    chunk_size: int = 64
    name: str = "trprompt"
    progress: bool = True
    last_results: list[ChatResult] = field(default_factory=list, repr=False)

    @classmethod
    def for_run(
        cls,
        prompt_engine: Engine,
        templates: Templates,
        optimal_reward: str,
        gen: GenerationConfig,
        seed: int | None,
        adapter: str | None = None,
        **kwargs: Any,
    ) -> Self:
        """The policy a run evaluates with: Π at the run's :func:`eval_sampling` (``kwargs``: other fields)."""
        sp = eval_sampling(gen, seed=seed)
        return cls(prompt_engine, templates, optimal_reward, adapter=adapter, temperature=sp.temperature,
                   max_tokens=sp.max_tokens, seed=sp.seed, **kwargs)

    @property
    def sampling(self) -> SamplingParams:
        """Π's sampling under this policy."""
        return SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens, seed=self.seed)

    def requests(self, problems: Sequence[Problem], optimal_reward: str | None = None) -> list[ChatRequest]:
        """The prompt-model requests for ``problems`` under ``optimal_reward`` (default: the policy's t*)."""
        optimal_reward = self.optimal_reward if optimal_reward is None else optimal_reward
        sp = self.sampling
        return [prompt_model_request(self.templates, p.question, optimal_reward, sp, self.adapter) for p in problems]

    def instructions(self, problems: Sequence[Problem]) -> list[str]:
        """Ask Π for one instruction per problem."""
        res = generate_in_chunks(
            self.prompt_engine, self.requests(problems), self.chunk_size, "prompt model", self.progress
        )
        self.last_results = res
        return [clean_instruction(r.text) for r in res]


def policy_spec(policy: PromptPolicy) -> dict[str, Any]:
    """A JSON-ready description of a fitted policy (see :func:`policy_from_spec`)."""
    if isinstance(policy, FixedInstructionPolicy):
        return {"kind": "fixed", "name": policy.name, "instruction": policy.instruction}
    if isinstance(policy, QueryAwarePolicy):
        return {
            "kind": "query_aware",
            "name": policy.name,
            "optimal_reward": policy.optimal_reward,
            "adapter": policy.adapter,
            "adapter_path": getattr(policy, "adapter_path", None),
            "temperature": policy.temperature,
            "max_tokens": policy.max_tokens,
            "seed": policy.seed,
        }
    raise TypeError(f"cannot describe a policy of type {type(policy).__name__}")


def policy_from_spec(spec: Mapping[str, Any], prompt_engine: Engine, templates: Templates,
                     chunk_size: int = 64, progress: bool = False) -> PromptPolicy:
    """Rebuild a policy from :func:`policy_spec`; a query-aware one runs on ``prompt_engine``.

    A LoRA adapter named in the spec is (re)loaded on ``prompt_engine`` from its saved path.
    """
    kind = spec.get("kind")
    if kind == "fixed":
        return FixedInstructionPolicy(str(spec["name"]), str(spec["instruction"]))
    if kind == "query_aware":
        adapter, path = spec.get("adapter"), spec.get("adapter_path")
        if adapter is not None:
            if not path:
                raise ValueError(f"policy {spec.get('name')!r} names adapter {adapter!r} but no adapter_path")
            prompt_engine.load_adapter(str(adapter), str(path))
        return QueryAwarePolicy(
            prompt_engine, templates, str(spec["optimal_reward"]), adapter=adapter,
            temperature=float(spec.get("temperature", 0.0)), max_tokens=int(spec.get("max_tokens", 96)),
            seed=spec.get("seed"), chunk_size=chunk_size, name=str(spec["name"]), progress=progress,
        )
    raise ValueError(f"unknown policy kind {kind!r}")
