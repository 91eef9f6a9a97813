r"""``trprompt grade-check``: grade answer variants built from the golds and report agreement per style.

For every problem of a dataset, each *style* turns the gold answer into a model-like output ("The
answer is X.", ``\boxed{X}``, "Final Answer: The final answer is $X$. I hope it is correct.", with
thousands separators, units, ``$``/``\$``, ``%``, ``^\circ``, ...) together with the verdict the
grader must give: styles that restate the gold must grade **correct**; near misses (±1, ±7, ×10,
"I first thought X, but ... the answer is X+7") must grade **wrong**. A style that does not apply
to a gold (thousands separators on 12, ``^\circ`` on a matrix) is skipped for it.

The command prints one row per (dataset, style): how many golds the style applied to, the share the
grader graded correct, and the agreement with the expected verdict. It exits with status 1 when any
required style is below 100 % agreement. Informational styles (marked ``info``) are printed but do
not fail the check: e.g. "another problem's gold" on MATH, where two problems can genuinely share
an answer written differently.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from trprompt.grading.base import Grader, example_field
from trprompt.grading.extract import as_latex_number, as_number, canonical_number, normalized_latex
from trprompt.grading.text import normalize_text, parse_choices

__all__ = [
    "STYLES",
    "Style",
    "StyleResult",
    "check_dataset",
    "check_examples",
    "format_pivot",
    "format_table",
    "main",
]

Maker = Callable[[Any, Sequence[Any], int], "str | None"]


@dataclass(frozen=True)
class Style:
    """One way of writing an answer, built from an example's gold.

    Attributes:
        name: short name shown in the table.
        expect_correct: the verdict the grader must give (True: restates the gold; False: a near miss).
        make: ``(example, all examples, index) -> model output``, or ``None`` when the style does not apply.
        required: whether less than 100 % agreement fails the check.

    """

    name: str
    expect_correct: bool
    make: Maker
    required: bool = True


@dataclass
class StyleResult:
    """Agreement of one grader with one style on one dataset."""

    dataset: str
    grader: str
    style: str
    expect_correct: bool
    required: bool
    n: int = 0
    graded_correct: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (example id, output, gold)

    @property
    def agreement(self) -> float:
        """Share of outputs graded as expected (1.0 when the style applied to nothing)."""
        agreed = self.graded_correct if self.expect_correct else self.n - self.graded_correct
        return agreed / self.n if self.n else 1.0

    @property
    def ok(self) -> bool:
        """True unless a required style disagreed somewhere."""
        return not self.required or self.agreement == 1.0


# ---------------------------------------------------------------------------------------------------
# Number helpers
# ---------------------------------------------------------------------------------------------------


def _thousands(text: str) -> str | None:
    """``"-1234567.5"`` -> ``"-1,234,567.5"``; ``None`` below 1000 (nothing to separate)."""
    m = re.fullmatch(r"(-?)(\d+)(\.\d+)?", text)
    if m is None or len(m.group(2)) < 4:
        return None
    return f"{m.group(1)}{int(m.group(2)):,}{m.group(3) or ''}"


def _round_half_away(value: Fraction, decimals: int) -> Fraction:
    scaled = abs(value) * 10**decimals
    r = Fraction(int(scaled + Fraction(1, 2)), 10**decimals)
    return r if value >= 0 else -r


def _gold(example: Any) -> str:
    return str(example_field(example, "answer"))


def _num(example: Any) -> Fraction | None:
    return as_number(_gold(example))


def _numeric_gold_text(example: Any) -> str | None:
    """The gold as plain number text, or ``None`` when it is not a number."""
    value = _num(example)
    return None if value is None else canonical_number(value)


def _shift(example: Any, f: Callable[[Fraction], Fraction]) -> str | None:
    value = _num(example)
    return None if value is None else canonical_number(f(value))


def _two_decimals(example: Any) -> str | None:
    """The gold rounded to 2 decimals, for a non-integer gold that is not already that short."""
    value = _num(example)
    if value is None or value.denominator == 1:
        return None
    rounded = _round_half_away(value, 2)
    if rounded == value:
        return None
    return f"{float(rounded):.2f}" if abs(rounded) < 10**15 else None


# ---------------------------------------------------------------------------------------------------
# Styles per grader
# ---------------------------------------------------------------------------------------------------


def _n(fmt: str, get: Callable[[Any], str | None]) -> Maker:
    def make(example: Any, _all: Sequence[Any], _i: int) -> str | None:
        x = get(example)
        return None if x is None else fmt.replace("X", x)

    return make


def _dollars(x: str) -> str:
    return "-$" + x[1:] if x.startswith("-") else "$" + x


def _wrong_value(example: Any, f: Callable[[Fraction], Fraction], min_abs: Fraction = Fraction(0)) -> str | None:
    value = _num(example)
    if value is None or abs(value) < min_abs or f(value) == value:
        return None
    return canonical_number(f(value))


def _gold_with_separators(example: Any) -> str | None:
    text = _numeric_gold_text(example)
    return None if text is None else _thousands(text)


def _gold_as_dollars(example: Any) -> str | None:
    text = _numeric_gold_text(example)
    return None if text is None else _dollars(_thousands(text) or text)


def _minus_seven_with_separators(example: Any) -> str | None:
    text = _wrong_value(example, lambda v: v - 7)
    return None if text is None else _thousands(text) or text


def _two_decimals_off_by_one_cent(example: Any) -> str | None:
    text = _two_decimals(example)
    return None if text is None else f"{float(Fraction(text) + Fraction(1, 100)):.2f}"


def _calculation(example: Any) -> str | None:
    """``"A + 3 = X"`` with A = X - 3: a calculation whose result is the gold."""
    x, a = _numeric_gold_text(example), _shift(example, lambda v: v - 3)
    return None if x is None or a is None else f"{a} + 3 = {x}"


def _corrected(first: str | None, final: str | None) -> str | None:
    if first is None or final is None:
        return None
    return f"I first thought {first}, but correcting my mistake the answer is {final}."


NUMERIC_STYLES = [
    Style("plain", True, _n("X", _numeric_gold_text)),
    Style("answer is", True, _n("The answer is X.", _numeric_gold_text)),
    Style("boxed", True, _n("We add 3 + 4 = 7 and double it: 14. So the total is \\boxed{X}.", _numeric_gold_text)),
    Style("####", True, _n("First 12 / 3 = 4, then 4 * 5 = 20.\n#### X", _numeric_gold_text)),
    Style("final answer", True, _n("Final Answer: The final answer is $X$. I hope it is correct.", _numeric_gold_text)),
    Style("worked, then answer", True, _n("She has 3 + 9 = 12 now, 5 left.\nThe answer is X", _numeric_gold_text)),
    Style("answer is a calculation", True, _n("The answer is X.", _calculation)),
    Style("thousands sep.", True, _n("The answer is X.", _gold_with_separators)),
    Style("currency $", True, _n("The answer is X.", _gold_as_dollars)),
    Style("units", True, _n("The answer is X km.", _numeric_gold_text)),
    Style("units (dollars)", True, _n("It costs X dollars in total.", _numeric_gold_text)),
    Style("percent", True, _n("The answer is X%.", _numeric_gold_text)),
    Style("\\boxed{\\$X}", True, _n("\\boxed{\\$X}", _numeric_gold_text)),
    Style("corrected to gold", True, lambda e, _a, _i: _corrected(_shift(e, lambda v: v + 7), _numeric_gold_text(e))),
    Style("rounded 2 dp", True, _n("The answer is X.", _two_decimals)),
    Style("near miss +1", False, _n("The answer is X.", lambda e: _wrong_value(e, lambda v: v + 1))),
    Style("near miss -1", False, _n("The answer is X.", lambda e: _wrong_value(e, lambda v: v - 1))),
    Style("near miss +7", False, _n("The answer is X.", lambda e: _wrong_value(e, lambda v: v + 7))),
    Style("near miss -7 (sep.)", False, _n("The answer is X.", _minus_seven_with_separators)),
    Style("x10", False, _n("The answer is X.", lambda e: _wrong_value(e, lambda v: v * 10, Fraction(1, 100)))),
    Style("/10", False, _n("The answer is X.", lambda e: _wrong_value(e, lambda v: v / 10, Fraction(1, 100)))),
    Style("corrected away", False, lambda e, _a, _i: _corrected(_numeric_gold_text(e), _shift(e, lambda v: v + 7))),
    Style("rounded 2 dp, off", False, _n("The answer is X.", _two_decimals_off_by_one_cent)),
]

_PLAIN_LATEX_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\\[dt]?frac\{\d+\}\{\d+\}|-?\\frac\d\d")


def _latex_gold(example: Any) -> str | None:
    return _gold(example).strip() or None


def _plain_number_gold(example: Any) -> str | None:
    gold = _gold(example).strip()
    return gold if _PLAIN_LATEX_NUMBER.fullmatch(gold) else None


def _latex_wrong(example: Any, f: Callable[[Fraction], Fraction]) -> str | None:
    gold = _plain_number_gold(example)
    if gold is None:
        return None
    value = as_latex_number(gold)
    if value is None or f(value) == value:
        return None
    return canonical_number(f(value))


def _latex_calculation(example: Any) -> str | None:
    gold = _plain_number_gold(example)
    value = None if gold is None else as_latex_number(gold)
    return None if gold is None or value is None else f"{canonical_number(value - 3)} + 3 = {gold}"


def _other_gold(example: Any, examples: Sequence[Any], i: int) -> str | None:
    """The gold of the next example whose answer differs (as text and, when numeric, as a number)."""
    gold = _gold(example)
    mine = normalized_latex(gold)
    my_value = as_latex_number(gold)
    for k in range(1, min(len(examples), 50)):
        other = _gold(examples[(i + k) % len(examples)])
        if normalized_latex(other) == mine:
            continue
        value = as_latex_number(other)
        if my_value is not None and value is not None and value == my_value:
            continue
        return f"The answer is $\\boxed{{{other}}}$."
    return None


MATH_STYLES = [
    Style("boxed", True, _n("We get 2 + 3 = 5 and then 17. Therefore the answer is \\boxed{X}.", _latex_gold)),
    Style("fbox", True, _n("So the result is \\fbox{X}.", _latex_gold)),
    Style("$\\boxed{}$", True, _n("The answer is $\\boxed{X}$.", _latex_gold)),
    Style("final answer", True, _n("Final Answer: The final answer is $X$. I hope it is correct.", _latex_gold)),
    Style("answer is $X$", True, _n("First 4 + 5 = 9. Therefore, the answer is $X$.", _latex_gold)),
    Style("\\[X\\] after answer:", True, _n("Answer: \\[ X \\]", _latex_gold)),
    Style("\\text{} units", True, _n("\\boxed{X \\text{ cm}}", _plain_number_gold)),
    Style("calculation = X", True, _n("The answer is $X$.", _latex_calculation)),
    Style("^\\circ", True, _n("\\boxed{X^\\circ}", _plain_number_gold)),
    Style("percent", True, _n("Thus the answer is $X\\%$.", _plain_number_gold)),
    Style("escaped $", True, _n("Therefore, the answer is $\\$X$.", _plain_number_gold)),
    Style("near miss +1", False, _n("\\boxed{X}", lambda e: _latex_wrong(e, lambda v: v + 1))),
    Style("near miss -7", False, _n("The answer is $X$.", lambda e: _latex_wrong(e, lambda v: v - 7))),
    Style("x10", False, _n("\\boxed{X}", lambda e: _latex_wrong(e, lambda v: v * 10))),
    Style("another problem's gold", False, _other_gold, required=False),
]


def _text_gold(example: Any) -> str | None:
    gold = _gold(example).strip()
    return gold if normalize_text(gold) else None


def _other_text_gold(example: Any, examples: Sequence[Any], i: int) -> str | None:
    mine = normalize_text(_gold(example))
    for k in range(1, min(len(examples), 50)):
        other = _gold(examples[(i + k) % len(examples)])
        if normalize_text(other) and normalize_text(other) != mine and mine not in normalize_text(other):
            return f"The answer is {other}."
    return None


EXACT_STYLES = [
    Style("plain", True, _n("X", _text_gold)),
    Style("answer is", True, _n("The answer is X.", _text_gold)),
    Style("Answer:", True, _n("Let me think.\nAnswer: X", _text_gold)),
    Style("boxed \\text{}", True, _n("\\boxed{\\text{X}}", _text_gold)),
    Style(
        "upper case", True, lambda e, _a, _i: None if _text_gold(e) is None else f"The answer is {_gold(e).upper()}."
    ),
    Style("article + punct.", True, _n("The answer is: the X!", _text_gold)),
    Style("another example's gold", False, _other_text_gold),
]

CONTAINS_STYLES = [
    Style("plain", True, _n("X", _text_gold)),
    Style("in a sentence", True, _n("I am quite sure that it is X, as explained.", _text_gold)),
    Style("upper case", True, lambda e, _a, _i: None if _text_gold(e) is None else f"It is {_gold(e).upper()}."),
    Style("another example's gold", False, _other_text_gold),
]


def _choice_letter(example: Any) -> tuple[str, dict[str, str]] | None:
    options = parse_choices(example)
    gold = _gold(example).strip()
    if options:
        if gold.upper() in options and len(gold) == 1:
            return gold.upper(), options
        for letter, text in options.items():
            if normalize_text(text) == normalize_text(gold):
                return letter, options
        return None
    return (gold.upper(), {}) if len(gold) == 1 and gold.isalpha() else None


def _choice(fmt: str, use_text: bool = False, wrong: bool = False) -> Maker:
    def make(example: Any, _all: Sequence[Any], _i: int) -> str | None:
        found = _choice_letter(example)
        if found is None:
            return None
        letter, options = found
        if wrong:
            others = [k for k in (options or {chr(c): "" for c in range(65, 69)}) if k != letter]
            if not others:
                return None
            letter = others[0]
        if use_text:
            if not options or not normalize_text(options[letter]):
                return None
            return fmt.replace("X", options[letter])
        return fmt.replace("X", letter)

    return make


CHOICE_STYLES = [
    Style("letter", True, _choice("X")),
    Style("(X)", True, _choice("The correct option is (X).")),
    Style("X)", True, _choice("X) is right.")),
    Style("Answer: X", True, _choice("Reasoning first.\nAnswer: X")),
    Style("boxed", True, _choice("\\boxed{X}")),
    Style("option text", True, _choice("It must be X.", use_text=True)),
    Style("other letter", False, _choice("Answer: X", wrong=True)),
    Style("other option text", False, _choice("It must be X.", use_text=True, wrong=True)),
]

STYLES: dict[str, list[Style]] = {
    "numeric": NUMERIC_STYLES,
    "math": MATH_STYLES,
    "exact": EXACT_STYLES,
    "contains": CONTAINS_STYLES,
    "choice": CHOICE_STYLES,
}


# ---------------------------------------------------------------------------------------------------
# Running the check
# ---------------------------------------------------------------------------------------------------


def check_examples(dataset: str, grader: Grader, examples: Sequence[Any]) -> list[StyleResult]:
    """Grade every applicable style of every example with ``grader`` (user metrics have no styles)."""
    kind = grader.name if grader.name in STYLES else None
    if kind is None:
        return []
    results = []
    for style in STYLES[kind]:
        res = StyleResult(dataset, grader.name, style.name, style.expect_correct, style.required)
        for i, example in enumerate(examples):
            output = style.make(example, examples, i)
            if output is None:
                continue
            res.n += 1
            correct = grader.grade(output, example).correct
            res.graded_correct += int(correct)
            if correct != style.expect_correct and len(res.failures) < 5:
                res.failures.append((str(example_field(example, "id", i)), output, _gold(example)))
        results.append(res)
    return results


def _load(dataset: str, split: str, limit: int | None, grader: str | None = None) -> list[Any]:
    """The problems of ``split`` ("all": test + the whole training pool), ``limit`` per split."""
    import trprompt.data as data

    splits = ("test", "train") if split == "all" else (split,)
    load_task = getattr(data, "load_task", None)
    if load_task is not None:  # built-in names and users' files, one loader
        task = load_task(dataset, grader=grader)
        pools = {"test": list(task.test), "train": list(task.train_pool)}
        return [p for s in splits for p in (pools[s] if limit is None else pools[s][:limit])]
    if grader is not None:
        raise ValueError("--grader needs a trprompt.data with load_task (users' files)")
    out: list[Any] = []
    for s in splits:
        try:
            out += (
                data.load_split(dataset, s, val_fraction=0.0, limit=limit)
                if s == "train"
                else data.load_split(dataset, s, limit=limit)
            )
        except ValueError as exc:
            if "test-only" in str(exc) or "no train" in str(exc):  # e.g. svamp has no training split
                continue
            raise
    return out


def check_dataset(
    dataset: str, split: str = "all", limit: int | None = None, grader: str | None = None
) -> list[StyleResult]:
    """Run every style of the dataset's grader over its golds (``limit`` rows per split).

    ``dataset`` is a built-in name or (where :mod:`trprompt.data` loads them) a user's file or
    folder; ``grader`` overrides the task's grader spec.
    """
    from trprompt.grading import grader_for

    examples = _load(dataset, split, limit, grader)
    if not examples:
        raise ValueError(f"dataset {dataset!r} has no problems in split {split!r}")
    return check_examples(dataset, grader_for(examples[0]), examples)


def format_table(results: Iterable[StyleResult]) -> str:
    """A Markdown table: dataset, grader, style, expected verdict, n, graded correct, agreement, status."""
    lines = [
        "| dataset | grader | style | must be | n | graded correct | agreement | status |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        pct = 100.0 * r.graded_correct / r.n if r.n else 0.0
        status = "ok" if r.agreement == 1.0 else ("FAIL" if r.required else "info")
        if r.n == 0:
            status = "n/a"
        lines.append(
            f"| {r.dataset} | {r.grader} | {r.style} | {'correct' if r.expect_correct else 'wrong'} | {r.n} | "
            f"{pct:.2f}% | {100.0 * r.agreement:.2f}% | {status} |"
        )
    return "\n".join(lines)


def format_pivot(results: Sequence[StyleResult]) -> str:
    """A compact Markdown table: one row per style, one column per dataset, "agreement (n)" in each cell."""
    datasets = list(dict.fromkeys(r.dataset for r in results))
    styles: dict[tuple[str, bool], dict[str, StyleResult]] = {}
    for r in results:
        styles.setdefault((r.style, r.expect_correct), {})[r.dataset] = r
    lines = [
        "| style | must be | " + " | ".join(datasets) + " |",
        "|---|---|" + "---:|" * len(datasets),
    ]
    for (style, expect), cells in styles.items():
        row = []
        for d in datasets:
            r = cells.get(d)
            if r is None or r.n == 0:
                row.append("-")
            else:
                mark = "" if r.agreement == 1.0 else (" FAIL" if r.required else " info")
                row.append(f"{100.0 * r.agreement:.2f}% ({r.n}){mark}")
        lines.append(f"| {style} | {'correct' if expect else 'wrong'} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """Register ``grade-check`` on the ``trprompt`` sub-command parser."""
    p = sub.add_parser(
        "grade-check",
        help="grade answer variants built from the golds and print the agreement per style",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument(
        "--dataset",
        default="all",
        help="a built-in dataset name, a JSONL/CSV/Parquet file or folder, or 'all' (default)",
    )
    p.add_argument("--grader", default=None, help="grader spec for a file (default: the task's; numeric for files)")
    p.add_argument("--split", default="all", choices=["all", "test", "train"], help="which golds (default all)")
    p.add_argument("--limit", type=int, default=None, help="at most this many problems per split")
    p.add_argument("--show-failures", type=int, default=3, help="failing examples to print per style")
    p.add_argument(
        "--format",
        default="long",
        choices=["long", "pivot"],
        help="long: one row per (dataset, style); pivot: one row per style, a column per dataset",
    )


def main(args: argparse.Namespace) -> int:
    """Run the check; 0 when every required style agrees 100 %, else 1."""
    from trprompt.grading.registry import dataset_graders

    names = list(dataset_graders()) if args.dataset == "all" else [args.dataset]
    all_results: list[StyleResult] = []
    for name in names:
        t0 = time.perf_counter()
        results = check_dataset(name, args.split, args.limit, getattr(args, "grader", None))
        if not results:
            print(f"{name}: its grader has no built-in answer styles (a user metric); nothing to check")
            continue
        all_results += results
        n = max((r.n for r in results), default=0)
        print(f"{name}: {n} golds, {len(results)} styles, {time.perf_counter() - t0:.1f} s", flush=True)
    print()
    print(format_pivot(all_results) if args.format == "pivot" else format_table(all_results))
    failed = [r for r in all_results if not r.ok]
    for r in all_results:
        for ex_id, output, gold in r.failures[: args.show_failures] if r.agreement < 1.0 else []:
            print(f"  {r.dataset}/{r.style}: {ex_id}: gold {gold!r} output {output[:160]!r}")
    if failed:
        print(f"\nFAIL: {len(failed)} required style(s) below 100% agreement")
        return 1
    print("\nOK: every required style agrees 100%")
    return 0
