r"""Final-answer extraction shared by the graders.

Extraction (:func:`extract_answer`, :func:`extract_latex_answer`), first rule that yields something wins:

1. the contents of the last ``\boxed{...}`` / ``\fbox{...}`` (braces matched, nesting allowed);
2. the rest of the line after the last ``####``;
3. the text after the last "answer is" / "answer:" phrase (case-insensitive), so "I first thought
   486530, but correcting my mistake the answer is 486537" gives 486537: a ``$...$`` span in it
   (escaped dollars ``\$`` inside the span are part of the answer: ``$\$18.90$`` gives ``\$18.90``),
   else the first number in it;
4. the last number anywhere in the text.

Candidates are cleaned: ``$``, ``\$``, ``\%``/``%``, ``^\circ``, thousands commas, a trailing period,
``\text{...}`` wrappers and trailing unit words are dropped; "- 3" reads as -3; decimals, ``a/b`` and
``\frac{a}{b}``/``\dfrac``/``\tfrac`` are understood; a candidate that starts with a calculation
("5 + 3 = 8 apples", ``2 \times 4 = 8``) stands for the result after its last "=". A numeric
candidate is returned in canonical form ("1,000" -> "1000", "18.00" -> "18", "\frac{3}{4}" -> "3/4").
Text with no number and no boxed answer gives ``None``. The LaTeX variant keeps the raw LaTeX of a
boxed/span answer for math-verify.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from fractions import Fraction

__all__ = [
    "as_latex_number",
    "as_number",
    "canonical_number",
    "extract_answer",
    "extract_latex_answer",
    "find_boxed",
    "normalized_latex",
]

# Guards against pathological model outputs.
_MAX_NUMBER_CHARS = 400  # longer digit strings are not answers
_MAX_EXPONENT = 400  # "1e999999999" would otherwise build a gigantic integer
_MAX_CANDIDATE_CHARS = 400  # unit/"x =" heuristics only on short candidates
_MAX_BOX_TRIES = 8  # how many boxes, from the last backwards, may be tried when the last is unclosed


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
# A mixed number "2 1/2" / "2 and 1/2": the whole part, then a fraction (checked to be proper).
_MIXED_WHOLE = r"(?P<whole>\d+)\s+(?:and\s+)?(?=\d+\s*/\s*\d)"
_NUM_TOKEN = re.compile(
    rf"(?P<sign>-\s?)?(?:(?P<tex>{_TEX_FRAC})|(?:{_MIXED_WHOLE})?(?P<num>{_NUM_BODY})"
    rf"(?:\s*/\s*(?P<den>{_NUM_BODY}))?)(?![\d])"
)
_VULGAR = {"½": "1/2", "⅓": "1/3", "⅔": "2/3", "¼": "1/4", "¾": "3/4", "⅕": "1/5", "⅖": "2/5", "⅗": "3/5",
           "⅘": "4/5", "⅙": "1/6", "⅚": "5/6", "⅛": "1/8", "⅜": "3/8", "⅝": "5/8", "⅞": "7/8"}
_VULGAR_RE = re.compile(rf"(\d?)\s*([{''.join(_VULGAR)}])")


def _ascii_fractions(s: str) -> str:
    """Unicode vulgar fractions as ``a/b`` ("2½" -> "2 1/2"), and the minus sign as ``-``."""
    s = s.replace("\u2212", "-")
    if not any(ch in s for ch in _VULGAR):
        return s
    return _VULGAR_RE.sub(lambda m: (m.group(1) + " " if m.group(1) else "") + _VULGAR[m.group(2)], s)


def _mixed_value(whole: Fraction, part: Fraction) -> Fraction | None:
    """``whole`` + ``part`` for a mixed number, or None when ``part`` is not a proper fraction."""
    return whole + part if 0 <= part < 1 else None

_ANSWER_PHRASE = re.compile(r"\banswer\b\s*(?:\*\*|__)?\s*(?:is\b|:|=)", re.IGNORECASE)
_HASHES = re.compile(r"####")
# Math spans; a "\$" inside a span is an escaped dollar sign that belongs to the answer.
_MATH_SPAN = re.compile(
    r"(?<!\\)\$\$((?:\\.|[^\\])+?)\$\$|(?<!\\)\$((?:\\.|[^$\\])+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL
)
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
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", _ascii_fractions(s))
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
    mixed = re.fullmatch(r"(\d+)\s+(?:and\s+)?(\d+\s*/\s*\d+)", body)
    if mixed:
        part = _parse_plain_number(mixed.group(2))
        value = None if part is None else _mixed_value(Fraction(int(mixed.group(1))), part)
        return None if value is None else (-value if sign == "-" else value)
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
        if value is not None and m.group("whole"):  # an improper "fraction" keeps its own value
            value = _mixed_value(Fraction(int(m.group("whole"))), value) or value
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
    flat = _ascii_fractions(text)
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


# "5 + 3 = 8", "2 \times 4 = 8 apples": an arithmetic chain whose result follows the last "=".
_EXPR_CHAR = r"(?:[\s\d.,+\-*/×÷·()$]|\\(?:times|cdot|div|\$))"
_LEADING_EXPR = re.compile(rf"^{_EXPR_CHAR}*\d{_EXPR_CHAR}*=")


def _expression_result(s: str) -> str:
    """For a candidate that starts with a numeric calculation ending in "=", the text after the last "="."""
    if "=" in s and len(s) <= _MAX_CANDIDATE_CHARS and _LEADING_EXPR.match(s):
        return s.rsplit("=", 1)[1].strip()
    return s


def _phrase_answer(phrase: str, latex: bool, finish: Callable[[str, bool], str | None]) -> str | None:
    """The answer inside the text after an "answer is" phrase (see :func:`_extract`)."""
    span = _MATH_SPAN.search(phrase)
    if span is not None and not re.search(r"\d", phrase[: span.start()]):
        out = finish(next(g for g in span.groups() if g is not None), False)
        if out is not None:
            return out
    sentence = _expression_result(re.split(r"\.(?!\d)", phrase.split("\n", 1)[0], maxsplit=1)[0].strip())
    if not sentence:
        return None
    if latex:
        value = _parse_plain_number(_clean(sentence))
        if value is not None:
            return _canonical(value)
        if "$" not in sentence and len(sentence) <= 60 and re.search(r"[\d\\]", sentence):
            return _strip_wrappers(sentence) or None
        choice = re.fullmatch(r"(?:\*\*)?(?:\(([A-Ea-e])\)|([A-E]))(?:\*\*)?", sentence)
        if choice:  # a multiple-choice letter: "(B)", "B", "**(C)**"
            return f"({(choice.group(1) or choice.group(2)).upper()})"
    value = _numeric_candidate(sentence, search=True)
    return _canonical(value) if value is not None else None


def _extract(text: str, latex: bool) -> str | None:
    """Shared extraction; ``latex=True`` keeps the raw LaTeX of the answer (used for MATH)."""
    if not text:
        return None
    text = text.replace("\u2212", "-")

    def finish(raw: str, search: bool) -> str | None:
        raw = _expression_result(raw)
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


def extract_latex_answer(text: str) -> str | None:
    """Like :func:`extract_answer`, but a boxed / ``$...$`` / "answer is" answer keeps its raw LaTeX."""
    return _extract(text, latex=True)


def as_number(s: str | None) -> Fraction | None:
    """The number an answer string stands for (units, ``$``, ``%`` and separators ignored), else ``None``."""
    if s is None:
        return None
    return _numeric_candidate(s.replace("\u2212", "-"), search=False)


def normalized_latex(s: str) -> str:
    """Cleaned LaTeX without whitespace: two answers equal here are certainly equal."""
    return re.sub(r"\s+", "", _clean(s))


_TEX_UNIT_TAIL = re.compile(r"(?:\s*\\(?:text|textrm|mathrm|mbox)\s*\{[^{}]*\}(?:\s*\^\s*\{?\d\}?)?)+\s*$")


def as_latex_number(s: str | None) -> Fraction | None:
    r"""The number a LaTeX answer stands for, ignoring ``\$``, ``\%``, ``^\circ`` and a ``\text{unit}`` tail.

    Unlike :func:`as_number`, bare trailing letters are kept ("3x" is not 3).
    """
    if s is None:
        return None
    cleaned = _clean(s.replace("\u2212", "-"))
    value = _parse_plain_number(cleaned)
    if value is None:
        tail = _TEX_UNIT_TAIL.search(cleaned)
        if tail and tail.start() > 0:
            value = _parse_plain_number(_clean(cleaned[: tail.start()]))
    return value


def canonical_number(value: Fraction) -> str:
    """Canonical text of a number: integers bare, terminating decimals as decimals, else ``a/b``."""
    return _canonical(value)
