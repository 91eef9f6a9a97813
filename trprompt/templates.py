"""Every meta-instruction the system sends to a model, in one place.

The texts are versioned (:data:`TEMPLATES_VERSION`); a run records the version and
the resolved texts. Override any of them by name with a YAML file
(``templates_file`` in the config, or ``load_templates(path)``).

Placeholders use ``str.format`` fields: ``{question}``, ``{reward}``,
``{instruction}``, ``{answer}``, ``{gold}``.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from trprompt.engines.base import Message

TEMPLATES_VERSION = "2"  # 2: Π prompts give the reward before the problem


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

    def reward_model_messages(self, question: str, instruction: str, answer: str, gold: str) -> list[Message]:
        """Chat for R(p, q, ŷ, y*): critique ``instruction``."""
        return [
            {"role": "system", "content": self.reward_model_system},
            {
                "role": "user",
                "content": self.reward_model_user.format(
                    question=question, instruction=instruction, answer=answer, gold=gold
                ),
            },
        ]

    def numeric_reward(self, correct: bool) -> str:
        """The ablation's reward text: just whether the answer was right."""
        return self.numeric_reward_correct if correct else self.numeric_reward_incorrect


_FIELDS: dict[str, set[str]] = {}


def _placeholders(text: str) -> set[str]:
    return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(text) if name}


def load_templates(path: str | Path | None = None) -> Templates:
    """Default templates, with any fields overridden by the YAML mapping at ``path``.

    Raises ValueError for unknown names, non-string values, or overrides whose
    placeholders differ from the default's (a typo there would silently drop a field).
    """
    base = Templates()
    if path is None:
        return base
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a templates file must be a mapping of template name to text")
    names = {f.name for f in dataclasses.fields(Templates)}
    changes: dict[str, str] = {}
    for k, v in data.items():
        if k not in names:
            raise ValueError(f"{path}: unknown template {k!r}; known: {', '.join(sorted(names))}")
        if not isinstance(v, str):
            raise ValueError(f"{path}: template {k!r} must be a string")
        want = _placeholders(getattr(base, k))
        got = _placeholders(v)
        if want != got:
            raise ValueError(f"{path}: template {k!r} must use placeholders {sorted(want)}, got {sorted(got)}")
        changes[k] = v
    return dataclasses.replace(base, **changes)
