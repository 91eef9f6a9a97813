r"""Text graders: ``exact`` (normalised exact match), ``contains`` and ``choice`` (multiple choice).

Normalisation (SQuAD-style, :func:`normalize_text`): lower case, punctuation removed, the articles
"a", "an", "the" removed, whitespace collapsed.

* ``exact``: the final answer (:func:`extract_text_answer`: last ``\boxed{}``, ``####`` line, or the
  rest of the line after the last "answer is"/"answer:" phrase, else the last non-empty line) equals
  the gold after normalisation.
* ``contains``: the normalised gold appears in the normalised model output as whole words.
* ``choice``: the chosen option (a letter, "(B)", "B)", "Answer: B", ``\boxed{B}``, or the option's
  text) is the gold option. The gold may be the letter or the option's text. Options come from the
  example's ``choices`` field (a list, in letter order, or a mapping letter -> text) or from lines of
  the question such as "A) ...", "(B) ...", "C. ...", "D: ...".
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from trprompt.grading.base import Grade, Grader, GradingError, example_field, example_id, gold_of
from trprompt.grading.extract import find_boxed

__all__ = [
    "ChoiceGrader",
    "ContainsGrader",
    "ExactGrader",
    "extract_choice",
    "extract_text_answer",
    "normalize_text",
    "parse_choices",
]

_PUNCT = set(string.punctuation) | {"\u2019", "\u2018", "\u201c", "\u201d", "\u2013", "\u2014"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PHRASE = re.compile(r"\banswer\b\s*(?:\*\*|__)?\s*(?:is\b|:|=)\s*(?:\*\*|__)?", re.IGNORECASE)
_TEXT_WRAP = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\s*\{(.*)\}$", re.DOTALL)


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _unwrap(s: str) -> str:
    s = s.strip()
    for _ in range(3):
        for left, right in (("$$", "$$"), ("$", "$"), ("**", "**"), ("\\(", "\\)")):
            if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : -len(right)].strip()
        m = _TEXT_WRAP.match(s)
        if m:
            s = m.group(1).strip()
    return s


def extract_text_answer(text: str) -> str | None:
    """The final answer of a free-text output (see the module docstring); ``None`` for empty text."""
    if not text or not text.strip():
        return None
    boxed = find_boxed(text)
    if boxed:
        return _unwrap(boxed)
    if "####" in text:
        line = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        if line:
            return _unwrap(line)
    last = None
    for m in _PHRASE.finditer(text):
        last = m
    if last is not None:
        line = text[last.end() :].strip().split("\n", 1)[0].strip()
        if line:
            return _unwrap(line.rstrip(".").strip()) or None
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return _unwrap(lines[-1]) if lines else None


class ExactGrader(Grader):
    """Normalised exact match of the final answer (SQuAD EM)."""

    name = "exact"
    version = "exact-1"

    def extract(self, text: str) -> str | None:
        """The final answer (see :func:`extract_text_answer`)."""
        return extract_text_answer(text or "")

    def grade(self, prediction_text: str, example: Any) -> Grade:
        """1 when the normalised final answer equals the normalised gold."""
        gold = normalize_text(gold_of(example))
        extracted = self.extract(prediction_text)
        correct = extracted is not None and normalize_text(extracted) == gold
        return Grade(correct=correct, extracted=extracted)

    def check_gold(self, answer: Any, example: Any = None) -> str | None:
        """The gold must not normalise to nothing (e.g. only punctuation or articles)."""
        problem = super().check_gold(answer, example)
        if problem is None and not normalize_text(str(answer)):
            problem = f"the gold answer {str(answer)[:80]!r} is empty after normalisation"
        return problem


class ContainsGrader(ExactGrader):
    """The normalised gold appears, as whole words, in the normalised model output."""

    name = "contains"
    version = "contains-1"

    def grade(self, prediction_text: str, example: Any) -> Grade:
        """1 when the gold occurs in the output."""
        gold = normalize_text(gold_of(example))
        haystack = normalize_text(prediction_text or "")
        correct = bool(gold) and f" {gold} " in f" {haystack} "
        return Grade(correct=correct, extracted=self.extract(prediction_text))


# ---------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------

_LETTERS = string.ascii_uppercase
_OPTION_LINE = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.):])\s+(\S.*?)\s*$", re.MULTILINE)


def parse_choices(example: Any) -> dict[str, str]:
    """The options of a multiple-choice example as ``{letter: text}`` (empty when none are found).

    From the ``choices`` field (a list, lettered A, B, ... in order, or a mapping letter -> text),
    else from option lines in the question ("A) ...", "(B) ...", "C. ...", "D: ...").
    """
    raw = example_field(example, "choices")
    if isinstance(raw, str) and raw.strip():
        raw = [c.strip() for c in re.split(r"\s*[|\n]\s*", raw.strip()) if c.strip()]
    if isinstance(raw, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in raw.items()}
    if isinstance(raw, Sequence) and not isinstance(raw, str) and raw:
        if len(raw) > len(_LETTERS):
            raise GradingError(f"example {example_id(example)} has more than {len(_LETTERS)} choices")
        return {_LETTERS[i]: str(c) for i, c in enumerate(raw)}
    question = example_field(example, "question") or ""
    found: dict[str, str] = {}
    for m in _OPTION_LINE.finditer(str(question)):
        letter = m.group(1) or m.group(2)
        found.setdefault(letter, m.group(3))
    # Only a run starting at A counts as options ("A. Smith wrote ..." alone is not a choice list).
    letters = sorted(found)
    if not letters or letters[0] != "A" or len(letters) < 2:
        return {}
    return found


_CHOICE_PATTERNS = [
    # "answer is (B)", "Answer: B", "answer: option C" (the letter itself must be upper case)
    re.compile(
        r"(?i:\banswer\b)(?:\s*(?i:is))?[^A-Za-z0-9\n]{0,12}(?:(?i:option|choice)[^A-Za-z0-9\n]{0,4})?([A-Z])\b(?![a-z'])"
    ),
    # "answer is (b)": a lower-case letter counts only in parentheses right after the phrase
    re.compile(r"(?i:\banswer\b)(?:\s*(?i:is))?[^A-Za-z0-9\n]{0,12}\(([A-Za-z])\)"),
    re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-Z])\)?\s*\}?\s*\}"),
    # "I choose B", "I'd go with option C", "the correct option is D"
    re.compile(
        r"(?i:\b(?:choose|pick|select|go\s+with|(?:correct|right|best)\s+(?:option|choice)(?:\s+is)?)\b)"
        r"[^A-Za-z0-9\n]{0,6}(?:(?i:option|choice)[^A-Za-z0-9\n]{0,4})?([A-Z])\b(?![a-z'])"
    ),
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"(?:^|\s)([A-Z])\)"),
    re.compile(r"^\s*\**([A-Z])\**\s*(?:[.:)]|$)", re.MULTILINE),
    re.compile(r"\b([A-Z])\)?\s+is\s+(?:the\s+)?(?:correct|right)\b"),
]


def _letter_of(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a gold/answer text names: the letter itself or the option's text."""
    stripped = _unwrap(text).strip().strip("().:*").strip()
    if len(stripped) == 1 and stripped.upper() in options:
        return stripped.upper()
    norm = normalize_text(text)
    for letter, option in options.items():
        if norm and normalize_text(option) == norm:
            return letter
    return None


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a model output chooses (see the module docstring), ``None`` if unclear."""
    if not text or not text.strip():
        return None
    whole = _letter_of(text, options) if len(text.strip()) <= 200 else None
    if whole:
        return whole
    for pattern in _CHOICE_PATTERNS:
        hits = [m.group(1).upper() for m in pattern.finditer(text)]  # (only the "(b)" pattern has lower case)
        hits = [h for h in hits if h in options]
        if hits:
            return hits[-1]
    # The option text itself: the option whose text is mentioned last wins.
    haystack = f" {normalize_text(text)} "
    best: tuple[int, str] | None = None
    for letter, option in options.items():
        norm = normalize_text(option)
        if not norm:
            continue
        pos = haystack.rfind(f" {norm} ")
        if pos >= 0 and (best is None or pos > best[0]):
            best = (pos, letter)
    return best[1] if best else None


class ChoiceGrader(Grader):
    """Multiple choice: the chosen letter (or option text) against the gold option."""

    name = "choice"
    version = "choice-3"  # 2: "answer is: **B**", "B is correct"; 3: "answer is (b)", "I choose B"

    def extract(self, text: str) -> str | None:
        """The letter chosen, with options A-Z assumed (use :meth:`grade` to resolve option texts)."""
        return extract_choice(text, {letter: "" for letter in _LETTERS})

    def grade(self, prediction_text: str, example: Any) -> Grade:
        """1 when the chosen option is the gold option."""
        options = parse_choices(example)
        gold = gold_of(example)
        gold_letter = _letter_of(gold, options) if options else _letter_of(gold, {k: "" for k in _LETTERS})
        if gold_letter is None:
            raise GradingError(
                f"example {example_id(example)}: gold {gold[:80]!r} is neither an option letter nor an option's text"
            )
        extracted = extract_choice(prediction_text, options or {k: "" for k in _LETTERS})
        return Grade(correct=extracted == gold_letter, extracted=extracted)

    def check_gold(self, answer: Any, example: Any = None) -> str | None:
        """The gold must name one option (its letter or its text) of the example's choices."""
        problem = super().check_gold(answer, example)
        if problem is not None:
            return problem
        options = parse_choices(example) if example is not None else {}
        if options:
            if _letter_of(str(answer), options) is None:
                return f"the gold answer {str(answer)[:80]!r} is not one of the options {sorted(options)}"
            return None
        if _letter_of(str(answer), {k: "" for k in _LETTERS}) is None:
            return f"the gold answer {str(answer)[:80]!r} is not an option letter and the example lists no choices"
        return None
