"""One interface for every prompting method: ``Method.fit(ctx) -> PromptPolicy``.

A :class:`MethodContext` carries everything a method may use while it optimises:

* one :class:`~trprompt.engines.wrappers.MeteredEngine` per role (``prompt_model``,
  ``target_model``, ``reward_model``, ``optimizer_model``), so the LLM requests and
  tokens of every method are counted the same way, per role;
* the training and validation problems, the templates, the generation settings
  and the seed;
* a :class:`MethodBudget` that the meters enforce: ``max_metric_calls`` caps the
  target-model requests (each one answers and grades one problem under one
  instruction, i.e. one metric call), ``max_llm_requests`` caps the requests over
  all roles. A call that would break either cap raises
  :class:`~trprompt.engines.wrappers.BudgetExceededError` *before* it is sent;
* a work directory of its own;
* ``history``: one row per candidate the method scored on validation, which the
  comparison report plots.

The policy a method returns is evaluated on the test split by the comparison
(:mod:`trprompt.experiments.compare`) with :func:`trprompt.evaluation.evaluate` on the same
target engine as every other method. :func:`~trprompt.policies.policy_spec` and
:func:`~trprompt.policies.policy_from_spec` turn a policy into JSON and back, so a fitted
method can be cached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from trprompt.config import GenerationConfig, TRPromptConfig
from trprompt.data import Problem
from trprompt.engines.base import Engine
from trprompt.engines.wrappers import Budget, BudgetExceededError, MeteredEngine
from trprompt.evaluation import SCORE_TOLERANCE, answer_and_grade, row_score
from trprompt.policies import FixedInstructionPolicy, PromptPolicy
from trprompt.roles import ROLES
from trprompt.templates import Templates


@dataclass(frozen=True)
class MethodBudget:
    """What one method may spend while it optimises (``None``: no cap)."""

    max_metric_calls: int | None = None
    """Most target-model requests, i.e. problems answered and graded under some instruction."""
    max_llm_requests: int | None = None
    """Most LLM requests over all roles together."""
    max_tokens: int | None = None
    """Most tokens (prompt + completion) over all roles together."""
    exhaust: bool = False
    """Spend the whole budget: step counts become unlimited and the method stops when the next step
    no longer fits (budget-matched comparisons, :meth:`MethodContext.steps`)."""

    def __post_init__(self) -> None:
        for k in ("max_metric_calls", "max_llm_requests", "max_tokens"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{k} must be a positive integer or None, got {v!r}")
        if self.exhaust and self.max_metric_calls is None and self.max_llm_requests is None \
                and self.max_tokens is None:
            raise ValueError("exhaust needs a cap (max_metric_calls, max_llm_requests or max_tokens)")


@dataclass
class InstructionScore:
    """The real validation result of one instruction."""

    instruction: str
    correct: int
    n: int
    rows: list[dict[str, Any]] = field(repr=False)
    mean_score: float | None = None
    """The mean score when known without ``rows`` (e.g. read from a summary's ``accuracy``)."""

    @property
    def accuracy(self) -> float:
        """Mean score over the problems: the fraction correct, or the mean of a float metric's scores.

        Methods rank and accept candidates by this, never by :attr:`correct` (which counts only full scores).
        """
        if not self.n:
            return 0.0
        if self.mean_score is not None:
            return float(self.mean_score)
        if len(self.rows) == self.n:
            return sum(row_score(r) for r in self.rows) / self.n
        return self.correct / self.n

    @property
    def perfect(self) -> bool:
        """Every problem got the full score (nothing left to improve)."""
        return self.n > 0 and self.accuracy >= 1.0 - SCORE_TOLERANCE

    @property
    def failures(self) -> list[dict[str, Any]]:
        """The graded rows that were wrong."""
        return [r for r in self.rows if not r["correct"]]


@dataclass
class MethodContext:
    """Everything a method may use while it optimises (see the module docstring)."""

    engines: dict[str, MeteredEngine]
    train: list[Problem]
    val: list[Problem]
    templates: Templates
    generation: GenerationConfig
    budget: MethodBudget
    seed: int
    work_dir: Path
    run_config: TRPromptConfig | None = None
    """The full TRPrompt run config (the TRPrompt methods build their trainer from it)."""
    sft_runner: Any = None
    """Runs LoRA SFT (``trprompt.loop.SFTRunner``); needed by the TRPrompt methods only."""
    base_model_path: str | None = None
    """Local folder of the prompt model's weights (for SFT); TRPrompt methods only."""
    progress: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    """One row per scored candidate: ``step``, ``text``, ``val_accuracy``, ``correct``, ``n``, ``accepted``,
    ``incumbent_accuracy`` (best validation accuracy known after the row), plus method-specific keys."""
    _cache: dict[tuple[str, tuple[str, ...]], InstructionScore] = field(default_factory=dict, repr=False)

    @classmethod
    def create(
        cls,
        engines: Mapping[str, Engine],
        *,
        train: Sequence[Problem],
        val: Sequence[Problem],
        templates: Templates,
        generation: GenerationConfig,
        budget: MethodBudget | None = None,
        seed: int = 0,
        work_dir: str | Path,
        **kwargs: Any,
    ) -> MethodContext:
        """Wrap each role's engine in a fresh meter enforcing ``budget`` and build the context."""
        missing = [r for r in ROLES if r not in engines]
        if missing:
            raise ValueError(f"engines missing for roles: {missing}")
        budget = budget or MethodBudget()
        shared = Budget(max_requests=budget.max_llm_requests, max_tokens=budget.max_tokens)
        metered = {
            role: MeteredEngine(
                engines[role],
                role=role,
                max_requests=budget.max_metric_calls if role == "target_model" else None,
                budget=shared,
            )
            for role in ROLES
        }
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        return cls(metered, list(train), list(val), templates, generation, budget, seed, work, **kwargs)

    # ------------------------------------------------------------------ spending
    @property
    def target(self) -> MeteredEngine:
        """The metered target model."""
        return self.engines["target_model"]

    @property
    def metric_calls(self) -> int:
        """Target-model requests made so far."""
        return self.target.usage.requests

    @property
    def llm_requests(self) -> int:
        """Requests made so far over all roles."""
        return sum(e.usage.requests for e in self.engines.values())

    @property
    def tokens(self) -> int:
        """Tokens (prompt + completion) spent so far over all roles."""
        return sum(e.usage.total_tokens for e in self.engines.values())

    def remaining_tokens(self) -> int | None:
        """Tokens left over all roles (``None``: unlimited)."""
        cap = self.budget.max_tokens
        return None if cap is None else max(0, cap - self.tokens)

    def steps(self, planned: int, stall_limit: int = 3) -> Iterator[int]:
        """Step numbers ``1..planned``; with ``budget.exhaust``, ``1, 2, ...`` until the budget decides.

        The caller still checks :meth:`can_afford` before each step (the metric-call and request
        caps). Under a token cap the steps stop once the tokens left are fewer than the most a
        step has cost so far; with ``exhaust`` they also stop after ``stall_limit`` steps in a row
        that scored nothing (no metric call: a method that can no longer make progress).
        """
        step, worst, stalled = 0, 0, 0
        while self.budget.exhaust or step < planned:
            left = self.remaining_tokens()
            if left is not None and (left == 0 or left < worst):
                return
            before_tokens, before_calls = self.tokens, self.metric_calls
            step += 1
            yield step
            worst = max(worst, self.tokens - before_tokens)
            stalled = stalled + 1 if self.metric_calls == before_calls else 0
            if self.budget.exhaust and stalled >= stall_limit:
                return

    def remaining_metric_calls(self) -> int | None:
        """Metric calls left (``None``: unlimited)."""
        cap = self.budget.max_metric_calls
        return None if cap is None else max(0, cap - self.metric_calls)

    def remaining_llm_requests(self) -> int | None:
        """LLM requests left over all roles (``None``: unlimited)."""
        cap = self.budget.max_llm_requests
        return None if cap is None else max(0, cap - self.llm_requests)

    def can_afford(self, metric_calls: int = 0, llm_requests: int | None = None) -> bool:
        """Whether ``metric_calls`` more target requests plus ``llm_requests`` requests in all fit the budget.

        ``llm_requests`` defaults to ``metric_calls`` (target requests are LLM requests too).
        """
        total = metric_calls if llm_requests is None else llm_requests
        m, r = self.remaining_metric_calls(), self.remaining_llm_requests()
        return (m is None or metric_calls <= m) and (r is None or total <= r)

    def usage(self) -> dict[str, dict[str, int]]:
        """Requests and tokens spent per role so far."""
        return {role: e.usage.as_dict() for role, e in self.engines.items()}

    # ------------------------------------------------------------------ scoring
    def answer(self, instructions: Sequence[str], problems: Sequence[Problem]) -> list[dict[str, Any]]:
        """Answer and grade ``problems[i]`` under ``instructions[i]`` with the target, in one batched stream.

        Raises :class:`BudgetExceededError` before sending anything when the requests would not fit.
        """
        if len(instructions) != len(problems):
            raise ValueError("one instruction per problem is needed")
        if not problems:
            return []
        if not self.can_afford(len(problems)):
            raise BudgetExceededError(
                f"{len(problems)} metric calls do not fit the budget ({self.metric_calls} metric calls and "
                f"{self.llm_requests} LLM requests spent of {self.budget})"
            )
        g = self.generation
        return answer_and_grade(self.target, problems, list(instructions), self.templates, g.target_max_tokens,
                                g.target_temperature, g.batch_size, progress=self.progress, seed=self.seed)

    def score(self, instructions: Sequence[str], problems: Sequence[Problem] | None = None) -> list[InstructionScore]:
        """Real accuracy of each instruction on ``problems`` (default: validation), scored in ONE batched stream.

        Every (new instruction x problem) pair is answered by the target and graded; an
        instruction already scored on the same problems comes from the cache and costs nothing.
        """
        probs = self.val if problems is None else list(problems)
        if not probs:
            raise ValueError("nothing to score on: no problems")
        ids = tuple(p.id for p in probs)
        new: list[str] = []
        for ins in instructions:
            if (ins, ids) not in self._cache and ins not in new:
                new.append(ins)
        if new:
            rows = self.answer([ins for ins in new for _ in probs], probs * len(new))
            for i, ins in enumerate(new):
                chunk = rows[i * len(probs) : (i + 1) * len(probs)]
                correct = sum(1 for r in chunk if r["correct"])
                self._cache[(ins, ids)] = InstructionScore(ins, correct, len(probs), chunk)
        return [self._cache[(ins, ids)] for ins in instructions]

    def record(self, step: int, score: InstructionScore, *, accepted: bool, incumbent_accuracy: float,
               **extra: Any) -> dict[str, Any]:
        """Append one scored candidate to :attr:`history` and return the row."""
        row = {
            "step": step,
            "text": score.instruction,
            "val_accuracy": score.accuracy,
            "correct": score.correct,
            "n": score.n,
            "accepted": accepted,
            "incumbent_accuracy": incumbent_accuracy,
            "metric_calls": self.metric_calls,
            "llm_requests": self.llm_requests,
            **extra,
        }
        self.history.append(row)
        return row


@runtime_checkable
class Method(Protocol):
    """A prompting method: optimise on ``ctx`` and return the policy to evaluate on test."""

    name: str

    def fit(self, ctx: MethodContext) -> PromptPolicy:
        """Optimise within ``ctx.budget`` and return the resulting policy."""
        ...

    def settings(self) -> dict[str, Any]:
        """The method's own settings (JSON-ready); part of its cache key."""
        ...


@dataclass
class FixedMethod:
    """A method with nothing to fit: the same fixed instruction for every problem (``plain``, ``cot``)."""

    name: str
    instruction: str

    def fit(self, ctx: MethodContext) -> PromptPolicy:
        """Return the fixed instruction; spends nothing."""
        return FixedInstructionPolicy(self.name, self.instruction)

    def settings(self) -> dict[str, Any]:
        """The instruction is the whole setting."""
        return {"instruction": self.instruction}


# ------------------------------------------------------------------ policy (de)serialisation
def settings_dict(obj: Any) -> dict[str, Any]:
    """A dataclass's fields as a plain dict (for :meth:`Method.settings`)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else dict(obj)
