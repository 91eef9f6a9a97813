"""The ``numeric`` grader (GSM8K, GSM-Hard, SVAMP and any task whose answers are numbers).

Rule: the extracted final answer ``a`` (see :mod:`trprompt.grading.extract`: the last box, ``####``
line or "the answer is" phrase wins over earlier numbers) is correct for the gold ``g`` iff

* ``a == g`` exactly (as rationals: "0.5" == "1/2", "18.00" == "18", "1,234" == "1234"), or
* ``|a - g| <= 1e-3`` (:data:`NUMERIC_ABS_TOL`; float noise in golds such as ``14053029.666666666``), or
* ``g`` is not an integer and ``g`` rounded (half away from zero) to ``max(2, decimals of a)``
  decimals equals ``a`` (gold ``3.14159``, answer ``3.14``).

There is no relative tolerance: on GSM-Hard's large golds an off-by-one or off-by-seven slip is wrong.
Units, ``$``, ``%`` and thousands separators around the number are ignored ("$1,234", "12 km",
"3.50 dollars").
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from trprompt.grading.base import AnswerGrader
from trprompt.grading.extract import as_number, extract_answer

__all__ = ["NUMERIC_ABS_TOL", "NUMERIC_VERSION", "NumericGrader", "numbers_match"]

NUMERIC_ABS_TOL = Fraction(1, 1000)
NUMERIC_VERSION = "numeric-4"  # 1: rel_tol 1e-4 on gsm_hard; 2: exact / 1e-3 abs / rounded gold; 3: "5+3=8" is 8;
# 4: mixed numbers ("2 1/2", "2 and 1/2") and unicode fractions ("2½")


def _decimals(text: str) -> int:
    """Digits after the decimal point in a canonical number (``"3.25"`` -> 2, ``"7"``/``"1/3"`` -> 0)."""
    if "/" in text or "." not in text:
        return 0
    return len(text.split(".", 1)[1])


def _round_half_away(value: Fraction, decimals: int) -> Fraction:
    scale = 10**decimals
    scaled = abs(value) * scale
    rounded = Fraction(int(scaled + Fraction(1, 2)), scale)
    return rounded if value >= 0 else -rounded


def numbers_match(answer: Fraction, gold: Fraction, answer_decimals: int = 0) -> bool:
    """The numeric rule (see the module docstring) for an answer with ``answer_decimals`` decimals."""
    if answer == gold or abs(answer - gold) <= NUMERIC_ABS_TOL:
        return True
    if gold.denominator == 1:
        return False
    return _round_half_away(gold, max(2, answer_decimals)) == answer


class NumericGrader(AnswerGrader):
    """Numeric final answers; see the module docstring for the rule."""

    name = "numeric"
    version = NUMERIC_VERSION

    def extract(self, text: str) -> str | None:
        """The canonical number stated as the final answer ("1,000" -> "1000")."""
        return extract_answer(text or "")

    def equivalent(self, predicted: str | None, gold: str) -> bool:
        """Whether an extracted answer matches ``gold`` under the numeric rule."""
        if predicted is None or not predicted.strip():
            return False
        p, g = as_number(predicted), as_number(gold)
        if p is None or g is None:
            return False
        return numbers_match(p, g, _decimals(predicted.strip()))


    def check_gold(self, answer: Any, example: Any = None) -> str | None:
        """The gold must be one number (units, ``$``, ``%`` and separators allowed)."""
        problem = super().check_gold(answer, example)
        if problem is None and as_number(str(answer)) is None:
            problem = f"the gold answer {str(answer)[:80]!r} is not a number"
        return problem
