"""The :class:`Problem` record: one question of a task with its gold answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Problem"]


@dataclass(frozen=True)
class Problem:
    r"""One question of a task (a built-in benchmark or a user's file).

    Attributes:
        id: stable identifier. Built-in tasks and files without an id field use
            ``"<task>-<pool>-<row>"`` with ``pool`` the file the row came from (``train``/``test``)
            or, for a single file split by hash, the side it fell on, and ``row`` its 0-based row
            in that file (e.g. ``"gsm8k-test-00042"``). Ids do not depend on the split seed.
        question: the text shown to the models (with the lettered choices appended when the task
            has a choices field).
        answer: the gold final answer as text ("18", "0.5", "\frac{1}{2}", "B", "Paris").
        solution: the reference worked solution / explanation when the task has one, else ``None``.
        dataset: the task's name (a built-in name, or the file's stem).
        metadata: extra source fields (MATH level/type, the file and line of a user's row, ...).
        grader: the grader spec that scores answers to this question (``numeric``, ``math``, ...).
        choices: the options of a multiple-choice question, else ``None``.

    """

    id: str
    question: str
    answer: str
    solution: str | None
    dataset: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    grader: str = "numeric"
    choices: tuple[str, ...] | None = None
