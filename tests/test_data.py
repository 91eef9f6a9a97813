"""Vendored data sets: sizes, seeded splits, parsing details, errors."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources

import pytest

from trprompt.data import DATASETS, Problem, load_split, split_sizes, tasks
from trprompt.data import datasets as ds


def _ids(problems):
    return [p.id for p in problems]


def _norm(text):
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "pool", "test"),
    [("gsm8k", 7473, 1319), ("gsm_hard", 1000, 319), ("math", 4500, 500), ("svamp", 0, 1000)],
)
def test_split_sizes_match_the_paper_setup(dataset, pool, test):
    sizes = split_sizes(dataset)
    assert sizes["train"] + sizes["val"] == pool
    assert sizes["test"] == test
    assert sizes["val"] == round(pool * 0.1)
    assert len(load_split(dataset, "test")) == test
    if pool:
        assert len(load_split(dataset, "train")) == sizes["train"]
        assert len(load_split(dataset, "val")) == sizes["val"]


def test_exact_train_val_counts():
    assert split_sizes("gsm8k") == {"train": 6726, "val": 747, "test": 1319}
    assert split_sizes("gsm_hard") == {"train": 900, "val": 100, "test": 319}
    assert split_sizes("math") == {"train": 4050, "val": 450, "test": 500}
    assert split_sizes("svamp") == {"train": 0, "val": 0, "test": 1000}
    assert split_sizes("gsm8k", val_fraction=0.2) == {"train": 5978, "val": 1495, "test": 1319}
    assert split_sizes("math", val_fraction=0.0)["val"] == 0


# ---------------------------------------------------------------------------------------------------
# Train/val partition
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["gsm8k", "gsm_hard", "math"])
def test_train_val_are_disjoint_and_cover_the_pool(dataset):
    train, val = _ids(load_split(dataset, "train")), _ids(load_split(dataset, "val"))
    test = _ids(load_split(dataset, "test"))
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    assert not set(train) & set(val)
    assert not (set(train) | set(val)) & set(test)
    pool = set(_ids(load_split(dataset, "train", seed=7))) | set(_ids(load_split(dataset, "val", seed=7)))
    assert set(train) | set(val) == pool  # same pool whatever the seed


@pytest.mark.parametrize("dataset", ["gsm8k", "gsm_hard", "math"])
def test_splits_are_deterministic_and_seed_dependent(dataset):
    tasks._load_cached.cache_clear()
    first = _ids(load_split(dataset, "val", seed=0))
    tasks._load_cached.cache_clear()
    again = _ids(load_split(dataset, "val", seed=0))
    other = _ids(load_split(dataset, "val", seed=1))
    assert first == again
    assert set(first) != set(other)
    assert _ids(load_split(dataset, "train", seed=0)) == _ids(load_split(dataset, "train", seed=0))


def test_orders_are_pinned():
    # Orders come from SHA-256 of seed and id, so they must be identical on every machine and Python version.
    assert _ids(load_split("gsm8k", "val", seed=0, limit=3)) == [
        "gsm8k-train-02842",
        "gsm8k-train-03914",
        "gsm8k-train-02127",
    ]
    assert _ids(load_split("math", "val", seed=1, limit=2)) == ["math-train-01006", "math-train-01966"]
    assert _ids(load_split("gsm_hard", "test", limit=3)) == [
        "gsm_hard-test-00004",
        "gsm_hard-test-00005",
        "gsm_hard-test-00006",
    ]


def test_test_splits_ignore_the_seed():
    for dataset in DATASETS:
        assert _ids(load_split(dataset, "test", seed=0)) == _ids(load_split(dataset, "test", seed=99))


def test_gsm_hard_test_is_a_fixed_subset_in_file_order():
    test = load_split("gsm_hard", "test", seed=5)
    rows = [int(p.id.rsplit("-", 1)[1]) for p in test]
    assert rows == sorted(rows)
    assert all(p.id.startswith("gsm_hard-test-") for p in test)
    pool = load_split("gsm_hard", "train", seed=5) + load_split("gsm_hard", "val", seed=5)
    all_rows = sorted(rows + [int(p.id.rsplit("-", 1)[1]) for p in pool])
    assert all_rows == list(range(1319))
    # the fixed permutation is not the identity: test rows are spread over the whole file
    assert rows[0] < 50 and rows[-1] > 1250


def test_no_math500_problem_in_math_train():
    test = {_norm(p.question) for p in load_split("math", "test")}
    pool = load_split("math", "train") + load_split("math", "val")
    assert len(pool) == 4500
    assert not any(_norm(p.question) in test for p in pool)
    assert len({_norm(p.question) for p in pool}) == 4500


def test_limit_takes_a_prefix_of_the_seeded_order():
    full = load_split("gsm8k", "train", seed=3)
    assert load_split("gsm8k", "train", seed=3, limit=10) == full[:10]
    assert load_split("math", "test", limit=5) == load_split("math", "test")[:5]
    assert load_split("svamp", "test", limit=0) == []
    assert len(load_split("gsm_hard", "val", limit=10_000)) == 100


def test_returned_lists_are_independent_copies():
    first = load_split("gsm8k", "val")
    first.clear()
    assert len(load_split("gsm8k", "val")) == 747


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_bad_names_raise_with_the_choices():
    with pytest.raises(ValueError, match="gsm8k.*gsm_hard.*math.*svamp"):
        load_split("gsm9k", "test")
    with pytest.raises(ValueError, match="train.*val.*test"):
        load_split("gsm8k", "validation")
    with pytest.raises(ValueError, match="svamp"):
        split_sizes("math500")
    with pytest.raises(ValueError, match="val_fraction"):
        load_split("gsm8k", "train", val_fraction=1.0)
    with pytest.raises(ValueError, match="limit"):
        load_split("gsm8k", "train", limit=-1)


@pytest.mark.parametrize("split", ["train", "val"])
def test_svamp_is_test_only(split):
    with pytest.raises(ValueError, match="test-only"):
        load_split("svamp", split)


# ---------------------------------------------------------------------------------------------------
# Parsing of each source
# ---------------------------------------------------------------------------------------------------


def test_gsm8k_fields():
    first = load_split("gsm8k", "test")[0]
    assert first.id == "gsm8k-test-00000"
    assert first.answer == "18"
    assert first.solution.endswith("#### 18")
    assert first.question.startswith("Janet")
    assert first.dataset == "gsm8k"
    pool = {p.id: p for p in load_split("gsm8k", "train") + load_split("gsm8k", "val")}
    with_comma = pool["gsm8k-train-07358"]
    assert with_comma.solution.endswith("#### 999,000")
    assert with_comma.answer == "999000"
    assert all(re.fullmatch(r"-?\d+", p.answer) for p in pool.values())


def test_gsm_hard_answers_are_clean_numbers():
    problems = load_split("gsm_hard", "test") + load_split("gsm_hard", "train") + load_split("gsm_hard", "val")
    for p in problems:
        assert "e" not in p.answer.lower() and not p.answer.endswith(".0"), p.answer
        assert float(p.answer) == pytest.approx(p.metadata["target"], rel=1e-12, abs=1e-15)
        assert p.solution is None and "def solution" in p.metadata["code"]
    by_row = {int(p.id.rsplit("-", 1)[1]): p for p in problems}
    assert by_row[0].answer == "-9867630"  # target -9867630.0
    assert ds._format_float(2.0107e-06) == "0.0000020107"
    assert ds._format_float(3244047.0999999996) == "3244047.0999999996"
    assert ds._format_float(5.0) == "5"
    assert ds._format_float(-0.0) == "0"


def test_math_fields():
    test = load_split("math", "test")
    assert test[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert test[0].metadata == {"level": 2, "type": "Precalculus", "unique_id": "test/precalculus/807.json"}
    pool = load_split("math", "train") + load_split("math", "val")
    assert {p.metadata["level"] for p in pool} == {1, 2, 3, 4, 5}
    assert all(p.answer and p.solution and p.id.startswith("math-train-") for p in pool)
    first = min(pool, key=lambda p: p.id)
    assert first.id == "math-train-00000"
    assert first.answer == "2"  # "...has $\boxed{2}$ vertical asymptotes."
    nested = [p for p in pool if p.answer.count("{") >= 2]
    assert nested and all(p.answer.count("{") == p.answer.count("}") for p in nested)


def test_svamp_question_joins_body_and_question():
    test = load_split("svamp", "test")
    assert test[0].question == (
        "There are 87 oranges and 290 bananas in Philip's collection. If the bananas are organized into "
        "2 groups and oranges are organized into 93 groups. How big is each group of bananas?"
    )
    assert test[1].question.startswith("Marco and his dad") and "30 pounds. How much" in test[1].question
    assert test[0].answer == "145"
    assert test[0].metadata["Equation"] == "( 290.0 / 2.0 )"
    assert all("  " not in p.question for p in test)
    # the join never adds a second period; the one ".." is a typo in the source body itself
    doubled = [p.question for p in test if ".." in p.question]
    assert len(doubled) == 1 and "cards left.. How many" in doubled[0]
    assert sum(p.question.endswith("?") for p in test) > 950


def test_ids_are_unique_across_all_splits():
    ids = [
        p.id
        for d in DATASETS
        for s in ("train", "val", "test")
        if not (d == "svamp" and s != "test")
        for p in load_split(d, s)
    ]
    assert len(ids) == len(set(ids)) == 7473 + 1319 + 1319 + 5000 + 1000


def test_problem_is_frozen_and_metadata_ignored_in_equality():
    a = Problem("x-1", "q", "1", None, "gsm8k", {"k": 1})
    b = Problem("x-1", "q", "1", None, "gsm8k", {"k": 2})
    assert a == b and hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.answer = "2"  # type: ignore[misc]


def test_data_ships_inside_the_package():
    files = resources.files("trprompt.data").joinpath("files")
    for rel in [
        "gsm8k/train.jsonl",
        "gsm8k/test.jsonl",
        "gsm8k/LICENSE",
        "gsm_hard/test.jsonl",
        "math/test.jsonl",
        "math500/test.jsonl",
        "svamp/test.jsonl",
        "LICENSE.math-evaluation-harness",
        "README.md",
    ]:
        assert files.joinpath(rel).is_file(), rel
    assert "/work/shared" not in (resources.files("trprompt.data") / "datasets.py").read_text()
