"""The four math benchmarks as lists of :class:`Problem`, with deterministic train/val/test splits.

The raw files ship with the package under ``trprompt/data/files`` (see the README there for their
origin and licences) and are read with :mod:`importlib.resources`; nothing is downloaded.

Splits (following the TRPrompt paper where it can be followed offline):

* ``gsm8k``: the official files, 7,473 training and 1,319 test problems.
* ``gsm_hard``: its 1,319 rows cut once into 1,000 training and 319 test problems by a fixed
  permutation that does not depend on ``seed``, so the test set never changes.
* ``math``: test = MATH-500; training = the other 4,500 problems of the MATH test split (matched on
  whitespace-normalised problem text). The paper's own MATH training split is not available offline.
* ``svamp``: evaluation only; all 1,000 problems are the test split and asking for train/val raises.

``train`` and ``val`` partition a data set's training pool: the pool is put in an order determined
by ``seed`` and the first ``round(len(pool) * val_fraction)`` problems are ``val``, the rest
``train`` (both keep that seeded order). ``test`` is always in file order and ignores ``seed``.
Orders come from SHA-256 hashes of ``seed`` and problem ids, so they are the same on every machine
and Python version.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache, lru_cache
from importlib import resources
from typing import Any

from trprompt.grading import find_boxed

__all__ = ["DATASETS", "GSM_HARD_SPLIT_SEED", "GSM_HARD_TRAIN_SIZE", "SPLITS", "Problem", "load_split", "split_sizes"]

DATASETS = ("gsm8k", "gsm_hard", "math", "svamp")
SPLITS = ("train", "val", "test")
GSM_HARD_SPLIT_SEED = 1234
GSM_HARD_TRAIN_SIZE = 1000


@dataclass(frozen=True)
class Problem:
    r"""One benchmark problem.

    Attributes:
        id: stable identifier, ``"<dataset>-<pool>-<row>"`` with ``pool`` the training or test pool
            the problem belongs to and ``row`` its 0-based row in the source file
            (e.g. ``"gsm8k-test-00042"``). Ids do not depend on the split seed.
        question: the problem statement shown to the model.
        answer: the gold final answer as text ("18", "0.5", "\frac{1}{2}").
        solution: the reference worked solution when the data set has one, else ``None``.
        dataset: one of :data:`DATASETS`.
        metadata: extra source fields (MATH level/type, SVAMP equation/type, GSM-Hard program, ...).

    """

    id: str
    question: str
    answer: str
    solution: str | None
    dataset: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def _read_jsonl(*parts: str) -> list[dict[str, Any]]:
    node = resources.files("trprompt.data").joinpath("files")
    for part in parts:
        node = node.joinpath(part)
    with node.open("r", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _format_float(x: float) -> str:
    """Plain decimal text for a float: ``5.0`` -> ``"5"``, ``2.0107e-06`` -> ``"0.0000020107"``.

    Uses the shortest round-trip digits (as ``repr`` does) but never scientific notation.
    """
    text = format(Decimal(repr(float(x))), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _normalize_problem_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _svamp_question(body: str, question: str) -> str:
    """Join SVAMP's Body and Question, ending the body with a period when it has no final punctuation."""
    body, question = body.strip(), question.strip()
    if body and body[-1] not in ".?!":
        body += "."
    return f"{body} {question}".strip()


def _gsm8k(pool: str) -> list[Problem]:
    rows = _read_jsonl("gsm8k", f"{pool}.jsonl")
    out = []
    for i, row in enumerate(rows):
        final = row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
        out.append(Problem(f"gsm8k-{pool}-{i:05d}", row["question"], final, row["answer"], "gsm8k"))
    return out


def _gsm_hard_pools() -> tuple[list[Problem], list[Problem]]:
    rows = _read_jsonl("gsm_hard", "test.jsonl")
    ranked = sorted(range(len(rows)), key=lambda i: _hash_key(f"gsm_hard:{GSM_HARD_SPLIT_SEED}:{i}"))
    train_rows = set(ranked[:GSM_HARD_TRAIN_SIZE])
    train, test = [], []
    for i, row in enumerate(rows):
        pool = "train" if i in train_rows else "test"
        problem = Problem(
            id=f"gsm_hard-{pool}-{i:05d}",
            question=row["input"],
            answer=_format_float(float(row["target"])),
            solution=None,
            dataset="gsm_hard",
            metadata={"code": row.get("code"), "idx": row.get("idx"), "target": row["target"]},
        )
        (train if pool == "train" else test).append(problem)
    return train, test


def _math_pools() -> tuple[list[Problem], list[Problem]]:
    test_rows = _read_jsonl("math500", "test.jsonl")
    held_out = {_normalize_problem_text(r["problem"]) for r in test_rows}
    test = [
        Problem(
            id=f"math-test-{i:05d}",
            question=r["problem"],
            answer=r["answer"],
            solution=r["solution"],
            dataset="math",
            metadata={"level": int(r["level"]), "type": r["subject"], "unique_id": r["unique_id"]},
        )
        for i, r in enumerate(test_rows)
    ]
    train = []
    for i, r in enumerate(_read_jsonl("math", "test.jsonl")):
        if _normalize_problem_text(r["problem"]) in held_out:
            continue
        answer = find_boxed(r["solution"])
        if answer is None:  # every row has one in the vendored file; keep the loader strict anyway
            raise ValueError(f"MATH row {i} has no \\boxed{{}} answer in its solution")
        level = re.search(r"\d+", str(r["level"]))
        train.append(
            Problem(
                id=f"math-train-{i:05d}",
                question=r["problem"],
                answer=answer,
                solution=r["solution"],
                dataset="math",
                metadata={"level": int(level.group(0)) if level else None, "type": r["type"]},
            )
        )
    return train, test


def _svamp_test() -> list[Problem]:
    return [
        Problem(
            id=f"svamp-test-{i:05d}",
            question=_svamp_question(r["Body"], r["Question"]),
            answer=_format_float(float(r["Answer"])),
            solution=None,
            dataset="svamp",
            metadata={"Equation": r["Equation"].strip(), "Type": r["Type"], "ID": r["ID"]},
        )
        for i, r in enumerate(_read_jsonl("svamp", "test.jsonl"))
    ]


@cache
def _pools(dataset: str) -> tuple[tuple[Problem, ...], tuple[Problem, ...]]:
    """(training pool, test set) of a data set, parsed once per process."""
    if dataset == "gsm8k":
        train, test = _gsm8k("train"), _gsm8k("test")
    elif dataset == "gsm_hard":
        train, test = _gsm_hard_pools()
    elif dataset == "math":
        train, test = _math_pools()
    elif dataset == "svamp":
        train, test = [], _svamp_test()
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return tuple(train), tuple(test)


def _hash_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _check(dataset: str, split: str | None, val_fraction: float) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


@lru_cache(maxsize=64)
def _train_val(dataset: str, seed: int, val_fraction: float) -> tuple[tuple[Problem, ...], tuple[Problem, ...]]:
    pool = _pools(dataset)[0]
    ordered = sorted(pool, key=lambda p: _hash_key(f"{seed}:{p.id}"))
    n_val = round(len(ordered) * val_fraction)
    return tuple(ordered[n_val:]), tuple(ordered[:n_val])


def load_split(
    dataset: str, split: str, seed: int = 0, limit: int | None = None, val_fraction: float = 0.1
) -> list[Problem]:
    """The problems of one split of one data set.

    Args:
        dataset: one of :data:`DATASETS`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: decides the train/val partition and their order; ``test`` ignores it.
        limit: keep only the first ``limit`` problems of the (seeded or file) order.
        val_fraction: share of the training pool held out as ``val``, in ``[0, 1)``.

    Raises:
        ValueError: unknown dataset or split, bad ``val_fraction`` or ``limit``, or train/val of
            ``svamp`` (which is test-only).

    """
    _check(dataset, split, val_fraction)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if split == "test":
        problems = list(_pools(dataset)[1])
    else:
        if dataset == "svamp":
            raise ValueError("svamp is test-only: it has no train or val split")
        train, val = _train_val(dataset, seed, val_fraction)
        problems = list(train if split == "train" else val)
    return problems if limit is None else problems[:limit]


def split_sizes(dataset: str, seed: int = 0, val_fraction: float = 0.1) -> dict[str, int]:
    """Number of problems in each split, e.g. ``{"train": 6726, "val": 747, "test": 1319}``.

    ``svamp`` reports 0 for train and val.
    """
    _check(dataset, None, val_fraction)
    train_pool, test = _pools(dataset)
    n_val = round(len(train_pool) * val_fraction)
    return {"train": len(train_pool) - n_val, "val": n_val, "test": len(test)}
