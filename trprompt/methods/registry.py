"""Names of the prompting methods and how to build the simple ones."""

from __future__ import annotations

from pathlib import Path

from trprompt.evaluation import FixedInstructionPolicy
from trprompt.methods.names import BASELINE_NAMES
from trprompt.templates import Templates

__all__ = ["BASELINE_NAMES", "fixed_policy"]


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
    raise ValueError(f"unknown fixed-instruction method {name!r}; choose plain, cot or fixed")
