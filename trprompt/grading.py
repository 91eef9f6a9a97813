r"""Final-answer extraction and grading for the math benchmarks.

Every accuracy the project reports goes through :func:`grade`, so the rules are spelled out here.

Extraction (:func:`extract_answer`), first rule that yields something wins:

1. the contents of the last ``\boxed{...}`` / ``\fbox{...}`` (braces matched, nesting allowed);
2. the rest of the line after the last ``####``;
3. the text after the last "answer is" / "answer:" phrase (case-insensitive): a ``$...$`` span in it,
   else the first number in it;
4. the last number anywhere in the text.

Candidates are cleaned: ``$``, ``\$``, ``\%``/``%``, ``^\circ``, thousands commas, a trailing period,
``\text{...}`` wrappers and trailing unit words are dropped; "- 3" reads as -3; decimals, ``a/b`` and
``\frac{a}{b}``/``\dfrac``/``\tfrac`` are understood. A numeric candidate is returned in canonical
form ("1,000" -> "1000", "18.00" -> "18", "\frac{3}{4}" -> "3/4"). Text with no number and no
boxed answer gives ``None``.

Comparison (:func:`is_equivalent`):

* ``gsm8k`` and ``svamp``: exact rational equality of the two numbers ("0.5" == "1/2", "18.0" == "18").
* ``gsm_hard``: ``math.isclose`` with ``rel_tol=GSM_HARD_REL_TOL`` (1e-4) and ``abs_tol=GSM_HARD_ABS_TOL``
  (1e-4). The gold targets are Python floats such as ``14053029.666666666``, so an exact test would
  reject correctly rounded answers. This is the tolerance of the common evaluation harnesses; note
  that on a gold of 9,867,630 it accepts answers within about 987.
* ``math``: the raw LaTeX of the extracted answer against the gold answer with ``math-verify``
  (``parse`` of both, then ``verify(gold, prediction)``), after two cheap shortcuts that can only say
  "equal" (identical cleaned strings, equal numbers). If math-verify cannot parse either side the
  answer counts as equal only when the cleaned strings are identical.

Time limits for ``math``: each of the three math-verify steps (parse gold, parse prediction, compare)
is limited to ``timeout_s`` rounded up to whole seconds. math-verify enforces this with
``SIGALRM``, which only works in the main thread, so calls from any other thread are run in a small
pool of helper processes (started on first use, reused after); a helper that has not answered after
``3 * timeout + 2`` seconds is killed and the answer counts as incorrect.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

__all__ = [
    "GRADED_DATASETS",
    "GSM_HARD_ABS_TOL",
    "GSM_HARD_REL_TOL",
    "Grade",
    "extract_answer",
    "find_boxed",
    "grade",
    "is_equivalent",
]

logger = logging.getLogger(__name__)

GRADED_DATASETS = ("gsm8k", "gsm_hard", "math", "svamp")
GSM_HARD_REL_TOL = 1e-4
GSM_HARD_ABS_TOL = 1e-4

# Helper processes for math-verify calls made outside the main thread.
_MAX_HELPERS = max(1, min(4, os.cpu_count() or 1))
_HELPER_START_TIMEOUT_S = 120.0

# Guards against pathological model outputs.
_MAX_NUMBER_CHARS = 400  # longer digit strings are not answers
_MAX_EXPONENT = 400  # "1e999999999" would otherwise build a gigantic integer
_MAX_CANDIDATE_CHARS = 400  # unit/"x =" heuristics only on short candidates
_MAX_BOX_TRIES = 8  # how many boxes, from the last backwards, may be tried when the last is unclosed


@dataclass(frozen=True)
class Grade:
    """The outcome of grading one model output.

    Attributes:
        correct: whether the extracted answer matches the gold answer.
        extracted: the answer that was compared (``None`` when nothing could be extracted).

    """

    correct: bool
    extracted: str | None


# ---------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------

_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _match_braces(text: str, open_pos: int) -> int | None:
    r"""Index of the ``}`` closing the ``{`` at ``open_pos`` (escaped ``\{``/``\}`` ignored)."""
    depth = 0
    i = open_pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def find_boxed(text: str) -> str | None:
    r"""Contents of the last well-formed ``\boxed{...}`` or ``\fbox{...}`` in ``text``.

    Braces are matched, so nested groups such as ``\boxed{\frac{1}{\sqrt{2}}}`` come back whole.
    The brace-less form ``\boxed 5`` is accepted too. Returns ``None`` when there is no such box
    (an unterminated last box falls back to the one before it).
    """
    for m in reversed(list(_BOX_CMD.finditer(text))[-_MAX_BOX_TRIES:]):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _match_braces(text, i)
            if end is not None:
                return text[i + 1 : end].strip()
        elif i > m.end():  # "\boxed 5": one token, up to whitespace or a closing "$"
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                return tok.group(0)
    return None


_NUM_BODY = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?"
_TEX_FRAC = r"\\[dt]?frac\s*\{\s*(?:{n})\s*\}\s*\{\s*(?:{n})\s*\}".replace("{n}", _NUM_BODY)
_NUM_TOKEN = re.compile(
    rf"(?P<sign>-\s?)?(?:(?P<tex>{_TEX_FRAC})|(?P<num>{_NUM_BODY})(?:\s*/\s*(?P<den>{_NUM_BODY}))?)(?![\d])"
)
_ANSWER_PHRASE = re.compile(r"\banswer\b\s*(?:\*\*|__)?\s*(?:is\b|:|=)", re.IGNORECASE)
_HASHES = re.compile(r"####")
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_WRAPPER = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mathbf|mbox|boxed|fbox)\s*\{")
_UNIT_TAIL = re.compile(
    r"\s*(?:\\(?:text|textrm|mathrm|mbox)\s*\{[^{}]*\}|[A-Za-z][A-Za-z\s.'/-]*)$",
)


def _strip_wrappers(s: str) -> str:
    r"""Remove math delimiters and whole-string ``\text{}``-style wrappers, repeatedly."""
    prev = None
    while prev != s:
        prev = s
        s = s.strip()
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
        m = _WRAPPER.match(s)
        if m and _match_braces(s, m.end() - 1) == len(s) - 1:
            s = s[m.end() : -1].strip()
        s = s.rstrip(".").rstrip()
    return s


def _clean(s: str) -> str:
    """Light clean-up shared by every candidate answer (keeps LaTeX structure)."""
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s.replace("\u2212", "-"))
    s = _strip_wrappers(s)
    s = s.replace("\\!", "").replace("{,}", ",").replace("\\,", "").replace("\\;", " ").replace("\\ ", " ")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = re.sub(r"\\(?:d|t)frac", r"\\frac", s)
    return _strip_wrappers(s)


def _parse_plain_number(s: str) -> Fraction | None:
    r"""Parse a whole string that is one number: int, decimal, ``a/b`` or ``\frac{a}{b}`` (with sign)."""
    s = s.strip()
    m = re.fullmatch(r"([+-]?)\s*(.*)", s, re.DOTALL)
    assert m is not None
    sign, body = m.group(1), m.group(2).strip()
    if body.startswith("-") or body.startswith("+"):
        return None
    frac = re.fullmatch(r"\\frac\s*\{\s*(?P<a>[^{}]+?)\s*\}\s*\{\s*(?P<b>[^{}]+?)\s*\}", body)
    if frac:
        num, den = _parse_plain_number(frac.group("a")), _parse_plain_number(frac.group("b"))
    else:
        parts = body.split("/")
        if len(parts) == 2:
            num, den = _parse_decimal(parts[0]), _parse_decimal(parts[1])
        elif len(parts) == 1:
            num, den = _parse_decimal(parts[0]), Fraction(1)
        else:
            return None
    if num is None or den is None or den == 0:
        return None
    value = num / den
    return -value if sign == "-" else value


def _parse_decimal(s: str) -> Fraction | None:
    s = s.strip()
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?(?:[eE][+-]?\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?", s)
    if m is None:
        return None
    # No real answer needs more; this also keeps huge exponents from stalling the conversion.
    if len(s) > _MAX_NUMBER_CHARS or (m.group(1) and abs(int(m.group(1)[:6])) > _MAX_EXPONENT):
        return None
    try:
        return Fraction(Decimal(s))
    except (InvalidOperation, ValueError):
        return None


def _canonical(value: Fraction) -> str:
    """Canonical text for a number: integers bare, terminating decimals as decimals, else ``a/b``."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den == 1:
        text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{value.numerator}/{value.denominator}"


def _token_value(m: re.Match[str], text: str) -> Fraction | None:
    """Numeric value of a ``_NUM_TOKEN`` match; a ``-`` after an operand is subtraction, not a sign."""
    if m.group("tex"):
        value = _parse_plain_number(re.sub(r"\\[dt]?frac", r"\\frac", m.group("tex")))
    else:
        num = _parse_decimal(m.group("num"))
        den = _parse_decimal(m.group("den")) if m.group("den") else Fraction(1)
        value = None if num is None or den is None or den == 0 else num / den
    if value is None:
        return None
    if m.group("sign"):
        before = text[: m.start()].rstrip()
        if not before or not (before[-1].isdigit() or before[-1] in ")]}%"):
            value = -value
    return value


def _numeric_candidate(raw: str, search: bool) -> Fraction | None:
    """The number a candidate answer stands for.

    Tries, in order: the whole cleaned string; a number followed by unit words; ``x = <number>``;
    and, when ``search`` is true, the first number token anywhere in it.
    """
    s = _clean(raw)
    value = _parse_plain_number(s)
    if value is not None:
        return value
    search_only = len(s) > _MAX_CANDIDATE_CHARS  # long free text: only the token search below applies
    tail = None if search_only else _UNIT_TAIL.search(s)
    if tail and tail.start() > 0:
        value = _parse_plain_number(_clean(s[: tail.start()]))
        if value is not None:
            return value
    eq = None if search_only else re.fullmatch(r"[A-Za-z]\w*\s*=\s*(.+)", s, re.DOTALL)
    if eq:
        value = _numeric_candidate(eq.group(1), search=False)
        if value is not None:
            return value
    if search:
        s_flat = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
        for m in _NUM_TOKEN.finditer(s_flat):
            value = _token_value(m, s_flat)
            if value is not None:
                return value
    return None


def _last_number(text: str) -> tuple[str, Fraction] | None:
    """The last number token in free text, as (matched text, value)."""
    flat = text.replace("\u2212", "-")
    found: tuple[str, Fraction] | None = None
    for m in _NUM_TOKEN.finditer(flat):
        value = _token_value(m, flat)
        if value is not None:
            found = (m.group(0), value)
    return found


def _phrase_text(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" phrase, up to the end of its line."""
    last = None
    for m in _ANSWER_PHRASE.finditer(text):
        last = m
    if last is None:
        return None
    rest = text[last.end() :].lstrip(" \t:*_")
    span = _MATH_SPAN.match(rest)
    if span is None:
        rest = rest.split("\n", 1)[0]
    return rest


def _phrase_answer(phrase: str, latex: bool, finish: Callable[[str, bool], str | None]) -> str | None:
    """The answer inside the text after an "answer is" phrase (see :func:`_extract`)."""
    span = _MATH_SPAN.search(phrase)
    if span is not None and not re.search(r"\d", phrase[: span.start()]):
        out = finish(next(g for g in span.groups() if g is not None), False)
        if out is not None:
            return out
    sentence = re.split(r"\.(?!\d)", phrase.split("\n", 1)[0], maxsplit=1)[0].strip()
    if not sentence:
        return None
    if latex:
        value = _parse_plain_number(_clean(sentence))
        if value is not None:
            return _canonical(value)
        if "$" not in sentence and len(sentence) <= 60 and re.search(r"[\d\\]", sentence):
            return _strip_wrappers(sentence) or None
    value = _numeric_candidate(sentence, search=True)
    return _canonical(value) if value is not None else None


def _extract(text: str, latex: bool) -> str | None:
    """Shared extraction; ``latex=True`` keeps the raw LaTeX of the answer (used for MATH)."""
    if not text:
        return None
    text = text.replace("\u2212", "-")

    def finish(raw: str, search: bool) -> str | None:
        if latex:
            cleaned = _strip_wrappers(raw)
            return cleaned or None
        value = _numeric_candidate(raw, search=search)
        if value is not None:
            return _canonical(value)
        if not search:  # boxed / math-span answers that are not numbers: keep them as LaTeX
            cleaned = _clean(raw)
            return cleaned or None
        return None

    boxed = find_boxed(text)
    if boxed:
        out = finish(boxed, search=False)
        if out is not None:
            return out

    hashes = list(_HASHES.finditer(text))
    if hashes:
        line = text[hashes[-1].end() :].split("\n", 1)[0].strip()
        if line:
            value = _numeric_candidate(line, search=True)
            if value is not None:
                return _canonical(value)
            if latex:
                return _strip_wrappers(line) or None

    phrase = _phrase_text(text)
    if phrase:
        out = _phrase_answer(phrase, latex, finish)
        if out is not None:
            return out

    last = _last_number(text)
    if last is not None:
        return _canonical(last[1])
    return None


def extract_answer(text: str) -> str | None:
    """The final answer stated in a model output, cleaned and (when numeric) canonicalised.

    See the module docstring for the rules. Numbers come back canonical ("1000", "-3", "0.5",
    "3/4"); a boxed or ``$...$`` answer that is not a plain number comes back as cleaned LaTeX.
    Returns ``None`` when the text holds neither a box nor any number.
    """
    return _extract(text, latex=False)


# ---------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------


def _check_dataset(dataset: str) -> None:
    if dataset not in GRADED_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(GRADED_DATASETS)}")


def _as_number(s: str | None) -> Fraction | None:
    if s is None:
        return None
    return _numeric_candidate(s.replace("\u2212", "-"), search=False)


def _normalized_string(s: str) -> str:
    return re.sub(r"\s+", "", _clean(s))


def is_equivalent(dataset: str, predicted: str | None, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether an extracted answer ``predicted`` matches the gold answer under ``dataset``'s rule.

    ``gsm8k``/``svamp``: exact numeric equality; ``gsm_hard``: numeric within 1e-4 (relative or
    absolute); ``math``: math-verify equivalence with a string-equality fallback. ``None`` or an
    unparsable prediction is never equivalent. Raises ``ValueError`` for an unknown dataset.
    """
    _check_dataset(dataset)
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    if predicted is None or not predicted.strip():
        return False
    if dataset in ("gsm8k", "svamp"):
        p, g = _as_number(predicted), _as_number(gold)
        return p is not None and g is not None and p == g
    if dataset == "gsm_hard":
        p, g = _as_number(predicted), _as_number(gold)
        if p is None or g is None:
            return False
        # math.isclose's rule, evaluated exactly on rationals (no float overflow or rounding).
        rel, tol = Fraction(GSM_HARD_REL_TOL), Fraction(GSM_HARD_ABS_TOL)
        return abs(p - g) <= max(rel * max(abs(p), abs(g)), tol)
    # math
    if _normalized_string(predicted) == _normalized_string(gold):
        return True
    p, g = _parse_plain_number(_clean(predicted)), _parse_plain_number(_clean(gold))
    if p is not None and g is not None and p == g:
        return True
    verdict = _math_verify_cached(predicted.strip(), gold.strip(), max(1, math.ceil(timeout_s)))
    return bool(verdict)


def grade(dataset: str, output: str, gold: str, timeout_s: float = 5.0) -> Grade:
    """Extract the final answer from a model ``output`` and compare it with ``gold``.

    For ``math`` the extracted answer is the raw LaTeX (boxed contents, "answer is" phrase, or the
    last number); for the other data sets it is the canonical number. Raises ``ValueError`` for an
    unknown dataset.
    """
    _check_dataset(dataset)
    extracted = _extract(output or "", latex=dataset == "math")
    return Grade(correct=is_equivalent(dataset, extracted, gold, timeout_s), extracted=extracted)


# ---------------------------------------------------------------------------------------------------
# math-verify with a time limit that works from any thread
# ---------------------------------------------------------------------------------------------------


def _mv_wrap(s: str) -> str:
    return "$" + s + "$"


def _verify_here(pred: str, gold: str, timeout_int: int | None) -> bool | None:
    """Run math-verify in this thread. ``None`` when either side cannot be parsed or it errors.

    ``timeout_int`` must be ``None`` (no limit) unless this is the main thread.
    """
    from math_verify import parse, verify

    try:
        gold_parsed = parse(_mv_wrap(gold), parsing_timeout=timeout_int)  # type: ignore[arg-type]
        pred_parsed = parse(_mv_wrap(pred), parsing_timeout=timeout_int)  # type: ignore[arg-type]
        if not gold_parsed or not pred_parsed:
            return None
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_int))
    except Exception:  # math-verify swallows most errors itself; anything else counts as "unknown"
        logger.debug("math-verify failed on %r vs %r", pred, gold, exc_info=True)
        return None


def _can_use_signals() -> bool:
    return hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=65536)
def _math_verify_cached(pred: str, gold: str, timeout_int: int) -> bool | None:
    if _can_use_signals():
        return _verify_here(pred, gold, timeout_int)
    return _verify_off_thread(pred, gold, timeout_int)


def _hard_limit_s(timeout_int: int) -> float:
    """Wall-clock seconds an off-main-thread math-verify check may take before it is abandoned."""
    return 3 * timeout_int + 2.0


class _HelperTimeout(Exception):
    pass


class _Helper:
    """A child Python process that runs math-verify in its main thread, one request at a time."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[1])
        boot = f"import sys; sys.path.insert(0, {root!r}); from trprompt.grading import _helper_main; _helper_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
            close_fds=True,
        )
        self._buf = b""
        if self._read_line(time.monotonic() + _HELPER_START_TIMEOUT_S) != b"ready":
            self.kill()
            raise RuntimeError("grading helper process did not start")

    def _read_line(self, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _HelperTimeout
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("grading helper process exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def ask(self, pred: str, gold: str, timeout_int: int) -> bool | None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"pred": pred, "gold": gold, "t": timeout_int}) + "\n").encode())
        reply = json.loads(self._read_line(time.monotonic() + _hard_limit_s(timeout_int)))
        return reply["r"]

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # already gone
            pass


_idle_helpers: queue.LifoQueue[_Helper] = queue.LifoQueue()
_helper_slots = threading.BoundedSemaphore(_MAX_HELPERS)
_all_helpers: set[_Helper] = set()
_all_helpers_lock = threading.Lock()
_helpers_unavailable = False


def _verify_off_thread(pred: str, gold: str, timeout_int: int) -> bool | None:
    """math-verify from a non-main thread: ask a helper process; kill it if it overruns."""
    global _helpers_unavailable
    if _helpers_unavailable:
        return _verify_in_guard_thread(pred, gold, timeout_int)
    with _helper_slots:
        try:
            helper = _idle_helpers.get_nowait()
        except queue.Empty:
            try:
                helper = _Helper()
            except Exception:
                logger.warning("cannot start grading helper processes; using in-thread fallback", exc_info=True)
                _helpers_unavailable = True
                return _verify_in_guard_thread(pred, gold, timeout_int)
            with _all_helpers_lock:
                _all_helpers.add(helper)
        try:
            verdict = helper.ask(pred, gold, timeout_int)
        except (_HelperTimeout, RuntimeError, OSError, ValueError) as exc:
            logger.warning(
                "math-verify helper gave no answer (%s) for %r vs %r; graded incorrect",
                type(exc).__name__,
                pred[:200],
                gold[:200],
            )
            helper.kill()
            with _all_helpers_lock:
                _all_helpers.discard(helper)
            return False
        _idle_helpers.put(helper)
        return verdict


def _verify_in_guard_thread(pred: str, gold: str, timeout_int: int) -> bool | None:
    """Last resort when helper processes cannot start: a daemon thread we stop waiting for."""
    result: list[bool | None] = []
    worker = threading.Thread(target=lambda: result.append(_verify_here(pred, gold, None)), daemon=True)
    worker.start()
    worker.join(_hard_limit_s(timeout_int))
    return result[0] if result else False


@atexit.register
def _stop_helpers() -> None:
    with _all_helpers_lock:
        helpers = list(_all_helpers)
        _all_helpers.clear()
    for helper in helpers:
        helper.kill()


def _helper_main() -> None:
    """Entry point of a helper process: JSON requests on stdin, one JSON reply line each on stdout."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, not into the reply stream
    logging.disable(logging.WARNING)
    import math_verify  # noqa: F401  (import before announcing readiness)

    os.write(reply_fd, b"ready\n")
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            verdict = _verify_here(req["pred"], req["gold"], int(req["t"]))
        except Exception:
            verdict = None
        os.write(reply_fd, (json.dumps({"r": verdict}) + "\n").encode())
