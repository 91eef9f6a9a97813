"""The grader API: make_grader specs, every built-in grader, user metrics, the dataset table."""

from __future__ import annotations

import sys
import textwrap

import pytest

from trprompt.data import load_split
from trprompt.grading import (
    GRADER_VERSION,
    Grade,
    Grader,
    GradingError,
    dataset_grader_name,
    grader_for,
    grader_version,
    make_grader,
)
from trprompt.grading.registry import dataset_graders


def ex(answer, **fields):
    return {"id": fields.pop("id", "ex-1"), "answer": answer, **fields}


# ------------------------------------------------------------------------------------------ registry


@pytest.mark.parametrize("spec", ["numeric", "math", "exact", "choice", "contains"])
def test_builtin_specs_make_graders_with_versions(spec):
    grader = make_grader(spec)
    assert isinstance(grader, Grader)
    assert grader.name == spec
    assert grader.version.startswith(spec) and grader.version in GRADER_VERSION
    assert grader_version(spec) == grader.version
    assert make_grader(spec) is grader  # made once
    assert make_grader(grader) is grader


@pytest.mark.parametrize("spec", ["", "numerik", "python:", "python: nodots", "python: os.path:", 3])
def test_bad_specs_raise_naming_the_choices(spec):
    with pytest.raises(ValueError, match="numeric|python"):
        make_grader(spec)


def test_every_builtin_dataset_names_a_grader_in_one_table():
    table = dataset_graders()
    assert set(table) >= {"gsm8k", "gsm_hard", "math", "svamp"}
    assert table["math"] == "math" and table["gsm_hard"] == "numeric"
    for dataset, spec in table.items():
        assert dataset_grader_name(dataset) == spec
        make_grader(spec)
    with pytest.raises(ValueError, match="gsm8k"):
        dataset_grader_name("nope")


def test_grader_for_uses_the_examples_own_grader_then_its_dataset():
    assert grader_for({"answer": "B", "grader": "choice"}).name == "choice"
    assert grader_for({"answer": "5", "dataset": "gsm8k"}).name == "numeric"
    assert grader_for(load_split("math", "test", limit=1)[0]).name == "math"
    with pytest.raises(ValueError, match="grader"):
        grader_for({"answer": "5"})


def test_grade_defaults_score_from_correct():
    assert Grade(True, "1").score == 1.0
    assert Grade(False, None).score == 0.0
    assert Grade(False, "x", 0.5).score == 0.5


# ------------------------------------------------------------------------------------------ numeric/math


def test_numeric_grader_scores_and_checks_gold():
    g = make_grader("numeric")
    assert g.score("The answer is 1,234 apples.", ex("1234")) == 1.0
    assert g.score("The answer is 1,235.", ex("1234")) == 0.0
    assert g.extract("so #### 3.50 dollars") == "3.5"
    assert g.check_gold("$1,234") is None
    assert "not a number" in g.check_gold("twelve")
    assert "empty" in g.check_gold("  ")


def test_math_grader_scores_and_checks_gold():
    g = make_grader("math")
    assert g.score(r"so \boxed{\frac{1}{2}}", ex("0.5")) == 1.0
    assert g.score(r"so \boxed{\frac{1}{3}}", ex("0.5")) == 0.0
    assert g.check_gold(r"\frac{1}{2}") is None
    assert "unbalanced" in g.check_gold(r"\frac{1}{2")


# ------------------------------------------------------------------------------------------ exact/contains

EXACT = [
    ("The answer is Paris.", "Paris", True),
    ("Answer: the Eiffel Tower", "Eiffel tower", True),
    ("answer: The  EIFFEL, tower!", "eiffel tower", True),
    (r"Final: \boxed{\text{blue whale}}", "Blue Whale", True),
    ("Let me think.\nLondon", "london", True),
    ("The answer is Paris, France.", "Paris", False),
    ("The answer is Lyon.", "Paris", False),
    ("", "Paris", False),
]


@pytest.mark.parametrize(("output", "gold", "correct"), EXACT)
def test_exact_grader(output, gold, correct):
    assert make_grader("exact").grade(output, ex(gold)).correct is correct


CONTAINS = [
    ("I am fairly sure it is Paris, the capital.", "paris", True),
    ("It is the Eiffel Tower.", "eiffel tower", True),
    ("It is Parisian cuisine.", "paris", False),  # whole words only
    ("No idea.", "paris", False),
]


@pytest.mark.parametrize(("output", "gold", "correct"), CONTAINS)
def test_contains_grader(output, gold, correct):
    assert make_grader("contains").grade(output, ex(gold)).correct is correct


def test_exact_check_gold_rejects_gold_that_normalises_to_nothing():
    assert "empty" in make_grader("exact").check_gold("the.")
    assert make_grader("exact").check_gold("Paris") is None


# ------------------------------------------------------------------------------------------ choice

QUESTION = "Which planet is largest?\nA) Mars\nB) Jupiter\nC) Venus\nD) Earth"
CHOICE = [
    ("B", "B", True),
    ("(B)", "B", True),
    ("B) Jupiter", "B", True),
    ("Answer: B", "B", True),
    ("The answer is (B).", "B", True),
    ("The correct option is Jupiter.", "B", True),
    (r"\boxed{B}", "B", True),
    ("**B**", "B", True),
    ("Jupiter", "Jupiter", True),  # gold given as the option text
    ("Answer: B", "jupiter", True),
    ("Mars is small, Venus is hot, so the answer is Jupiter.", "B", True),
    ("The answer is: **B**", "B", True),
    ("**Answer:** (B)", "B", True),
    ("answer: option (B) Jupiter", "B", True),
    ("B is correct.", "B", True),
    ("A) is wrong, C) too, so B) it is.", "B", True),
    ("The answer is B, not C.", "B", True),
    ("Answer: C", "B", False),
    ("The answer is a gas giant: Jupiter.", "B", True),
    ("The answer is a rocky planet, Venus.", "B", False),
    ("(A)", "B", False),
    ("Venus", "B", False),
    ("I cannot tell.", "B", False),
    ("The answer is (b).", "B", True),
    ("The correct option is B", "B", True),
    ("Between A and B, I choose B.", "B", True),
    ("I choose B because option A is wrong.", "B", True),
    ("I would go with option D.", "B", False),
    ("The answer is (c).", "B", False),
]


@pytest.mark.parametrize(("output", "gold", "correct"), CHOICE)
def test_choice_grader_with_choices_in_the_question(output, gold, correct):
    grade = make_grader("choice").grade(output, ex(gold, question=QUESTION))
    assert grade.correct is correct, grade


def test_choice_grader_with_a_choices_field():
    example = ex("C", question="Pick the colour of the sky.", choices=["red", "green", "blue"])
    g = make_grader("choice")
    assert g.grade("It is blue.", example).correct
    assert g.grade("Answer: C", example).correct
    assert not g.grade("Answer: A", example).correct
    assert g.grade("blue", {**example, "answer": "blue"}).correct
    mapping = ex("Y", choices={"X": "cat", "Y": "dog"})
    assert g.grade("the dog", mapping).correct


def test_choice_grader_gold_checks():
    g = make_grader("choice")
    assert g.check_gold("B", ex("B", question=QUESTION)) is None
    assert g.check_gold("Jupiter", ex("Jupiter", question=QUESTION)) is None
    assert "not one of the options" in g.check_gold("Saturn", ex("Saturn", question=QUESTION))
    assert "not one of the options" in g.check_gold("F", ex("F", question=QUESTION))
    with pytest.raises(GradingError, match="ex-7"):
        g.grade("B", ex("Saturn", id="ex-7", question=QUESTION))


# ------------------------------------------------------------------------------------------ python: user metric


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"my_metric_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            CALLS = []

            def exact_len(prediction_text, example):
                return len(prediction_text.strip()) == len(example.answer)

            def overlap(prediction_text, example):
                gold = set(example["answer"].split())
                return len(gold & set(prediction_text.split())) / len(gold)

            def broken(prediction_text, example):
                raise KeyError("no such field")

            def out_of_range(prediction_text, example):
                return 1.5
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_python_grader_bool_metric(user_module):
    g = make_grader(f"python: {user_module}:exact_len")
    problem = load_split("gsm8k", "test", limit=1)[0]
    assert g.name == f"python: {user_module}:exact_len"
    assert g.version.startswith(f"python:{user_module}:exact_len@")
    assert g.grade("x" * len(problem.answer), problem) == Grade(True, "x" * len(problem.answer), 1.0)
    assert g.score("x" * (len(problem.answer) + 1), problem) == 0.0


def test_python_grader_float_metric_is_a_score(user_module):
    g = make_grader(f"python:{user_module}:overlap")
    result = g.grade("red green", ex("red green blue yellow"))
    assert result.score == 0.5 and result.correct is False
    assert g.grade("red green blue yellow", ex("red green blue yellow")).correct


def test_python_grader_errors_name_the_example(user_module):
    with pytest.raises(GradingError, match=r"example q-42.*KeyError"):
        make_grader(f"python: {user_module}:broken").grade("x", ex("y", id="q-42"))
    with pytest.raises(GradingError, match=r"1\.5.*example q-43"):
        make_grader(f"python: {user_module}:out_of_range").grade("x", ex("y", id="q-43"))


def test_python_grader_load_errors(user_module):
    with pytest.raises(ValueError, match="cannot import"):
        make_grader("python: no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="no function 'missing'"):
        make_grader(f"python: {user_module}:missing")


def test_fingerprint_grader_version_takes_a_spec(user_module):
    from trprompt import fingerprint

    assert fingerprint.grader_version() == GRADER_VERSION
    assert fingerprint.grader_version("numeric") == make_grader("numeric").version
    assert fingerprint.grader_version(f"python: {user_module}:overlap").startswith(f"python:{user_module}:overlap@")


def test_python_grader_version_changes_with_the_source(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "versioned_metric_mod.py"
    path.write_text("def m(p, e):\n    return True\n")
    from trprompt.grading.custom import PythonGrader

    v1 = PythonGrader("python: versioned_metric_mod:m").version
    path.write_text("def m(p, e):\n    return False\n")
    sys.modules.pop("versioned_metric_mod", None)
    v2 = PythonGrader("python: versioned_metric_mod:m").version
    sys.modules.pop("versioned_metric_mod", None)
    assert v1 != v2


# ------------------------------------------------------------------------------------------ evaluation


def test_evaluation_averages_float_scores():
    from trprompt.evaluation import EvalResult

    tokens = {"target_prompt_tokens": 1, "target_completion_tokens": 1}
    rows = [
        {"correct": False, "score": 0.5, "grader": "python: m:f", **tokens},
        {"correct": True, "score": 1.0, **tokens},
    ]
    result = EvalResult("p", "d", rows)
    assert result.accuracy == 0.75
    assert result.correct == 1
    assert result.summary()["grader"] == "python: m:f"
    assert EvalResult("p", "d", [{"correct": True}, {"correct": False}]).accuracy == 0.5  # old rows


def test_validation_scores_average_float_metrics():
    from trprompt.methods.base import InstructionScore
    from trprompt.reward_search import _score_from_rows

    rows = [{"correct": False, "score": 0.25}, {"correct": True, "score": 1.0}]
    assert InstructionScore("i", 1, 2, rows).accuracy == 0.625
    assert InstructionScore("i", 1, 2, [{"correct": True}, {"correct": False}]).accuracy == 0.5
    scored = _score_from_rows("t", rows, max_failures=5)
    assert scored.accuracy == 0.625 and scored.correct == 1 and len(scored.failures) == 1
