"""OPRO (Yang et al., "Large Language Models as Optimizers"): the optimizer LLM reads a scored history.

Each step builds a meta-prompt (:func:`build_meta_prompt`) holding

* the instructions scored so far with their validation scores, sorted in ASCENDING
  order so the best comes last (the recency the optimizer model pays most attention
  to falls on the strongest examples), trimmed to the ``max_in_meta_prompt`` best;
* a few training problems with their correct answers, showing where the
  instruction goes;

and samples ``proposals_per_step`` new instructions from it in one request at
``temperature`` (1.0 by default, for diversity). Every new instruction is scored by
real validation accuracy, all of a step's in one batched call. The best
instruction seen (earliest on ties) is the result. A step starts only if its
worst-case cost fits the remaining budget.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trprompt.config import ConfigError
from trprompt.data import Problem
from trprompt.engines.base import ChatRequest, SamplingParams
from trprompt.engines.wrappers import BudgetExceededError
from trprompt.methods.base import InstructionScore, MethodContext, settings_dict
from trprompt.policies import FixedInstructionPolicy, PromptPolicy
from trprompt.templates import Templates

log = logging.getLogger("trprompt.methods.opro")

OPEN, CLOSE = "<INS>", "</INS>"

META_HEADER = Templates.opro_meta_header
"""The math wording of the header (a run uses ``templates.opro_meta_header``, which follows the task)."""
META_EXEMPLARS = "Here are some of the problems. {open} marks where the instruction is placed."
META_TASK = (
    "Write ONE new instruction that is different from every instruction above and that you expect to score "
    "higher than all of them. It must be general (it is used for every problem) and short. Reply with the "
    f"instruction between {OPEN} and {CLOSE}."
)


@dataclass
class OPROSettings:
    """OPRO's knobs."""

    steps: int = 3
    """Optimisation steps."""
    proposals_per_step: int = 4
    """New instructions sampled per step (one request with ``n`` samples), each scored on validation."""
    max_in_meta_prompt: int = 20
    """Most scored instructions listed in the meta-prompt (the best ones)."""
    exemplars: int = 3
    """Training problems (with answers) shown in the meta-prompt."""
    temperature: float = 1.0
    """Sampling temperature of the proposals."""
    max_tokens: int = 128
    """Longest proposal."""
    initial_instructions: list[str] | None = None
    """Instructions scored before the first step (``None``: no instruction and chain-of-thought)."""

    def validate(self, path: str) -> None:
        """Raise ConfigError for values out of range."""
        if self.steps < 0:
            raise ConfigError(f"{path}.steps must be >= 0, got {self.steps}")
        for k in ("proposals_per_step", "max_in_meta_prompt", "max_tokens"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{path}.{k} must be >= 1, got {getattr(self, k)}")
        if self.exemplars < 0:
            raise ConfigError(f"{path}.exemplars must be >= 0")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"{path}.temperature must be in [0, 2], got {self.temperature}")
        if self.initial_instructions is not None and not self.initial_instructions:
            raise ConfigError(f"{path}.initial_instructions must not be empty (use null for the default)")


def meta_prompt_entries(scored: Sequence[tuple[str, float]], max_in_meta_prompt: int) -> list[tuple[str, float]]:
    """The (instruction, score) pairs the meta-prompt lists: the ``max_in_meta_prompt`` best, ascending.

    Ties keep their order of discovery (the earlier one first). Duplicate texts are listed once
    (with their first score, which is the only one: scores are cached by text).
    """
    seen: set[str] = set()
    unique: list[tuple[int, str, float]] = []
    for i, (text, score) in enumerate(scored):
        if text not in seen:
            seen.add(text)
            unique.append((i, text, score))
    ranked = sorted(unique, key=lambda t: (t[2], t[0]))
    return [(text, score) for _, text, score in ranked[-max_in_meta_prompt:]]


def build_meta_prompt(scored: Sequence[tuple[str, float]], exemplars: Sequence[Problem],
                      max_in_meta_prompt: int, header: str = META_HEADER) -> str:
    """The OPRO meta-prompt: scored instructions (ascending, best last) then exemplar problems, then the task.

    ``header`` describes the task (``templates.opro_meta_header``: the task's description for a user's task).
    """
    parts = [header, ""]
    for text, score in meta_prompt_entries(scored, max_in_meta_prompt):
        parts += [f"Instruction: {OPEN}{text}{CLOSE}", f"Score: {round(100 * score)}", ""]
    if exemplars:
        parts += [META_EXEMPLARS.format(open=OPEN), ""]
        for p in exemplars:
            parts += [f"Problem: {p.question.strip()}", OPEN, f"Correct answer: {p.answer}", ""]
    parts.append(META_TASK)
    return "\n".join(parts)


def extract_instruction(reply: str, max_chars: int = 600) -> str | None:
    """The instruction in an optimizer reply: the first non-empty ``<INS>...</INS>`` span.

    An opening tag with no closing one keeps the rest of the reply. With no tags at all the first
    paragraph of the reply is used. Returns ``None`` when nothing usable is left.
    """
    for m in re.finditer(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", reply, re.DOTALL):
        text = m.group(1).strip()
        if text:
            return text[:max_chars].strip()
    if OPEN in reply:
        return None
    text = reply.replace(CLOSE, "").strip().split("\n\n", 1)[0].strip()
    if text.lower().startswith("instruction:"):
        text = text[len("instruction:") :].strip()
    return text[:max_chars].strip() or None


class OPROMethod:
    """OPRO: an LLM proposes instructions from the history of scored ones."""

    name = "opro"

    def __init__(self, settings: OPROSettings | None = None) -> None:
        self.cfg = settings or OPROSettings()
        self.meta_prompts: list[str] = []
        """Every meta-prompt sent (for inspection and tests)."""

    def settings(self) -> dict[str, Any]:
        """The method's settings (cache key)."""
        return settings_dict(self.cfg)

    def fit(self, ctx: MethodContext) -> PromptPolicy:
        """Score the initial instructions, then run the OPRO steps; return the best instruction."""
        cfg = self.cfg
        initial = cfg.initial_instructions or ["", ctx.templates.cot_instruction]
        scored: list[InstructionScore] = []
        best: InstructionScore | None = None
        for s in ctx.score(list(dict.fromkeys(initial))):
            scored.append(s)
            if best is None or s.accuracy > best.accuracy:
                best = s
        assert best is not None
        for s in scored:
            ctx.record(0, s, accepted=s is best, incumbent_accuracy=best.accuracy)
        rng = random.Random(ctx.seed * 7 + 3)
        for step in ctx.steps(cfg.steps):
            if not ctx.can_afford(cfg.proposals_per_step * len(ctx.val), cfg.proposals_per_step * len(ctx.val) + 1):
                log.info("opro: step %d does not fit the remaining budget; stopping", step)
                break
            try:
                best = self._step(ctx, step, scored, best, rng)
            except BudgetExceededError as e:
                log.warning("opro: budget reached in step %d (%s); keeping the best so far", step, e)
                break
        return FixedInstructionPolicy(self.name, best.instruction)

    def _step(self, ctx: MethodContext, step: int, scored: list[InstructionScore], best: InstructionScore,
              rng: random.Random) -> InstructionScore:
        cfg = self.cfg
        exemplars = rng.sample(ctx.train, min(cfg.exemplars, len(ctx.train)))
        meta = build_meta_prompt([(s.instruction, s.accuracy) for s in scored], exemplars, cfg.max_in_meta_prompt,
                                     ctx.templates.opro_meta_header)
        self.meta_prompts.append(meta)
        sp = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, n=cfg.proposals_per_step,
                            seed=ctx.seed * 1000 + step)
        (result,) = ctx.engines["optimizer_model"].generate([ChatRequest([{"role": "user", "content": meta}], sp)])
        known = {s.instruction for s in scored}
        proposals: list[str] = []
        for reply in result.texts:
            text = extract_instruction(reply)
            if text is not None and text not in known and text not in proposals:
                proposals.append(text)
        if not proposals:
            log.info("opro step %d: no new instruction in %d replies", step, len(result.texts))
            return best
        new_scores = ctx.score(proposals)
        step_best = max(new_scores, key=lambda s: s.accuracy)
        new_best = step_best if step_best.accuracy > best.accuracy else best
        for s in new_scores:
            scored.append(s)
            ctx.record(step, s, accepted=s is new_best, incumbent_accuracy=new_best.accuracy)
        return new_best
