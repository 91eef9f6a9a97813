r"""The ``math`` grader (MATH / MATH-500 and any task with LaTeX answers), built on math-verify.

Extraction keeps the raw LaTeX of the final answer (:func:`trprompt.grading.extract.extract_latex_answer`):
``\boxed{}``/``\fbox{}``, "Final Answer: The final answer is $X$. I hope it is correct.", "the answer
is $X$" (escaped dollars such as ``$\$18.90$`` are part of the answer), ``####``, else the last number.

Comparison, first rule that says "equal" wins:

1. identical after clean-up (math delimiters, ``\text{}`` wrappers, ``\$``, ``\%``, ``^\circ``,
   ``\left``/``\right``, spacing commands and whitespace removed);
2. when both sides are plain numbers (ignoring trailing units such as ``5\text{ cm}``, ``\$``,
   ``\%`` and ``^\circ``): exact rational equality decides, either way ("0.33" is not ``\frac{1}{3}``);
3. ``math-verify``: ``verify(parse(gold), parse(prediction))``, each step limited to ``timeout_s``
   (rounded up to whole seconds) and run in a helper process off the main thread
   (:mod:`trprompt.grading.mathverify_pool`). If it cannot parse a side, the answer is wrong.
"""

from __future__ import annotations

import math
from typing import Any

from trprompt.grading import mathverify_pool
from trprompt.grading.base import AnswerGrader
from trprompt.grading.extract import as_latex_number, extract_latex_answer, normalized_latex

__all__ = ["MATH_VERSION", "MathGrader", "math_equivalent"]

MATH_VERSION = "math-4"  # 2: escaped dollars, \text{} units, plain numbers exact; 3: "5+3=8" is 8;
# 4: "the answer is (B)" extracts the choice letter


def math_equivalent(predicted: str | None, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether the LaTeX answer ``predicted`` is equivalent to ``gold`` (see the module docstring)."""
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    if predicted is None or not predicted.strip():
        return False
    if normalized_latex(predicted) == normalized_latex(gold):
        return True
    p, g = as_latex_number(predicted), as_latex_number(gold)
    if p is not None and g is not None:
        return p == g  # two plain numbers: exact rational comparison, no math-verify needed
    return bool(mathverify_pool.verify(predicted.strip(), gold.strip(), max(1, math.ceil(timeout_s))))


class MathGrader(AnswerGrader):
    """LaTeX answers compared with math-verify; see the module docstring."""

    name = "math"
    version = MATH_VERSION

    def __init__(self, timeout_s: float = 5.0) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.timeout_s = timeout_s

    def extract(self, text: str) -> str | None:
        """The raw LaTeX of the final answer."""
        return extract_latex_answer(text or "")

    def equivalent(self, predicted: str | None, gold: str) -> bool:
        """Whether an extracted answer is equivalent to ``gold``."""
        return math_equivalent(predicted, gold, self.timeout_s)


    def check_gold(self, answer: Any, example: Any = None) -> str | None:
        """The gold must be non-empty LaTeX with balanced braces."""
        problem = super().check_gold(answer, example)
        if problem is None:
            depth = 0
            text = str(answer).replace("\\{", "").replace("\\}", "")
            for ch in text:
                depth += (ch == "{") - (ch == "}")
                if depth < 0:
                    break
            if depth != 0:
                problem = f"the gold answer {str(answer)[:80]!r} has unbalanced braces"
        return problem
