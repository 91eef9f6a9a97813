"""Task-level TextGrad: ONE instruction for the whole data set, optimised with the ``textgrad`` package.

Each step

1. answers ``minibatch_size`` training problems under the incumbent instruction
   (real target answers, graded);
2. turns the wrong ones into a textual loss (:data:`TASK_LOSS`) that the optimizer
   model evaluates on the instruction with :class:`textgrad.TextLoss`;
   ``loss.backward()`` leaves a textual gradient on the instruction. The whole
   instruction is shown to the optimizer (:func:`~trprompt.engines.textgrad_adapter.whole_value`);
3. samples ``candidates_per_step`` new instructions from TextGrad's update prompt in
   one request (:func:`~trprompt.engines.textgrad_adapter.propose_variants`: replies without
   the ``<IMPROVED_VARIABLE>`` tags are re-asked, then fall back to the incumbent);
4. scores every candidate by REAL validation accuracy in one batched call
   (:meth:`MethodContext.score`) and keeps the incumbent unless a candidate is
   strictly more accurate.

A step starts only if its worst-case cost fits the remaining budget; otherwise the
search stops and returns the incumbent.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trprompt.config import ConfigError
from trprompt.data import Problem
from trprompt.engines.wrappers import BudgetExceededError
from trprompt.evaluation import row_score
from trprompt.methods.base import InstructionScore, MethodContext, settings_dict
from trprompt.policies import FixedInstructionPolicy, PromptPolicy
from trprompt.templates import Templates

log = logging.getLogger("trprompt.methods.textgrad")

TASK_LOSS = Templates.textgrad_task_loss
"""The loss the optimizer model evaluates on the instruction (filled with real failures)."""


@dataclass
class TextGradSettings:
    """Task-level TextGrad's knobs."""

    steps: int = 3
    """Optimisation steps."""
    candidates_per_step: int = 2
    """New instructions sampled from one update prompt per step, each scored on validation."""
    minibatch_size: int = 8
    """Training problems answered under the incumbent each step (where the failures come from)."""
    failures_in_feedback: int = 4
    """Failed examples shown in the loss."""
    optimizer_temperature: float = 0.9
    """Sampling temperature of the candidate proposals."""
    optimizer_max_tokens: int = 256
    """Longest optimizer reply."""
    max_tag_retries: int = 2
    """Re-asks when a reply lacks the ``<IMPROVED_VARIABLE>`` tags."""
    initial_instruction: str | None = None
    """Starting instruction (``None``: the chain-of-thought instruction of the templates)."""

    def validate(self, path: str) -> None:
        """Raise ConfigError for values out of range."""
        if self.steps < 0:
            raise ConfigError(f"{path}.steps must be >= 0, got {self.steps}")
        for k in ("candidates_per_step", "minibatch_size", "failures_in_feedback", "optimizer_max_tokens"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{path}.{k} must be >= 1, got {getattr(self, k)}")
        if not 0.0 <= self.optimizer_temperature <= 2.0:
            raise ConfigError(f"{path}.optimizer_temperature must be in [0, 2], got {self.optimizer_temperature}")
        if self.max_tag_retries < 0:
            raise ConfigError(f"{path}.max_tag_retries must be >= 0")


def format_task_failures(rows: list[dict[str, Any]], max_chars: int = 600) -> str:
    """Failed rows as numbered examples (long outputs keep their end, where the answer is)."""

    def cut(s: Any) -> str:
        s = str(s).strip()
        return s if len(s) <= max_chars else "..." + s[-max_chars:]

    return "\n\n".join(
        f"Example {i}\nProblem: {cut(r['question'])}\nAssistant's answer: {cut(r['output'])}\n"
        f"Extracted final answer: {r.get('extracted')}\nCorrect final answer: {r['gold']}"
        for i, r in enumerate(rows, 1)
    )


class TextGradTaskMethod:
    """One instruction for the whole data set, optimised by TextGrad on real validation accuracy."""

    name = "textgrad"

    def __init__(self, settings: TextGradSettings | None = None) -> None:
        self.cfg = settings or TextGradSettings()

    def settings(self) -> dict[str, Any]:
        """The method's settings (cache key)."""
        return settings_dict(self.cfg)

    def _minibatches(self, ctx: MethodContext) -> Iterator[list[Problem]]:
        """Seeded epochs over the training problems, in full minibatches (all of them if fewer)."""
        order = list(ctx.train)
        size = self.cfg.minibatch_size
        rng = random.Random(ctx.seed * 31 + 7)
        while True:
            rng.shuffle(order)
            for i in range(0, len(order), size):
                chunk = order[i : i + size]
                if len(chunk) == size or len(order) < size:
                    yield chunk

    def fit(self, ctx: MethodContext) -> PromptPolicy:
        """Run the steps (see the module docstring) and return the best instruction found."""
        from trprompt.engines import textgrad_adapter as tge

        tg = tge.tg
        tge.redirect_textgrad_log(ctx.work_dir)
        cfg = self.cfg
        if not ctx.train:
            raise ValueError("textgrad needs training problems for its feedback")
        incumbent = ctx.templates.cot_instruction if cfg.initial_instruction is None else cfg.initial_instruction
        inc = ctx.score([incumbent])[0]
        ctx.record(0, inc, accepted=True, incumbent_accuracy=inc.accuracy)

        optimizer_engine = ctx.engines["optimizer_model"]
        critic = tge.ProtocolTextGradEngine(optimizer_engine, temperature=0.0, max_tokens=cfg.optimizer_max_tokens,
                                            seed=ctx.seed)
        proposer = tge.ProtocolTextGradEngine(optimizer_engine, temperature=cfg.optimizer_temperature,
                                              max_tokens=cfg.optimizer_max_tokens, seed=ctx.seed + 1)
        variable = tg.Variable(incumbent, role_description=ctx.templates.task_instruction_role, requires_grad=True)
        optimizer = tg.TextualGradientDescent(parameters=[variable], engine=proposer)
        batches = self._minibatches(ctx)
        worst_llm = 2 + (cfg.max_tag_retries + 1)  # loss + backward + proposal rounds

        for step in ctx.steps(cfg.steps):
            need = cfg.minibatch_size + cfg.candidates_per_step * len(ctx.val)
            if not ctx.can_afford(need, need + worst_llm):
                log.info("textgrad: step %d does not fit the remaining budget; stopping", step)
                break
            try:
                inc = self._step(ctx, step, inc, next(batches), variable, optimizer, critic, tg, tge)
            except BudgetExceededError as e:  # safety net: the pre-check above should prevent this
                log.warning("textgrad: budget reached in step %d (%s); keeping the incumbent", step, e)
                break
            if inc.perfect:
                break
        return FixedInstructionPolicy(self.name, inc.instruction)

    def _step(self, ctx: MethodContext, step: int, inc: InstructionScore, batch: list[Problem], variable: Any,
              optimizer: Any, critic: Any, tg: Any, tge: Any) -> InstructionScore:
        cfg = self.cfg
        rows = ctx.answer([inc.instruction] * len(batch), batch)
        failures = [r for r in rows if not r["correct"]]
        if not failures:  # nothing wrong on this minibatch: learn from the validation failures instead
            failures = inc.failures
        if not failures:
            return inc
        loss_text = ctx.templates.textgrad_task_loss.format(
            correct=sum(r["correct"] for r in rows), n=len(rows),
            failures=format_task_failures(failures[: cfg.failures_in_feedback]))
        variable.set_value(inc.instruction)
        optimizer.zero_grad()
        loss = tg.TextLoss(loss_text, engine=critic)(variable)
        tge.run_backward(loss, critic, variable)
        gradient = variable.get_gradient_text()
        proposals = tge.propose_variants(optimizer, variable, cfg.candidates_per_step, cfg.max_tag_retries)
        variable.set_value(inc.instruction)
        n_real = len(proposals.texts) - proposals.kept_incumbent
        scores = ctx.score(proposals.texts)
        best: InstructionScore | None = None
        best_i = -1
        for i, s in enumerate(scores):
            if i >= n_real or s.instruction == inc.instruction:
                continue
            if s.accuracy > inc.accuracy and (best is None or s.accuracy > best.accuracy):
                best, best_i = s, i
        new_inc = best or inc
        for i, s in enumerate(scores):
            ctx.record(step, s, accepted=i == best_i, incumbent_accuracy=new_inc.accuracy, fallback=i >= n_real,
                       gradient=gradient, minibatch_accuracy=sum(row_score(r) for r in rows) / len(rows))
        if best is not None:
            log.info("textgrad step %d: %.3f -> %.3f", step, inc.accuracy, best.accuracy)
        return new_inc
