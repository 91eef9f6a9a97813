"""Grading: final-answer extraction and the graders every accuracy in the project goes through.

Graders (``grader:`` in a task config, one spec string each; :func:`make_grader`):

* ``numeric``: numbers; exact, within 1e-3, or the gold rounded to the answer's decimals (at least
  2) for a non-integer gold. No relative tolerance (:mod:`trprompt.grading.numeric`).
* ``math``: LaTeX answers, math-verify equivalence (:mod:`trprompt.grading.math`).
* ``exact``: SQuAD-style normalised exact match; ``contains``: the gold occurs in the output;
  ``choice``: multiple choice by letter or option text (:mod:`trprompt.grading.text`).
* ``python: package.module:function``: a user metric returning a bool or a float in [0, 1]
  (:mod:`trprompt.grading.custom`).

Each :class:`Grader` has ``name``, ``version`` (part of fingerprints and cache keys), ``extract``,
``grade``/``score`` and ``check_gold``. Built-in datasets name their grader in
:data:`trprompt.data.DATASET_GRADERS`; :func:`grader_for` picks the grader of an example (its own
``grader`` field when it has one, else its dataset's). :func:`grade` and :func:`is_equivalent` are
the older dataset-keyed entry points and go through the same graders.
"""

from __future__ import annotations

from typing import Any

from trprompt.grading.base import Grade, Grader, GradingError, example_field
from trprompt.grading.extract import extract_answer, extract_latex_answer, find_boxed
from trprompt.grading.math import MathGrader, math_equivalent
from trprompt.grading.numeric import NUMERIC_ABS_TOL, NumericGrader, numbers_match
from trprompt.grading.registry import (
    GRADER_NAMES,
    dataset_grader,
    dataset_grader_name,
    grader_version,
    make_grader,
)
from trprompt.grading.text import ChoiceGrader, ContainsGrader, ExactGrader, normalize_text

__all__ = [
    "GRADED_DATASETS",
    "GRADER_NAMES",
    "GRADER_VERSION",
    "GSM_HARD_ABS_TOL",
    "NUMERIC_ABS_TOL",
    "ChoiceGrader",
    "ContainsGrader",
    "ExactGrader",
    "Grade",
    "Grader",
    "GradingError",
    "MathGrader",
    "NumericGrader",
    "dataset_grader",
    "dataset_grader_name",
    "extract_answer",
    "extract_latex_answer",
    "find_boxed",
    "grade",
    "grader_for",
    "grader_version",
    "is_equivalent",
    "make_grader",
    "math_equivalent",
    "normalize_text",
    "numbers_match",
]

GRADER_VERSION = ",".join(g.version for g in (NumericGrader, MathGrader, ExactGrader, ChoiceGrader, ContainsGrader))
"""Version of all built-in grading rules together (changes whenever any built-in grader's rules change).
One grader's own version is :func:`grader_version` of its spec."""

GSM_HARD_ABS_TOL = float(NUMERIC_ABS_TOL)  # kept for old imports; the numeric rule applies to all numeric sets


def __getattr__(name: str) -> Any:
    if name == "GRADED_DATASETS":  # lazy: trprompt.data imports this package
        from trprompt.grading.registry import dataset_graders

        return tuple(dataset_graders())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def grader_for(example: Any) -> Grader:
    """The grader of an example: its own ``grader`` spec when it has one, else its dataset's."""
    spec = example_field(example, "grader")
    if spec:
        return make_grader(spec)
    dataset = example_field(example, "dataset")
    if not dataset:
        raise ValueError("the example names neither a grader nor a dataset")
    return dataset_grader(str(dataset))


def _dataset_grader(dataset: str, timeout_s: float) -> Grader:
    grader = dataset_grader(dataset)
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    if isinstance(grader, MathGrader) and timeout_s != grader.timeout_s:
        return MathGrader(timeout_s)
    return grader


def grade(dataset: str, output: str, gold: str, timeout_s: float = 5.0) -> Grade:
    """Extract the final answer from a model ``output`` and grade it against ``gold`` with ``dataset``'s grader.

    Raises ``ValueError`` for an unknown dataset.
    """
    grader = _dataset_grader(dataset, timeout_s)
    return grader.grade(output or "", {"answer": gold, "dataset": dataset})


def is_equivalent(dataset: str, predicted: str | None, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether an already extracted answer ``predicted`` matches ``gold`` under ``dataset``'s grader.

    Only for the ``numeric`` and ``math`` datasets (the ones whose graders compare extracted answers).
    """
    grader = _dataset_grader(dataset, timeout_s)
    if not isinstance(grader, (NumericGrader, MathGrader)):
        raise ValueError(f"is_equivalent needs a numeric or math dataset, not {dataset!r} ({grader.name})")
    return grader.equivalent(predicted, gold)
