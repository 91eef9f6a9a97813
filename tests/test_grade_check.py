"""``trprompt grade-check``: every dataset, every style, and the check catches a broken rule."""

from __future__ import annotations

import pytest

from jobs.cli import build_parser, main
from trprompt.grading import check, make_grader
from trprompt.grading.registry import dataset_graders

ROWS_PER_SPLIT = 80  # CI cap; `trprompt grade-check --dataset all` runs the full datasets


@pytest.mark.parametrize("dataset", sorted(dataset_graders()))
def test_every_style_agrees_on_every_dataset(dataset):
    results = check.check_dataset(dataset, "all", limit=ROWS_PER_SPLIT)
    assert results, dataset
    by_style = {r.style: r for r in results}
    for r in results:
        if r.required:
            assert r.agreement == 1.0, (r.style, r.failures)
    restating = [r for r in results if r.expect_correct]
    near_misses = [r for r in results if not r.expect_correct and r.required]
    assert restating and near_misses
    assert all(r.graded_correct == r.n for r in restating)
    assert all(r.graded_correct == 0 for r in near_misses)
    assert by_style["near miss +1"].n > 0.5 * by_style["boxed"].n


def test_math500_every_gold_in_every_style():
    """Issue 11: each MATH answer style, wrapped around every MATH-500 gold, grades correct; near misses do not."""
    results = check.check_dataset("math", "test")
    names = {r.style for r in results}
    assert {
        "boxed",
        "fbox",
        "final answer",
        "answer is $X$",
        "\\text{} units",
        "^\\circ",
        "percent",
        "escaped $",
    } <= names
    for r in results:
        assert r.n > 0, r.style
        if r.required:
            assert r.agreement == 1.0, (r.style, r.failures)
    assert next(r for r in results if r.style == "boxed").n == 500


def test_cli_grade_check_prints_the_table_and_exits_zero(capsys):
    assert main(["grade-check", "--dataset", "svamp", "--limit", "30"]) == 0
    out = capsys.readouterr().out
    assert "| svamp | numeric | near miss +7 | wrong | 30 | 0.00% | 100.00% | ok |" in out
    assert "OK: every required style agrees 100%" in out


def test_cli_grade_check_fails_when_the_rule_is_broken(monkeypatch, capsys):
    """With the old relative tolerance back, GSM-Hard near misses pass and the check must fail."""
    from fractions import Fraction

    import trprompt.grading.numeric as numeric

    def relative(answer, gold, answer_decimals=0):
        return abs(answer - gold) <= max(Fraction(1, 10**4) * max(abs(answer), abs(gold)), Fraction(1, 10**4))

    monkeypatch.setattr(numeric, "numbers_match", relative)
    assert main(["grade-check", "--dataset", "gsm_hard", "--limit", "40"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "near miss +1" in out


def test_grade_check_parser_defaults():
    args = build_parser().parse_args(["grade-check"])
    assert args.dataset == "all" and args.split == "all" and args.limit is None


def test_text_and_choice_styles_on_synthetic_examples():
    question = "Pick one.\nA) red\nB) green\nC) blue"
    choice = [{"id": f"c{i}", "question": question, "answer": a} for i, a in enumerate(["A", "B", "C", "green"])]
    exact = [{"id": f"e{i}", "answer": a} for i, a in enumerate(["Paris", "the Nile", "Mount Everest", "42"])]
    for name, examples in (("choice", choice), ("exact", exact), ("contains", exact)):
        results = check.check_examples("synthetic", make_grader(name), examples)
        assert results, name
        for r in results:
            assert r.n > 0 and r.agreement == 1.0, (name, r.style, r.failures)


def test_pivot_format(capsys):
    assert main(["grade-check", "--dataset", "svamp", "--limit", "20", "--format", "pivot"]) == 0
    out = capsys.readouterr().out
    assert "| style | must be | svamp |" in out
    assert "| near miss +1 | wrong | 100.00% (20) |" in out


def test_user_metrics_have_no_styles(tmp_path, monkeypatch):
    (tmp_path / "gc_metric_mod.py").write_text("def m(p, e):\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert check.check_examples("d", make_grader("python: gc_metric_mod:m"), [{"answer": "x"}]) == []


def test_format_table_marks_failures():
    bad = check.StyleResult("d", "numeric", "near miss +1", False, True, n=4, graded_correct=1)
    info = check.StyleResult("d", "math", "other", False, False, n=4, graded_correct=1)
    table = check.format_table([bad, info])
    assert "| d | numeric | near miss +1 | wrong | 4 | 25.00% | 75.00% | FAIL |" in table
    assert "| info |" in table
    assert not bad.ok and info.ok


def _has_file_tasks() -> bool:
    import trprompt.data

    return hasattr(trprompt.data, "load_task")


@pytest.mark.skipif(not _has_file_tasks(), reason="trprompt.data cannot load users' files yet")
@pytest.mark.parametrize(
    ("grader", "rows"),
    [
        ("exact", [("Capital of France?", "Paris"), ("Longest river?", "the Nile"), ("Highest peak?", "Everest")]),
        ("numeric", [("2+2?", "4"), ("Half of 3?", "1.5"), ("Big?", "1234567")]),
        (
            "choice",
            [("Sky colour?\nA) red\nB) blue", "B"), ("Grass?\nA) green\nB) pink", "A"), ("Sun?\nA) hot\nB) cold", "A")],
        ),
    ],
)
def test_grade_check_on_a_users_file(tmp_path, capsys, grader, rows):
    import json

    path = tmp_path / "mine.jsonl"
    lines = [json.dumps({"question": f"({i}) {q}", "answer": a}) for i, (q, a) in enumerate(rows * 4)]
    path.write_text("\n".join(lines) + "\n")
    assert main(["grade-check", "--dataset", str(path), "--grader", grader]) == 0
    out = capsys.readouterr().out
    assert f"| {grader} |" in out and "OK: every required style agrees 100%" in out
