"""``python: package.module:function``: a user's own metric as a grader.

The function is imported once, when the grader is made, and called as ``function(prediction_text,
example)``; it returns a ``bool`` or a float in ``[0, 1]`` (averaged like accuracy; only 1.0 counts
as "correct"). An exception or any other return value raises :class:`GradingError` naming the
example id. The grader's version is the spec plus a hash of the module's source file, so editing
the metric invalidates cached results.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import re
from collections.abc import Callable
from typing import Any

from trprompt.grading.base import Grade, Grader, GradingError, example_id
from trprompt.grading.text import extract_text_answer

__all__ = ["PythonGrader", "parse_python_spec"]

_SPEC = re.compile(r"^\s*python\s*:\s*([A-Za-z_][\w.]*)\s*:\s*([A-Za-z_]\w*)\s*$")


def parse_python_spec(spec: str) -> tuple[str, str]:
    """``"python: pkg.mod:fn"`` -> ``("pkg.mod", "fn")``; a clear error for anything else."""
    m = _SPEC.match(spec)
    if m is None:
        raise ValueError(f"grader {spec!r}: expected 'python: package.module:function'")
    return m.group(1), m.group(2)


def _source_hash(fn: Callable[..., Any]) -> str:
    try:
        path = inspect.getsourcefile(fn)
        data = open(path, "rb").read() if path else inspect.getsource(fn).encode()
    except (OSError, TypeError):
        data = repr(fn).encode()
    return hashlib.sha256(data).hexdigest()[:12]


class PythonGrader(Grader):
    """A user metric ``(prediction_text, example) -> bool | float``, loaded once."""

    def __init__(self, spec: str) -> None:
        module_name, fn_name = parse_python_spec(spec)
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ValueError(f"grader {spec!r}: cannot import module {module_name!r}: {exc}") from exc
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ValueError(f"grader {spec!r}: module {module_name!r} has no function {fn_name!r}")
        self.fn: Callable[[str, Any], Any] = fn
        self.name = f"python: {module_name}:{fn_name}"
        self.version = f"python:{module_name}:{fn_name}@{_source_hash(fn)}"

    def extract(self, text: str) -> str | None:
        """The final answer for display (the metric itself sees the whole output)."""
        return extract_text_answer(text or "")

    def grade(self, prediction_text: str, example: Any) -> Grade:
        """Call the metric; a bool counts as 0/1, a float must lie in [0, 1]."""
        try:
            value = self.fn(prediction_text, example)
        except Exception as exc:
            raise GradingError(
                f"grader {self.name!r} raised on example {example_id(example)}: {type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(value, bool):
            score = 1.0 if value else 0.0
        elif isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0:
            score = float(value)
        else:
            raise GradingError(
                f"grader {self.name!r} returned {value!r} on example {example_id(example)}; "
                "expected a bool or a float in [0, 1]"
            )
        return Grade(correct=score >= 1.0, extracted=self.extract(prediction_text), score=score)
