"""Splits of a task by name or path: :func:`load_split` and :func:`split_sizes`.

The built-in benchmarks are rows of :data:`trprompt.data.tasks.BUILTIN_TASKS`; their raw files ship
with the package under ``trprompt/data/files`` (see the README there for their origin and licences)
and nothing is downloaded. A user's JSONL/CSV/Parquet file or folder loads through the same path
(:func:`trprompt.data.tasks.load_task`).

Splits of the built-ins (following the TRPrompt paper where it can be followed offline):

* ``gsm8k``: the official files, 7,473 training and 1,319 test problems.
* ``gsm_hard``: its 1,319 rows cut once into 1,000 training and 319 test problems by a fixed
  hash ranking that does not depend on ``seed``, so the test set never changes.
* ``math``: test = MATH-500; training = the other 4,500 problems of the MATH test split (matched on
  whitespace-normalised problem text). The paper's own MATH training split is not available offline.
* ``svamp``: evaluation only; all 1,000 problems are the test split and asking for train/val raises.

``train`` and ``val`` partition a task's training pool: the pool is put in an order determined
by ``seed`` and the first ``round(len(pool) * val_fraction)`` problems are ``val``, the rest
``train`` (both keep that seeded order). ``test`` is always in file order and ignores ``seed``.
Orders come from SHA-256 hashes of ``seed`` and problem ids, so they are the same on every machine
and Python version.
"""

from __future__ import annotations

from trprompt.data.builtin import format_float as _format_float  # noqa: F401  (kept for old imports)
from trprompt.data.problem import Problem
from trprompt.data.tasks import BUILTIN_TASKS, SPLITS, Task, load_task

__all__ = ["DATASETS", "GSM_HARD_SPLIT_SEED", "GSM_HARD_TRAIN_SIZE", "SPLITS", "Problem", "load_split", "split_sizes"]

DATASETS = tuple(BUILTIN_TASKS)
GSM_HARD_SPLIT_SEED = BUILTIN_TASKS["gsm_hard"].split_seed
GSM_HARD_TRAIN_SIZE = 1000


def load_split(
    dataset: str | Task, split: str, seed: int = 0, limit: int | None = None, val_fraction: float = 0.1
) -> list[Problem]:
    """The problems of one split of one task.

    Args:
        dataset: a built-in name (:data:`DATASETS`), a file or folder path, or a loaded :class:`Task`
            (use :func:`~trprompt.data.tasks.load_task` for field mappings, graders and the rest).
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: decides the train/val partition and their order; ``test`` ignores it.
        limit: keep only the first ``limit`` problems of the (seeded or file) order.
        val_fraction: share of the training pool held out as ``val``, in ``[0, 1)``.

    Raises:
        ValueError: unknown dataset or split, bad ``val_fraction`` or ``limit``, or train/val of a
            test-only task (``svamp``); :class:`~trprompt.data.tasks.DatasetError` for bad rows.

    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return load_task(_known(dataset)).split(split, seed=seed, limit=limit, val_fraction=val_fraction)


def split_sizes(dataset: str | Task, seed: int = 0, val_fraction: float = 0.1) -> dict[str, int]:
    """Number of problems in each split, e.g. ``{"train": 6726, "val": 747, "test": 1319}``.

    ``svamp`` reports 0 for train and val.
    """
    return load_task(_known(dataset)).sizes(seed=seed, val_fraction=val_fraction)


def _known(dataset: str | Task) -> str | Task:
    if isinstance(dataset, str) and dataset not in BUILTIN_TASKS:
        from pathlib import Path

        if not Path(dataset).exists():
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)} or give a file path")
    return dataset
