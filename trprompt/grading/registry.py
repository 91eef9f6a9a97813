"""Grader specs -> :class:`Grader` objects, and the grader of each built-in dataset.

Specs: ``numeric``, ``math``, ``exact``, ``choice``, ``contains`` or ``python: package.module:function``.
The built-in datasets name their grader in :data:`trprompt.data.DATASET_GRADERS`.
"""

from __future__ import annotations

import threading

from trprompt.grading.base import Grader
from trprompt.grading.custom import PythonGrader
from trprompt.grading.math import MathGrader
from trprompt.grading.numeric import NumericGrader
from trprompt.grading.text import ChoiceGrader, ContainsGrader, ExactGrader

__all__ = ["GRADER_NAMES", "dataset_grader", "dataset_grader_name", "dataset_graders", "grader_version", "make_grader"]

GRADER_NAMES = ("numeric", "math", "exact", "choice", "contains", "python")

_BUILTIN: dict[str, type[Grader]] = {
    "numeric": NumericGrader,
    "math": MathGrader,
    "exact": ExactGrader,
    "choice": ChoiceGrader,
    "contains": ContainsGrader,
}
_cache: dict[str, Grader] = {}
_lock = threading.Lock()


def make_grader(spec: str | Grader) -> Grader:
    """The grader for ``spec`` (made once per spec and reused; a :class:`Grader` is returned as is).

    Raises:
        ValueError: an unknown spec, or a ``python:`` metric that cannot be imported.

    """
    if isinstance(spec, Grader):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"grader must be one of {', '.join(GRADER_NAMES)}, got {spec!r}")
    key = spec.strip()
    with _lock:
        grader = _cache.get(key)
        if grader is None:
            if key.lower() in _BUILTIN:
                grader = _BUILTIN[key.lower()]()
            elif key.lower().startswith("python"):
                grader = PythonGrader(key)
            else:
                raise ValueError(
                    f"unknown grader {spec!r}; choose one of numeric, math, exact, choice, contains "
                    "or 'python: package.module:function'"
                )
            _cache[key] = grader
        return grader


def grader_version(spec: str | Grader) -> str:
    """The version string of a grader spec (goes into run fingerprints and cache keys)."""
    return make_grader(spec).version


def dataset_graders() -> dict[str, str]:
    """Built-in dataset name -> grader spec: :data:`trprompt.data.DATASET_GRADERS`, the one table."""
    from trprompt.data import DATASET_GRADERS  # lazy: trprompt.data imports trprompt.grading

    return dict(DATASET_GRADERS)


def dataset_grader_name(dataset: str) -> str:
    """The grader spec a built-in dataset names in :data:`trprompt.data.DATASET_GRADERS`."""
    table = dataset_graders()
    try:
        return table[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(table)}") from None


def dataset_grader(dataset: str) -> Grader:
    """The grader of a built-in dataset."""
    return make_grader(dataset_grader_name(dataset))
