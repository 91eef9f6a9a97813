"""Step 1 of Algorithm 1: the synthetic set {(q, critique, p)} that Π is fine-tuned on.

For N training questions sampled per iteration: p = Π(q, t*) at the prompt temperature,
ŷ = target(q, p) (graded against y*), and the critique t = R(p, q, ŷ, y*) from the reward
model. In the numeric-reward ablation the critique is the templates' "correct"/"incorrect"
text and no reward model is called. The loop (:mod:`trprompt.loop`) decides whether the stage
runs and stores the rows (:meth:`~trprompt.run_dir.RunPaths.synthetic_set`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from trprompt.config import GenerationConfig
from trprompt.data import Problem
from trprompt.engines.base import ChatRequest, Engine, SamplingParams
from trprompt.engines.wrappers import generate_in_chunks
from trprompt.evaluation import answer_and_grade
from trprompt.policies import clean_instruction, prompt_model_request
from trprompt.templates import Templates


def sample_questions(train: Sequence[Problem], n: int, seed: int, iteration: int) -> list[Problem]:
    """The ``n`` training questions of ``iteration`` (all of them when there are fewer), seeded per iteration."""
    rng = random.Random(seed * 7919 + iteration)
    return rng.sample(list(train), min(n, len(train)))


def generate_synthetic_set(
    engines: dict[str, Engine],
    problems: Sequence[Problem],
    optimal_reward: str,
    adapter: str | None,
    templates: Templates,
    generation: GenerationConfig,
    *,
    seed: int,
    iteration: int,
    textual_reward: bool = True,
    chunk_size: int = 64,
    progress: bool = False,
    say: Callable[[str], None] = lambda msg: None,
) -> list[dict[str, Any]]:
    """One row per question: the question, Π's ``instruction``, the target's ``output`` and grade, the ``critique``.

    ``engines`` maps ``prompt_model``, ``target_model`` and (for textual rewards) ``reward_model``
    to engines. Π's sampling seed differs per question, so two questions never share a draw.
    """
    g, k = generation, iteration
    prompt_reqs = [
        prompt_model_request(
            templates, p.question, optimal_reward,
            SamplingParams(temperature=g.prompt_temperature, max_tokens=g.prompt_max_tokens,
                           seed=seed * 100_003 + k * 10_007 + i),
            adapter=adapter,
        )
        for i, p in enumerate(problems)
    ]
    say(f"iteration {k}: synthetic set of {len(problems)} questions: prompt model")
    pres = generate_in_chunks(engines["prompt_model"], prompt_reqs, chunk_size, "Π(q, t*)", progress)
    instructions = [clean_instruction(r.text) for r in pres]
    say(f"iteration {k}: synthetic set: target model")
    rows = answer_and_grade(engines["target_model"], problems, instructions, templates,
                            g.target_max_tokens, g.target_temperature, chunk_size, progress, seed=seed)
    if textual_reward:
        say(f"iteration {k}: synthetic set: reward model")
        sp = SamplingParams(temperature=g.reward_temperature, max_tokens=g.reward_max_tokens, seed=seed)
        rreqs = [
            ChatRequest(templates.reward_model_messages(p.question, row["instruction"], row["output"],
                                                        p.answer, p.solution), sp)
            for p, row in zip(problems, rows, strict=True)
        ]
        rres = generate_in_chunks(engines["reward_model"], rreqs, chunk_size, "R(p, q, ŷ, y*)", progress)
        critiques = [r.text.strip() for r in rres]
        critique_tokens = [r.completion_tokens for r in rres]
    else:
        critiques = [templates.numeric_reward(row["correct"]) for row in rows]
        critique_tokens = [0] * len(rows)
    for row, pr, t, rt in zip(rows, pres, critiques, critique_tokens, strict=True):
        row["critique"] = t
        row["prompt_completion_tokens"] = pr.completion_tokens
        row["critique_completion_tokens"] = rt
        row["iteration"] = k
    return rows
