"""The :class:`Grader` interface, the :class:`Grade` result and access to an example's fields."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Grade", "Grader", "GradingError", "example_field", "example_id"]


@dataclass(frozen=True)
class Grade:
    """The outcome of grading one model output.

    Attributes:
        correct: whether the answer counts as correct (``score >= 1`` for graded metrics).
        extracted: the answer that was compared (``None`` when nothing could be extracted).
        score: the metric in ``[0, 1]``; defaults to ``1.0``/``0.0`` from ``correct``. Accuracy is the
            mean of the scores, so a float metric is averaged exactly like a binary one.

    """

    correct: bool
    extracted: str | None
    score: float | None = None

    def __post_init__(self) -> None:
        if self.score is None:
            object.__setattr__(self, "score", 1.0 if self.correct else 0.0)


class GradingError(ValueError):
    """A grader could not grade an example (bad gold, a user metric that raised or returned junk)."""


def example_field(example: Any, name: str, default: Any = None) -> Any:
    """Field ``name`` of an example: an attribute, a mapping key, or a key of its ``metadata``."""
    if isinstance(example, Mapping):
        if name in example:
            return example[name]
        meta = example.get("metadata")
    else:
        value = getattr(example, name, None)
        if value is not None:
            return value
        meta = getattr(example, "metadata", None)
    if isinstance(meta, Mapping) and name in meta:
        return meta[name]
    return default


def example_id(example: Any) -> str:
    """The example's id for error messages (``"?"`` when it has none)."""
    value = example_field(example, "id")
    return "?" if value is None else str(value)


class Grader(ABC):
    """Extracts a final answer from a model output and scores it against an example's gold answer.

    Attributes:
        name: the grader spec it was made from (``"numeric"``, ``"python: pkg.mod:fn"``, ...).
        version: changes whenever the grader's rules change; part of run fingerprints and cache keys.

    """

    name: str
    version: str

    @abstractmethod
    def extract(self, text: str) -> str | None:
        """The final answer stated in ``text`` (``None`` when there is none)."""

    @abstractmethod
    def grade(self, prediction_text: str, example: Any) -> Grade:
        """Grade one model output against ``example`` (anything with an ``answer``; see :func:`example_field`)."""

    def score(self, prediction_text: str, example: Any) -> float:
        """The metric in ``[0, 1]`` for one model output."""
        result = self.grade(prediction_text, example).score
        assert result is not None
        return result

    def check_gold(self, answer: Any, example: Any = None) -> str | None:
        """``None`` when ``answer`` is a usable gold answer, else an error message saying why not."""
        if answer is None or not str(answer).strip():
            return "the gold answer is empty"
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} version={self.version!r}>"



class AnswerGrader(Grader):
    """A grader that extracts one answer and compares it with the gold by :meth:`equivalent`."""

    @abstractmethod
    def equivalent(self, predicted: str | None, gold: str) -> bool:
        """Whether an extracted answer is equivalent to ``gold``."""

    def grade_text(self, prediction_text: str, gold: str) -> Grade:
        """Grade a model output against a gold answer given as text."""
        extracted = self.extract(prediction_text)
        return Grade(correct=self.equivalent(extracted, gold), extracted=extracted)

    def grade(self, prediction_text: str, example: Any) -> Grade:
        """Grade against ``example.answer``."""
        return self.grade_text(prediction_text, gold_of(example))

def gold_of(example: Any) -> str:
    """The example's gold answer as text; a clear error when it has none."""
    gold = example_field(example, "answer")
    if gold is None:
        raise GradingError(f"example {example_id(example)} has no answer field")
    return str(gold)
