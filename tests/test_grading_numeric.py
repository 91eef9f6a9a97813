"""The numeric rule (issue 11): exact, 1e-3 absolute, or the gold rounded to the answer's decimals; no relative tol."""

from __future__ import annotations

from fractions import Fraction

import pytest

from trprompt.grading import grade, make_grader, numbers_match

MAGNITUDES = [10**k for k in range(10)]  # 1 ... 10^9
GOLDS = [m + 7 * (m // 10) + 3 for m in MAGNITUDES] + [-(m + 1) for m in MAGNITUDES]


def ex(answer):
    return {"id": "t", "answer": answer}


@pytest.mark.parametrize("gold", GOLDS)
def test_integer_gold_exact_answers_are_correct(gold):
    g = make_grader("numeric")
    assert g.score(f"The answer is {gold}.", ex(str(gold))) == 1.0
    assert g.score(f"The answer is {gold:,}.", ex(str(gold))) == 1.0
    assert g.score(f"\\boxed{{{gold}}}", ex(str(gold))) == 1.0
    assert g.score(f"#### {gold}", ex(str(gold))) == 1.0


@pytest.mark.parametrize("gold", GOLDS)
@pytest.mark.parametrize("delta", [1, -1, 7, -7])
def test_near_misses_are_wrong_at_every_magnitude(gold, delta):
    g = make_grader("numeric")
    assert g.score(f"The answer is {gold + delta}.", ex(str(gold))) == 0.0
    assert g.score(f"The answer is {gold + delta:,}.", ex(str(gold))) == 0.0


@pytest.mark.parametrize("gold", GOLDS)
def test_ten_times_and_a_tenth_are_wrong(gold):
    g = make_grader("numeric")
    assert g.score(f"The answer is {gold * 10}.", ex(str(gold))) == 0.0
    assert g.score(f"The answer is {Fraction(gold, 10)}.", ex(str(gold))) == 0.0


def test_issue_examples():
    assert not grade("gsm_hard", "The answer is -4358959.", "-4358966").correct
    result = grade("gsm_hard", "I first thought 486530, but correcting my mistake the answer is 486537.", "486530")
    assert result.extracted == "486537" and not result.correct
    assert grade(
        "gsm_hard", "I first thought 486537, but correcting my mistake the answer is 486530.", "486530"
    ).correct


FRACTIONAL = ["14053029.666666666", "0.0049987649", "-2.345", "1234.5", "0.125", "-987654.3219", "3.14159"]


def _round2(gold: str) -> str:
    value = Fraction(gold)
    scaled = abs(value) * 100
    r = int(scaled + Fraction(1, 2))
    text = f"{r // 100}.{r % 100:02d}"
    return "-" + text if value < 0 else text


@pytest.mark.parametrize("gold", FRACTIONAL)
def test_fractional_golds_answered_rounded_to_two_decimals(gold):
    g = make_grader("numeric")
    rounded = _round2(gold)
    assert g.score(f"The answer is {rounded}.", ex(gold)) == 1.0, rounded
    assert g.score(f"The answer is {gold}.", ex(gold)) == 1.0
    # Off by one in the last of the two decimals: wrong (unless within 1e-3, which it is not).
    off = Fraction(rounded) + Fraction(1, 100)
    assert g.score(f"The answer is {float(off):.2f}.", ex(gold)) == 0.0
    # An integer answer to a non-integer gold is wrong unless the gold rounds to it at 2 decimals.
    if Fraction(_round2(gold)) != round(Fraction(gold)):
        assert g.score(f"The answer is {round(Fraction(gold))}.", ex(gold)) == 0.0


@pytest.mark.parametrize(
    ("answer", "gold", "correct"),
    [
        ("100.0005", "100", True),  # within 1e-3
        ("100.002", "100", False),
        ("3.14", "3.14159", True),  # rounded to the answer's 2 decimals
        ("3.1", "3.14159", False),  # one decimal: compared at 2 decimals
        ("3", "3.14159", False),
        ("3.142", "3.14159", True),  # 3 decimals: within 1e-3
        ("3.141", "3.14159", True),  # within 1e-3 (0.00059 off)
        ("3.139", "3.14159", False),
        ("0.67", "2/3", True),
        ("0.66", "2/3", False),
        ("-2.35", "-2.345", True),  # half away from zero
        ("-2.34", "-2.345", False),
        ("1/3", "0.333333", True),
        ("0", "0.0049987649", True),  # the gold rounded to 2 decimals is 0.00
        ("0.01", "0.0049987649", False),
    ],
)
def test_rule_table(answer, gold, correct):
    assert make_grader("numeric").score(f"The answer is {answer}.", ex(gold)) == float(correct)


@pytest.mark.parametrize(
    ("output", "gold", "correct"),
    [
        ("The total is $1,234.", "1234", True),
        ("The answer is $1,234.00", "1234", True),
        ("She walks 12 km.", "12", True),
        ("The answer is 12 km.", "12", True),
        ("It costs 3.50 dollars.", "3.5", True),
        ("The answer is \\$3.50.", "3.5", True),
        ("The answer is 1,234,567 people.", "1234567", True),
        ("The answer is 1,234,568 people.", "1234567", False),
        ("The answer is 45%.", "45", True),
        ("The answer is 12 km.", "13", False),
    ],
)
def test_separators_and_units(output, gold, correct):
    assert make_grader("numeric").score(output, ex(gold)) == float(correct)


def test_numbers_match_directly():
    assert numbers_match(Fraction(5), Fraction(5))
    assert not numbers_match(Fraction(486537), Fraction(486530))
    assert numbers_match(Fraction("14053029.67"), Fraction("14053029.666666666"), 2)
    assert not numbers_match(Fraction("14053029.7"), Fraction("14053029.666666666"), 1)


@pytest.mark.parametrize(
    "output, gold, correct",
    [
        ("The answer is 2 1/2.", "2.5", True),
        ("The answer is 2 and 1/2 cups.", "2.5", True),
        ("She needs 2½ cups.", "2.5", True),
        ("The answer is 3 ¾", "3.75", True),
        ("The answer is -1 1/2", "-1.5", True),
        ("It takes 5 3/4 hours.", "5.75", True),
        ("The answer is 2 1/2.", "2", False),  # the whole part alone is not the answer
        ("The answer is 2 1/2.", "0.5", False),  # nor the fraction alone
        ("So 3 5/2 apples", "2.5", True),  # not a proper fraction: no mixed number
        ("I ate 2 pies and 1/2 of one. The answer is 1/2", "0.5", True),
    ],
)
def test_mixed_numbers_and_unicode_fractions(output, gold, correct):
    assert make_grader("numeric").score(output, ex(gold)) == float(correct)
