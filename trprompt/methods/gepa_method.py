"""GEPA (Agrawal et al., "Reflective Prompt Evolution") through the ``gepa`` package.

:class:`ProblemAdapter` plugs our engine protocol and grader into gepa's
``GEPAAdapter`` contract. The system under optimisation has one text component,
``instruction``, written after every problem:

* ``evaluate(batch, candidate, capture_traces)`` answers the batch with the target
  under the candidate's instruction (one batched stream), grades each answer
  (score 1.0 or 0.0) and, with ``capture_traces``, keeps a trajectory per example;
* ``batch_evaluate(items)`` does the same for several (candidate, batch) pairs in ONE
  stream (gepa uses it when present);
* ``make_reflective_dataset`` turns the trajectories into records with the problem,
  the response and textual feedback (the extracted answer, the correct answer and,
  when the data set has one, the reference solution) for the reflection model.

gepa itself does reflective mutation on training minibatches of
``minibatch_size`` problems, evaluates accepted candidates on the validation set
and selects parents from the per-problem Pareto frontier. Its budget is in metric
calls (one problem scored = one call); because gepa only checks
``max_metric_calls`` between iterations, :class:`BudgetStopper` also refuses to
start an iteration whose worst case (two minibatch evaluations plus one full
validation pass, plus the reflection request) no longer fits, so the budget is
never exceeded.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trprompt.config import ConfigError
from trprompt.data import Problem
from trprompt.engines.base import ChatRequest, Engine, SamplingParams
from trprompt.evaluation import row_score
from trprompt.methods.base import InstructionScore, MethodContext, settings_dict
from trprompt.policies import FixedInstructionPolicy, PromptPolicy

log = logging.getLogger("trprompt.methods.gepa")

COMPONENT = "instruction"
"""The one component of the candidate: the instruction written after each problem."""


@dataclass
class GEPASettings:
    """GEPA's knobs (the budget itself is the method budget's ``max_metric_calls``)."""

    minibatch_size: int = 3
    """Training problems per reflective mutation."""
    candidate_selection: str = "pareto"
    """Parent selection: pareto, current_best, epsilon_greedy or top_k_pareto."""
    reflection_temperature: float = 1.0
    """Reflection model temperature."""
    reflection_max_tokens: int = 256
    """Longest reflection reply."""
    use_merge: bool = False
    """Also propose merges of two frontier candidates."""
    max_iterations: int = 100
    """Safety cap on gepa iterations (iterations can be free once every evaluation is cached)."""
    max_output_chars: int = 800
    """Longest response text shown to the reflection model (the end is kept)."""
    initial_instruction: str | None = None
    """Seed candidate (``None``: the chain-of-thought instruction of the templates)."""

    def validate(self, path: str) -> None:
        """Raise ConfigError for values out of range."""
        for k in ("minibatch_size", "reflection_max_tokens", "max_iterations", "max_output_chars"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{path}.{k} must be >= 1, got {getattr(self, k)}")
        choices = ("pareto", "current_best", "epsilon_greedy", "top_k_pareto")
        if self.candidate_selection not in choices:
            raise ConfigError(f"{path}.candidate_selection must be one of {choices}, got {self.candidate_selection!r}")
        if not 0.0 <= self.reflection_temperature <= 2.0:
            raise ConfigError(f"{path}.reflection_temperature must be in [0, 2]")


def _cut_end(text: str, max_chars: int) -> str:
    text = text.strip()
    return text if len(text) <= max_chars else "..." + text[-max_chars:]


def feedback_text(trace: Mapping[str, Any], with_solution: bool = True, max_chars: int = 800) -> str:
    """The textual feedback on one graded response."""
    extracted = trace.get("extracted")
    if trace["correct"]:
        return f"Correct: the final answer {extracted} matches the correct answer {trace['gold']}."
    got = "no final answer could be read from the response" if extracted is None else \
        f"the final answer read from the response is {extracted}"
    text = f"Incorrect: {got}, but the correct answer is {trace['gold']}."
    solution = trace.get("solution")
    if with_solution and solution:
        text += f" A correct solution: {_cut_end(str(solution), max_chars)}"
    return text


class ProblemAdapter:
    """gepa's ``GEPAAdapter`` over our target engine (via ``ctx``) and :func:`trprompt.grading.grade`."""

    propose_new_texts = None  # gepa's default reflective proposer with our reflection LM

    def __init__(self, ctx: MethodContext, max_output_chars: int = 800) -> None:
        self.ctx = ctx
        self.max_output_chars = max_output_chars
        self.examples_scored = 0

    def batch_evaluate(self, items: Sequence[tuple[Mapping[str, str], Sequence[Problem]]]) -> list[Any]:
        """Evaluate several (candidate, batch) pairs in one target stream; trajectories always included."""
        return self._run(items, capture_traces=True)

    def evaluate(self, batch: Sequence[Problem], candidate: Mapping[str, str], capture_traces: bool = False) -> Any:
        """Scores (the grader's score in [0, 1]) and outputs per problem; trajectories when ``capture_traces``."""
        return self._run([(candidate, batch)], capture_traces)[0]

    def _run(self, items: Sequence[tuple[Mapping[str, str], Sequence[Problem]]], capture_traces: bool) -> list[Any]:
        from gepa.core.adapter import EvaluationBatch

        instructions = [cand[COMPONENT] for cand, batch in items for _ in batch]
        problems = [p for _, batch in items for p in batch]
        rows = self.ctx.answer(instructions, problems)
        self.examples_scored += len(rows)
        out, pos = [], 0
        for _, batch in items:
            chunk = rows[pos : pos + len(batch)]
            pos += len(batch)
            outputs = [{"output": r["output"], "extracted": r["extracted"], "correct": r["correct"]} for r in chunk]
            scores = [row_score(r) for r in chunk]  # the grader's score (a float metric's value too)
            traces = None
            if capture_traces:
                traces = [
                    {"question": p.question, "instruction": r["instruction"], "output": r["output"],
                     "extracted": r["extracted"], "gold": r["gold"], "correct": r["correct"], "solution": p.solution}
                    for p, r in zip(batch, chunk, strict=True)
                ]
            out.append(EvaluationBatch(outputs=outputs, scores=scores, trajectories=traces))
        return out

    def make_reflective_dataset(self, candidate: Mapping[str, str], eval_batch: Any,
                                components_to_update: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Per component, one record per evaluated problem: inputs, the response, and textual feedback."""
        traces = eval_batch.trajectories
        if traces is None:
            raise ValueError("make_reflective_dataset needs an evaluation run with capture_traces=True")
        records = [
            {
                "Inputs": {"problem": t["question"]},
                "Generated Outputs": _cut_end(str(t["output"]), self.max_output_chars),
                "Feedback": feedback_text(t, max_chars=self.max_output_chars),
            }
            for t in traces
        ]
        unknown = [c for c in components_to_update if c != COMPONENT]
        if unknown:
            raise KeyError(f"unknown components {unknown}; the only component is {COMPONENT!r}")
        return {c: list(records) for c in components_to_update}


class EngineReflectionLM:
    """gepa's reflection-LM callable (``prompt -> text``) on one of our engines; each call is one request."""

    def __init__(self, engine: Engine, temperature: float = 1.0, max_tokens: int = 256, seed: int = 0) -> None:
        self.engine = engine
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.calls = 0

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        """One completion of ``prompt`` (a string, or chat messages with text content)."""
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = []
            for m in prompt:
                content = m["content"]
                if not isinstance(content, str):
                    content = "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
                messages.append({"role": m["role"], "content": content})
        sp = SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens, seed=self.seed + self.calls)
        self.calls += 1
        (result,) = self.engine.generate([ChatRequest(messages, sp)])
        return result.text


class BudgetStopper:
    """gepa stopper: stop before an iteration whose worst-case cost would not fit the method budget.

    Metric calls and requests are checked against the worst case of one iteration; under a
    token cap, against the most tokens an iteration has cost so far. ``max_iterations`` is
    ignored when the budget says to spend all of it (``budget.exhaust``).
    """

    def __init__(self, ctx: MethodContext, metric_calls_per_iteration: int, max_iterations: int) -> None:
        self.ctx = ctx
        self.per_iteration = metric_calls_per_iteration
        self.max_iterations = max_iterations
        self._last_tokens: int | None = None
        self._worst_tokens = 0

    def __call__(self, gepa_state: Any) -> bool:
        """True when the next iteration could break the budget or the iteration cap is reached."""
        tokens = self.ctx.tokens
        if self._last_tokens is not None:
            self._worst_tokens = max(self._worst_tokens, tokens - self._last_tokens)
        self._last_tokens = tokens
        if not self.ctx.budget.exhaust and getattr(gepa_state, "i", 0) + 1 >= self.max_iterations:
            return True
        left = self.ctx.remaining_tokens()
        if left is not None and (left == 0 or left < self._worst_tokens):
            return True
        return not self.ctx.can_afford(self.per_iteration, self.per_iteration + 1)


class _HistoryCallback:
    """Records every full validation evaluation gepa makes into ``ctx.history``."""

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.best = -1.0

    def on_valset_evaluated(self, event: Mapping[str, Any]) -> None:
        scores = list(event["scores_by_val_id"].values())
        score = InstructionScore(event["candidate"][COMPONENT], int(round(sum(scores))), len(scores), [])
        accepted = score.accuracy > self.best
        self.best = max(self.best, score.accuracy)
        self.ctx.record(int(event["iteration"]), score, accepted=accepted, incumbent_accuracy=self.best,
                        candidate_idx=int(event["candidate_idx"]), parents=[int(p) for p in event["parent_ids"]
                                                                            if p is not None])


class GEPAMethod:
    """GEPA: reflective instruction evolution with Pareto-frontier parent selection."""

    name = "gepa"

    def __init__(self, settings: GEPASettings | None = None) -> None:
        self.cfg = settings or GEPASettings()
        self.result: Any = None

    def settings(self) -> dict[str, Any]:
        """The method's settings (cache key)."""
        return settings_dict(self.cfg)

    def fit(self, ctx: MethodContext) -> PromptPolicy:
        """Run ``gepa.optimize`` within the metric-call budget; return the best validation instruction."""
        import gepa

        cfg = self.cfg
        budget = ctx.budget.max_metric_calls
        if budget is None and ctx.budget.max_tokens is None:
            raise ValueError("gepa needs a metric-call budget or a token budget (max_metric_calls or max_tokens)")
        if not ctx.train or not ctx.val:
            raise ValueError("gepa needs training and validation problems")
        if not ctx.can_afford(len(ctx.val), len(ctx.val)):
            raise ValueError(f"the budget cannot even score the seed instruction on {len(ctx.val)} validation problems")
        seed_text = ctx.templates.cot_instruction if cfg.initial_instruction is None else cfg.initial_instruction
        run_dir = ctx.work_dir / "gepa"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh search (gepa would resume from a saved state)
        adapter = ProblemAdapter(ctx, cfg.max_output_chars)
        minibatch = min(cfg.minibatch_size, len(ctx.train))
        stopper = BudgetStopper(ctx, 2 * minibatch + len(ctx.val), cfg.max_iterations)
        reflection = EngineReflectionLM(ctx.engines["optimizer_model"], cfg.reflection_temperature,
                                        cfg.reflection_max_tokens, seed=ctx.seed)
        self.result = gepa.optimize(
            seed_candidate={COMPONENT: seed_text},
            trainset=list(ctx.train),
            valset=list(ctx.val),
            adapter=adapter,
            reflection_lm=reflection,
            candidate_selection_strategy=cfg.candidate_selection,
            reflection_minibatch_size=minibatch,
            use_merge=cfg.use_merge,
            max_metric_calls=None if budget is None else budget - ctx.metric_calls,
            stop_callbacks=[stopper],
            run_dir=str(run_dir),
            callbacks=[_HistoryCallback(ctx)],
            cache_evaluation=True,
            seed=ctx.seed,
            raise_on_exception=True,
            display_progress_bar=False,
        )
        best = self.result.candidates[self.result.best_idx][COMPONENT]
        log.info("gepa: %d candidates, best validation %.3f", len(self.result.candidates),
                 self.result.val_aggregate_scores[self.result.best_idx])
        return FixedInstructionPolicy(self.name, best)
