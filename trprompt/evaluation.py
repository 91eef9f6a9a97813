"""Evaluating a prompting policy on a split: the target answers, the grader scores.

The policies themselves (fixed and query-aware) live in :mod:`trprompt.policies`.
:func:`answer_and_grade` runs the target model on question + instruction and grades
every answer; :func:`evaluate` does that for a policy's instructions and wraps the rows
in an :class:`EvalResult` (accuracy with a Wilson interval). Everything is batched
through the engine protocol.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trprompt.data import Problem
from trprompt.engines.base import ChatRequest, ChatResult, Engine, SamplingParams
from trprompt.engines.wrappers import generate_in_chunks
from trprompt.grading import grader_for
from trprompt.policies import PromptPolicy
from trprompt.templates import Templates

SCORE_TOLERANCE = 1e-9
"""Two sums of float scores closer than this are equal (a candidate must beat another by more)."""


def row_score(row: dict[str, Any]) -> float:
    """A graded row's score in [0, 1]: ``score`` when present (float metrics), else 1/0 from ``correct`` (old rows)."""
    s = row.get("score")
    return float(s) if s is not None else (1.0 if row["correct"] else 0.0)


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
        return sum(row_score(r) for r in self.rows) / self.n

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


def target_seed(seed: int, question: str) -> int:
    """The sampling seed of the target's answer to ``question`` in a run seeded with ``seed``.

    A stable hash of (seed, question), so the same run seed always gives the same answer to
    the same question (whatever the batch, order or process), two run seeds give independent
    samples, and different questions of one run do not share a random stream. It only changes
    outputs when the target samples (``temperature > 0``); greedy decoding ignores it.
    """
    digest = hashlib.sha256(f"{int(seed)}\0{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def target_requests(
    problems: Sequence[Problem],
    instructions: Sequence[str],
    templates: Templates,
    max_tokens: int,
    temperature: float,
    seed: int = 0,
) -> list[ChatRequest]:
    """The target-model requests: question + instruction, each seeded by :func:`target_seed` from ``seed``."""
    pairs = zip(problems, instructions, strict=True)
    return [
        ChatRequest(
            templates.target_messages(p.question, ins),
            SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=target_seed(seed, p.question)),
        )
        for p, ins in pairs
    ]


def graded_row(problem: Problem, instruction: str, result: ChatResult) -> dict[str, Any]:
    """One graded row: the target's answer to question + instruction, graded by the problem's own grader.

    The one row format of validation, test evaluation, the synthetic set and the reward search.
    """
    grader = grader_for(problem)
    g = grader.grade(result.text, problem)
    return {
        "id": problem.id,
        "question": problem.question,
        "instruction": instruction,
        "output": result.text,
        "extracted": g.extracted,
        "gold": problem.answer,
        "correct": bool(g.correct),
        "score": g.score,
        "grader": grader.name,
        "target_prompt_tokens": result.prompt_tokens,
        "target_completion_tokens": result.completion_tokens,
    }


def answer_and_grade(
    target: Engine,
    problems: Sequence[Problem],
    instructions: Sequence[str],
    templates: Templates,
    max_tokens: int = 256,
    temperature: float = 0.0,
    chunk_size: int = 64,
    progress: bool = True,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run the target on question + instruction for every problem and grade the answers.

    ``seed`` is the run's seed; each request's sampling seed derives from it (:func:`target_seed`).
    """
    reqs = target_requests(problems, instructions, templates, max_tokens, temperature, seed)
    res = generate_in_chunks(target, reqs, chunk_size, "target model", progress)
    return [graded_row(p, ins, r) for p, ins, r in zip(problems, instructions, res, strict=True)]


def evaluate(
    policy: PromptPolicy,
    target: Engine,
    problems: Sequence[Problem],
    templates: Templates,
    max_tokens: int = 256,
    temperature: float = 0.0,
    chunk_size: int = 64,
    progress: bool = True,
    seed: int = 0,
) -> EvalResult:
    """Evaluate ``policy`` with ``target`` on ``problems`` (``seed``: the run's seed, see :func:`target_seed`)."""
    t0 = time.perf_counter()
    instructions = policy.instructions(problems)
    rows = answer_and_grade(target, problems, instructions, templates, max_tokens, temperature, chunk_size, progress,
                            seed)
    dataset = problems[0].dataset if problems else ""
    return EvalResult(policy.name, dataset, rows, wall_s=time.perf_counter() - t0)
