"""Every meta-instruction the system sends to a model, in one place.

The texts are versioned (:data:`TEMPLATES_VERSION`, bumped when a default text changes) and
fingerprinted (:meth:`Templates.fingerprint`, which changes whenever any resolved text changes); a
run records both and the resolved texts. Override any of them by name with a YAML file
(``templates_file`` in the config, or ``load_templates(path)``).

Two wordings, chosen by the task (:mod:`trprompt.data.tasks`):

* ``math``: the texts as they were written for the built-in math benchmarks (the :class:`Templates`
  defaults, unchanged, so GSM8K/MATH/... runs send byte-identical prompts);
* ``neutral``: :data:`NEUTRAL_WORDING`, task-neutral texts into which the task's ``description``
  (one or two sentences: what the assistant does, what a correct answer looks like) is put at each
  ``{task_description}``. This fills the prompt-model, reward-model, TextGrad and baseline
  meta-instructions and the initial optimal reward t*_0.

Placeholders use ``str.format`` fields: ``{question}``, ``{reward}``, ``{instruction}``,
``{answer}``, ``{gold}``, ``{reference}`` (the reference solution block, empty when there is none).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trprompt.engines.base import Message

TEMPLATES_VERSION = "3"  # 2: Π prompts give the reward before the problem; 3: task-neutral wording, OPRO/TextGrad texts

TASK_DESCRIPTION = "{task_description}"
"""Where the task's description goes in :data:`NEUTRAL_WORDING` (replaced before any other formatting)."""


@dataclass(frozen=True)
class Templates:
    """The texts behind each role. Field names are the override keys."""

    prompt_model_system: str = (
        "You write instructions for a math-solving assistant. Given a problem and a description of the "
        "feedback an ideal instruction would earn, write ONE short instruction tailored to this problem that "
        "helps the assistant reach the correct final answer. Do not solve the problem yourself."
    )
    # The reward comes before the problem: all prompts under one t* then share a long
    # prefix, which engines prefill once (HFEngine per batch, vLLM with prefix caching).
    prompt_model_user: str = (
        "Feedback the ideal instruction would earn:\n{reward}\n\n"
        "Problem:\n{question}\n\n"
        "Write the instruction for this problem only. Reply with the instruction and nothing else."
    )
    target_user: str = "{question}\n\n{instruction}"
    target_user_no_instruction: str = "{question}"
    reward_model_system: str = (
        "You review instructions given to a math-solving assistant. You judge how well the instruction guided "
        "the assistant toward the correct answer and how it could be better."
    )
    reward_model_user: str = (
        "Problem:\n{question}\n\n"
        "Instruction given to the assistant:\n{instruction}\n\n"
        "Assistant's answer:\n{answer}\n\n"
        "Correct final answer: {gold}\n\n"
        "In a few sentences, critique the instruction: did it lead the assistant to the correct final answer, "
        "which parts helped or misled, and what a better instruction for this problem would stress."
    )
    numeric_reward_correct: str = "correct"
    numeric_reward_incorrect: str = "incorrect"
    initial_optimal_reward: str = (
        "The instruction is tailored to this exact problem: it names the quantities that matter, points out the "
        "step most likely to go wrong, and asks the assistant to reason step by step, check its arithmetic, and "
        "finish with the final numeric answer. Following it, the assistant reached the correct answer."
    )
    cot_instruction: str = "Let's think step by step."
    optimal_reward_role: str = (
        "a description of the ideal feedback for a problem-specific instruction; a prompt-writing model is "
        "conditioned on it, so it should describe instructions that make a math assistant answer correctly"
    )
    reward_search_loss: str = (
        "A prompt-writing model was conditioned on the feedback description below and wrote one instruction per "
        "validation problem. The target assistant answered {accuracy_pct:.1f}% of {n} problems correctly. "
        "Here are problems it got wrong, with the instruction it was given, its answer, the correct answer and a "
        "reviewer's critique:\n\n{failures}\n\n"
        "Explain how the feedback description should change so that the instructions it produces lead the "
        "assistant to correct answers more often."
    )
    task_instruction_role: str = "a single instruction appended to every math problem given to an assistant"
    reward_model_reference: str = "Reference solution:\n{solution}\n\n"
    opro_meta_header: str = (
        "You are improving the instruction given to a math assistant. The instruction is written after every math "
        "word problem, and the assistant then solves the problem.\n\n"
        "Below are instructions that were tried, each with its score: the percentage of validation problems the "
        "assistant solved when given it. They are listed from the lowest to the highest score."
    )
    textgrad_task_loss: str = (
        "The text you will read is an instruction that is appended to every math word problem given to an "
        "assistant. Under this instruction the assistant solved {correct} of {n} training problems. These are "
        "problems it got wrong, with its answer and the correct final answer:\n\n{failures}\n\n"
        "Point out what in the instruction failed to prevent these mistakes and how it should change so that "
        "the assistant reaches the correct final answer more often. Be concise."
    )

    def format(self, name: str, **fields: object) -> str:
        """Render template ``name`` with ``fields``; a missing field raises KeyError naming it."""
        return getattr(self, name).format(**fields)

    def prompt_model_messages(self, question: str, reward: str) -> list[Message]:
        """Chat for Π(q, t): write an instruction for ``question`` under reward ``reward``."""
        return [
            {"role": "system", "content": self.prompt_model_system},
            {"role": "user", "content": self.prompt_model_user.format(question=question, reward=reward)},
        ]

    def target_messages(self, question: str, instruction: str) -> list[Message]:
        """Chat for the target model: the question followed by the instruction (if any)."""
        if instruction.strip():
            content = self.target_user.format(question=question, instruction=instruction.strip())
        else:
            content = self.target_user_no_instruction.format(question=question)
        return [{"role": "user", "content": content}]

    def reward_model_messages(
        self, question: str, instruction: str, answer: str, gold: str, solution: str | None = None
    ) -> list[Message]:
        """Chat for R(p, q, ŷ, y*): critique ``instruction``.

        ``solution`` (a reference solution / explanation) is shown where ``reward_model_user`` has a
        ``{reference}`` field (the neutral wording; the math wording has none, as before).
        """
        reference = self.reward_model_reference.format(solution=solution.strip()) if solution else ""
        return [
            {"role": "system", "content": self.reward_model_system},
            {
                "role": "user",
                "content": self.reward_model_user.format(
                    question=question, instruction=instruction, answer=answer, gold=gold, reference=reference
                ),
            },
        ]

    def numeric_reward(self, correct: bool) -> str:
        """The ablation's reward text: just whether the answer was right."""
        return self.numeric_reward_correct if correct else self.numeric_reward_incorrect

    def fingerprint(self) -> str:
        """Short hash of every text: changes whenever any template (or the task description in it) changes."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def record(self) -> dict[str, Any]:
        """What a run stores in ``templates.json``: version, fingerprint and the resolved texts."""
        return {"version": TEMPLATES_VERSION, "fingerprint": self.fingerprint(), **dataclasses.asdict(self)}


NEUTRAL_WORDING: dict[str, str] = {
    "prompt_model_system": (
        "You write instructions for an assistant. The assistant's task: {task_description} Given a question and "
        "a description of the feedback an ideal instruction would earn, write ONE short instruction tailored to "
        "this question that helps the assistant reach the correct answer. Do not answer the question yourself."
    ),
    "prompt_model_user": (
        "Feedback the ideal instruction would earn:\n{reward}\n\n"
        "Question:\n{question}\n\n"
        "Write the instruction for this question only. Reply with the instruction and nothing else."
    ),
    "reward_model_system": (
        "You review instructions given to an assistant. The assistant's task: {task_description} You judge how "
        "well the instruction guided the assistant toward the correct answer and how it could be better."
    ),
    "reward_model_user": (
        "Question:\n{question}\n\n"
        "Instruction given to the assistant:\n{instruction}\n\n"
        "Assistant's answer:\n{answer}\n\n"
        "Correct answer: {gold}\n\n"
        "{reference}"
        "In a few sentences, critique the instruction: did it lead the assistant to the correct answer, which "
        "parts helped or misled, and what a better instruction for this question would stress."
    ),
    "reward_model_reference": "Reference explanation:\n{solution}\n\n",
    "initial_optimal_reward": (
        "The instruction is tailored to this exact question: it names the details that matter, points out the "
        "step most likely to go wrong, and asks the assistant to reason step by step, check its work, and finish "
        "with an answer in the form the task asks for. The task: {task_description} Following it, the assistant "
        "reached the correct answer."
    ),
    "optimal_reward_role": (
        "a description of the ideal feedback for a question-specific instruction; a prompt-writing model is "
        "conditioned on it, so it should describe instructions that make the assistant answer correctly "
        "(the assistant's task: {task_description})"
    ),
    "reward_search_loss": (
        "A prompt-writing model was conditioned on the feedback description below and wrote one instruction per "
        "validation question. The target assistant answered {accuracy_pct:.1f}% of {n} questions correctly. "
        "Here are questions it got wrong, with the instruction it was given, its answer, the correct answer and a "
        "reviewer's critique:\n\n{failures}\n\n"
        "Explain how the feedback description should change so that the instructions it produces lead the "
        "assistant to correct answers more often."
    ),
    "task_instruction_role": (
        "a single instruction appended to every question given to an assistant (the assistant's task: "
        "{task_description})"
    ),
    "opro_meta_header": (
        "You are improving the instruction given to an assistant. The assistant's task: {task_description} The "
        "instruction is written after every question, and the assistant then answers it.\n\n"
        "Below are instructions that were tried, each with its score: the percentage of validation questions the "
        "assistant answered correctly when given it. They are listed from the lowest to the highest score."
    ),
    "textgrad_task_loss": (
        "The text you will read is an instruction that is appended to every question given to an assistant. "
        "The assistant's task: {task_description} Under this instruction the assistant answered {correct} of "
        "{n} training questions correctly. These are questions it got wrong, with its answer and the correct "
        "answer:\n\n{failures}\n\n"
        "Point out what in the instruction failed to prevent these mistakes and how it should change so that "
        "the assistant reaches the correct answer more often. Be concise."
    ),
}
"""The task-neutral texts (every other template keeps its default, which is already task-neutral)."""

_OPTIONAL = {"reward_model_user": {"reference"}}
"""Placeholders a template may use beyond its default's."""


def _put_description(text: str, description: str) -> str:
    """``text`` with the description at ``{task_description}`` (braces escaped where ``text`` is formatted later)."""
    if TASK_DESCRIPTION not in text:
        return text
    d = description.strip()
    if _placeholders(text.replace(TASK_DESCRIPTION, "")):
        d = d.replace("{", "{{").replace("}", "}}")
    return text.replace(TASK_DESCRIPTION, d)


_FIELDS: dict[str, set[str]] = {}


def _placeholders(text: str) -> set[str]:
    return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(text) if name}


def load_templates(path: str | Path | None = None, task: Any = None) -> Templates:
    """The templates for ``task``, with any fields overridden by the YAML mapping at ``path``.

    Args:
        path: a YAML mapping of template name to text (``templates_file``).
        task: a :class:`~trprompt.data.tasks.Task` (or anything with ``description`` and ``spec.wording``);
            ``None`` or the ``math`` wording: the :class:`Templates` defaults; ``neutral``:
            :data:`NEUTRAL_WORDING` with the task's description. Overrides may use
            ``{task_description}`` too.

    Raises ValueError for unknown names, non-string values, or overrides whose placeholders differ from
    the default's (a typo there would silently drop a field).

    """
    base = Templates()
    wording = getattr(getattr(task, "spec", None), "wording", "math") if task is not None else "math"
    description = getattr(task, "description", "") if task is not None else ""
    changes: dict[str, str] = dict(NEUTRAL_WORDING) if wording == "neutral" else {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a templates file must be a mapping of template name to text")
        names = {f.name for f in dataclasses.fields(Templates)}
        for k, v in data.items():
            if k not in names:
                raise ValueError(f"{path}: unknown template {k!r}; known: {', '.join(sorted(names))}")
            if not isinstance(v, str):
                raise ValueError(f"{path}: template {k!r} must be a string")
            want = _placeholders(getattr(base, k))
            got = _placeholders(v.replace(TASK_DESCRIPTION, "")) - _OPTIONAL.get(k, set())
            if want != got:
                raise ValueError(f"{path}: template {k!r} must use placeholders {sorted(want)}, got {sorted(got)}")
            changes[k] = v
    if not changes:
        return base
    return dataclasses.replace(base, **{k: _put_description(v, description) for k, v in changes.items()})
