"""Prompting policies and their evaluation on a split.

A *policy* turns a batch of problems into one instruction per problem. ``plain``,
``cot`` and fixed-instruction baselines return the same instruction for every
problem; TRPrompt's query-aware policy asks the prompt model Π(q, t*).
Everything is batched through the engine protocol.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from trprompt.data import Problem
from trprompt.engines.base import ChatRequest, ChatResult, Engine, SamplingParams
from trprompt.grading import grader_for
from trprompt.templates import Templates


def generate_in_chunks(
    engine: Engine, requests: Sequence[ChatRequest], chunk_size: int, desc: str | None = None, progress: bool = True
) -> list[ChatResult]:
    """Send ``requests`` to ``engine`` in chunks of ``chunk_size`` with a progress bar; results in order."""
    out: list[ChatResult] = []
    with tqdm(total=len(requests), desc=desc, disable=not progress or not desc, unit="req", leave=False) as bar:
        for i in range(0, len(requests), chunk_size):
            chunk = list(requests[i : i + chunk_size])
            res = engine.generate(chunk)
            if len(res) != len(chunk):
                raise RuntimeError(f"engine returned {len(res)} results for {len(chunk)} requests")
            out.extend(res)
            bar.update(len(chunk))
    return out


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


def clean_instruction(text: str) -> str:
    """Tidy a prompt-model output into an instruction (strip quotes, labels and whitespace)."""
    s = text.strip()
    for label in ("Instruction:", "instruction:", "INSTRUCTION:"):
        if s.startswith(label):
            s = s[len(label) :].strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    return s


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

    def requests(self, problems: Sequence[Problem], reward: str | None = None) -> list[ChatRequest]:
        """The prompt-model requests for ``problems`` under ``reward`` (default: the policy's t*)."""
        sp = SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens, seed=self.seed)
        r = self.optimal_reward if reward is None else reward
        return [
            ChatRequest(self.templates.prompt_model_messages(p.question, r), sp, adapter=self.adapter)
            for p in problems
        ]

    def instructions(self, problems: Sequence[Problem]) -> list[str]:
        """Ask Π for one instruction per problem."""
        res = generate_in_chunks(
            self.prompt_engine, self.requests(problems), self.chunk_size, "prompt model", self.progress
        )
        self.last_results = res
        return [clean_instruction(r.text) for r in res]


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class EvalResult:
    """Per-problem rows and the accuracy of one policy on one split."""

    method: str
    dataset: str
    rows: list[dict[str, Any]]
    wall_s: float = 0.0

    @property
    def n(self) -> int:
        """Problems evaluated."""
        return len(self.rows)

    @property
    def correct(self) -> int:
        """Problems answered correctly."""
        return sum(1 for r in self.rows if r["correct"])

    @property
    def accuracy(self) -> float:
        """Mean score (the fraction correct for binary graders; 0 when empty).

        Rows from a grader with float scores in [0, 1] carry ``score``; older rows only ``correct``.
        """
        if not self.n:
            return 0.0
        return sum(float(r.get("score", 1.0 if r["correct"] else 0.0)) for r in self.rows) / self.n

    @property
    def ci95(self) -> tuple[float, float]:
        """95% Wilson interval of the accuracy."""
        return wilson_interval(self.correct, self.n)

    def summary(self) -> dict[str, Any]:
        """Headline numbers for JSON/Markdown."""
        lo, hi = self.ci95
        return {
            "method": self.method,
            "dataset": self.dataset,
            "n": self.n,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "grader": ",".join(sorted({str(r["grader"]) for r in self.rows if r.get("grader")})) or None,
            "ci95_low": lo,
            "ci95_high": hi,
            "target_prompt_tokens": sum(r["target_prompt_tokens"] for r in self.rows),
            "target_completion_tokens": sum(r["target_completion_tokens"] for r in self.rows),
            "wall_s": self.wall_s,
        }

    def summary_line(self) -> str:
        """One human-readable line."""
        lo, hi = self.ci95
        return (
            f"{self.method} on {self.dataset}: {self.accuracy * 100:.2f}% "
            f"({self.correct}/{self.n}, 95% CI {lo * 100:.1f}-{hi * 100:.1f})"
        )


def target_requests(
    problems: Sequence[Problem], instructions: Sequence[str], templates: Templates, max_tokens: int, temperature: float
) -> list[ChatRequest]:
    """The target-model requests: question + instruction."""
    sp = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=0)
    pairs = zip(problems, instructions, strict=True)
    return [ChatRequest(templates.target_messages(p.question, ins), sp) for p, ins in pairs]


def answer_and_grade(
    target: Engine,
    problems: Sequence[Problem],
    instructions: Sequence[str],
    templates: Templates,
    max_tokens: int = 256,
    temperature: float = 0.0,
    chunk_size: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the target on question + instruction for every problem and grade the answers."""
    reqs = target_requests(problems, instructions, templates, max_tokens, temperature)
    res = generate_in_chunks(target, reqs, chunk_size, "target model", progress)
    rows = []
    for p, ins, r in zip(problems, instructions, res, strict=True):
        grader = grader_for(p)
        g = grader.grade(r.text, p)
        rows.append(
            {
                "id": p.id,
                "question": p.question,
                "instruction": ins,
                "output": r.text,
                "extracted": g.extracted,
                "gold": p.answer,
                "correct": bool(g.correct),
                "score": g.score,
                "grader": grader.name,
                "target_prompt_tokens": r.prompt_tokens,
                "target_completion_tokens": r.completion_tokens,
            }
        )
    return rows


def evaluate(
    policy: PromptPolicy,
    target: Engine,
    problems: Sequence[Problem],
    templates: Templates,
    max_tokens: int = 256,
    temperature: float = 0.0,
    chunk_size: int = 64,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``policy`` with ``target`` on ``problems``."""
    t0 = time.perf_counter()
    instructions = policy.instructions(problems)
    rows = answer_and_grade(target, problems, instructions, templates, max_tokens, temperature, chunk_size, progress)
    dataset = problems[0].dataset if problems else ""
    return EvalResult(policy.name, dataset, rows, wall_s=time.perf_counter() - t0)
