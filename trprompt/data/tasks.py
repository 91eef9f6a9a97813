"""Tasks: the built-in benchmarks and a user's own files, through one loading path.

A task is a row of :data:`BUILTIN_TASKS` (name, files, grader, description) or a user's data set: a
JSONL, CSV or Parquet file, or a folder holding ``train.<ext>`` and/or ``test.<ext>``. Both are
loaded by :func:`load_task`, which reads every row, maps the configured fields, checks each row and
builds the splits.

Splits:

* a test file, when there is one, is the test split (in file order);
* otherwise (one file) a fixed, hash-based share of the rows is the test split: rows are ranked by
  ``sha256("<salt>:<split_seed>:<key>")`` with ``key`` the row's whitespace-normalised question (so
  the split does not depend on the row order or the id column, and repeated questions land on the
  same side; GSM-Hard's built-in row keeps its historical key, the 0-based row), and the last
  ``test_size`` rows of that ranking form the test split, kept in file order;
* ``train`` and ``val`` partition the training pool: the pool is ordered by ``sha256("<seed>:<id>")``
  and the first ``round(len(pool) * val_fraction)`` problems are ``val`` (the paper's 10 %).

Every order comes from SHA-256, so splits are the same on every machine and Python version.

Checks (all before any model loads; each names the file, line or row, and field): a row that is not
JSON or not UTF-8, a missing field, an empty question or answer, a malformed choices list, a
duplicate id, a question that is in both the training pool and the test split, and an answer the
grader cannot read as a gold answer. Any of these is an error (:class:`DatasetError`, listing them)
unless ``skip_bad_rows`` is set: then the rows are dropped and listed in :attr:`Task.dropped`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from trprompt.data import builtin
from trprompt.data.problem import Problem
from trprompt.data.records import RawRow, find_split_file, non_utf8_fields, package_file, read_rows

__all__ = [
    "BUILTIN_TASKS",
    "DATASET_GRADERS",
    "DEFAULT_DESCRIPTION",
    "SPLITS",
    "DatasetError",
    "Fields",
    "RowIssue",
    "Task",
    "TaskSpec",
    "grade_problem",
    "load_task",
    "task_from_config",
]

SPLITS = ("train", "val", "test")
Pool = Literal["train", "test", "all"]
Prepare = Callable[[dict[str, Any], str], Mapping[str, Any]]

DEFAULT_DESCRIPTION = (
    "Answer the question. A correct answer states the same final answer as the reference answer."
)
"""The description of a file task whose config gives none (set ``task.description`` for better prompts)."""

DEFAULT_TEST_SIZE = 0.2
"""Share of a single file's rows held out as the test split when no test file or size is given."""

_MAX_LISTED = 20


@dataclass(frozen=True)
class Fields:
    """Which column of a row holds what. ``None``: the task has no such column."""

    question: str = "question"
    answer: str = "answer"
    solution: str | None = None
    choices: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """One row of the task table: where a task's rows come from and how they are graded and described.

    Attributes:
        name: the task's name (ids start with it).
        description: one or two sentences for the meta-instructions: what the assistant is asked to do
            and what a correct answer looks like.
        grader: the grader spec (``numeric``, ``math``, ``exact``, ``choice``, ``contains``, ``python: ...``).
        files: ``(pool, path)`` pairs, pool ``train``, ``test`` or ``all`` (one file split by hash).
            Built-in paths are relative to ``trprompt/data/files``.
        fields: the column mapping (after ``prepare``).
        prepare: turns a raw row into the task fields (built-ins); ``None`` for user files.
        test_size: rows held out from an ``all`` file: a count (>= 1) or a fraction in (0, 1).
        split_seed: seed of the hash that picks those rows (not the run seed: the test split never moves).
        split_salt: first part of that hash's text.
        split_key: what a row is hashed on: its normalised ``question`` or its 0-based ``row``.
        overlap: what a training row whose question is also in the test split is: ``error`` (a bad row)
            or ``drop`` (left out by the task's definition, as MATH's MATH-500 problems).
        wording: the template profile: ``math`` keeps the original math meta-instructions, ``neutral``
            fills the task-neutral ones with ``description``.
        builtin: files ship inside the package.

    """

    name: str
    description: str
    grader: str
    files: tuple[tuple[Pool, str], ...]
    fields: Fields = Fields()
    prepare: Prepare | None = None
    test_size: float | None = None
    split_seed: int = 0
    split_salt: str = "file"
    split_key: Literal["question", "row"] = "question"
    overlap: Literal["error", "drop"] = "error"
    wording: Literal["math", "neutral"] = "neutral"
    builtin: bool = False


_MATH_FIELDS = Fields(solution="solution")

BUILTIN_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "gsm8k",
            "Solve a grade-school math word problem. A correct answer ends with the final number.",
            "numeric",
            (("train", "gsm8k/train.jsonl"), ("test", "gsm8k/test.jsonl")),
            _MATH_FIELDS, builtin.gsm8k_row, wording="math", builtin=True,
        ),
        TaskSpec(
            "gsm_hard",
            "Solve a math word problem with large numbers. A correct answer ends with the final number.",
            "numeric",
            (("all", "gsm_hard/test.jsonl"),),
            _MATH_FIELDS, builtin.gsm_hard_row, test_size=319, split_seed=1234, split_salt="gsm_hard",
            split_key="row", wording="math", builtin=True,
        ),
        TaskSpec(
            "math",
            "Solve a competition mathematics problem. A correct answer ends with the final expression in "
            "\\boxed{}.",
            "math",
            (("train", "math/test.jsonl"), ("test", "math500/test.jsonl")),
            _MATH_FIELDS, builtin.math_row, overlap="drop", wording="math", builtin=True,
        ),
        TaskSpec(
            "svamp",
            "Solve a short arithmetic word problem. A correct answer ends with the final number.",
            "numeric",
            (("test", "svamp/test.jsonl"),),
            _MATH_FIELDS, builtin.svamp_row, wording="math", builtin=True,
        ),
    )
}
"""The built-in tasks. MATH's training pool is the MATH test split minus MATH-500; GSM-Hard's 1,319
rows are cut once into 1,000 training and 319 test problems; SVAMP is test-only."""

DATASET_GRADERS: dict[str, str] = {name: spec.grader for name, spec in BUILTIN_TASKS.items()}
"""The grader spec each built-in dataset names in its table row."""


@dataclass(frozen=True)
class RowIssue:
    """Why one row is unusable (or was dropped)."""

    where: str
    field: str | None
    reason: str
    kind: str = ""
    """The reason without row-specific details (what counts are grouped by; default: ``reason``)."""

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", self.reason)

    def __str__(self) -> str:
        return f"{self.where}: {f'field {self.field!r}: ' if self.field else ''}{self.reason}"


class DatasetError(ValueError):
    """The task's rows have problems; the message lists them (file, line or row, field, reason)."""

    def __init__(self, task: str, issues: list[RowIssue], hint: bool = True) -> None:
        self.issues = issues
        counts = Counter(i.kind for i in issues)
        lines = [f"task {task!r}: {len(issues)} bad row{'s' if len(issues) != 1 else ''} "
                 f"({', '.join(f'{k}: {n}' for k, n in counts.most_common())})"]
        lines += [f"  {i}" for i in issues[:_MAX_LISTED]]
        if len(issues) > _MAX_LISTED:
            lines.append(f"  ... and {len(issues) - _MAX_LISTED} more")
        if "answer not a gold answer for the grader" in counts:
            lines.append("If the answers are not numbers, choose the grader that fits them: task.grader (--grader) "
                         "exact, contains, choice, math or 'python: package.module:function'.")
        if hint:
            lines.append("Fix the rows, or set dataset.skip_bad_rows: true (--skip-bad-rows) to drop them; "
                         "the run report then lists what was dropped.")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------------------------- grading
def check_grader_spec(spec: str) -> None:
    """Raise ValueError when ``spec`` names no grader (a ``python:`` metric is imported to check it)."""
    from trprompt.grading import make_grader

    make_grader(spec)


def _check_gold(spec: str, answer: str, example: Problem) -> str | None:
    from trprompt.grading import make_grader

    return make_grader(spec).check_gold(answer, example)


def grade_problem(problem: Problem, output: str) -> Any:
    """Grade a model ``output`` for ``problem`` with the problem's own grader (a ``Grade``)."""
    from trprompt.grading import grader_for

    return grader_for(problem).grade(output, problem)


# --------------------------------------------------------------------------------------------- loading
def _hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _text(value: Any) -> str | None:
    """A cell as text: strings as they are, numbers in plain decimal; ``None`` for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return builtin.format_float(value)
    return None


def _choices(value: Any) -> tuple[str, ...] | None:
    """A choices cell: a list of strings, a JSON list, or options separated by ``|``."""
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                return None
        else:
            value = [part.strip() for part in s.split("|")]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None
    out = tuple(str(v).strip() for v in value if v is not None)
    return out if len(out) >= 2 and all(out) else None


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"A{i}"


def question_with_choices(question: str, choices: tuple[str, ...]) -> str:
    """The question followed by its lettered options (``A. ...`` one per line)."""
    return question.rstrip() + "\n\n" + "\n".join(f"{_letter(i)}. {c}" for i, c in enumerate(choices))


@dataclass
class _Row:
    raw: RawRow
    pool: str
    problem: Problem | None = None
    key: str = ""


def _row_problem(spec: TaskSpec, row: _Row, issues: list[RowIssue]) -> None:
    """Map, check and build ``row.problem`` (left ``None`` with an issue appended when unusable)."""
    raw, f = row.raw, spec.fields
    if raw.error is not None or raw.data is None:
        issues.append(RowIssue(raw.where, None, raw.error or "unreadable row",
                               (raw.error or "unreadable row").split(" (")[0]))
        return
    bad = non_utf8_fields(raw.data)
    if bad:
        issues.append(RowIssue(raw.where, bad[0], "not valid UTF-8"))
        return
    data: Mapping[str, Any] = raw.data
    meta: dict[str, Any] = {}
    if spec.prepare is not None:
        try:
            data = spec.prepare(dict(raw.data), row.pool)
        except KeyError as e:
            issues.append(RowIssue(raw.where, str(e.args[0]), "missing field"))
            return
        except (TypeError, ValueError) as e:
            issues.append(RowIssue(raw.where, None, f"cannot be read: {e}", "cannot be read"))
            return
        meta = dict(data.get("metadata") or {})
    else:
        used = {f.question, f.answer, f.solution, f.choices, f.id}
        meta = {k: v for k, v in raw.data.items() if k not in used}
    values: dict[str, str] = {}
    for role in ("question", "answer"):
        name = getattr(f, role)
        if name not in data or data[name] is None:
            issues.append(RowIssue(raw.where, name, "missing field"))
            return
        text = _text(data[name])
        if text is None:
            issues.append(RowIssue(raw.where, name, f"must be text or a number, got {type(data[name]).__name__}",
                                   "not text"))
            return
        if not text.strip():
            issues.append(RowIssue(raw.where, name, f"empty {role}"))
            return
        values[role] = text if role == "question" else text.strip()
    solution = None
    if f.solution is not None and data.get(f.solution) is not None:
        solution = _text(data[f.solution])
        if solution is not None and not solution.strip():
            solution = None
    choices = None
    if f.choices is not None:
        if f.choices not in data or data[f.choices] is None:
            issues.append(RowIssue(raw.where, f.choices, "missing field"))
            return
        choices = _choices(data[f.choices])
        if choices is None:
            issues.append(RowIssue(raw.where, f.choices, "choices must be a list of at least 2 non-empty options "
                                   "(a JSON list, or options separated by '|')"))
            return
    if f.id is not None:
        if f.id not in data or data[f.id] is None:
            issues.append(RowIssue(raw.where, f.id, "missing field"))
            return
        ident = _text(data[f.id])
        if ident is None or not ident.strip():
            issues.append(RowIssue(raw.where, f.id, "empty id"))
            return
        row.key = ident.strip()
    else:
        row.key = str(raw.index)
    question = values["question"] if choices is None else question_with_choices(values["question"], choices)
    if not spec.builtin:
        meta.setdefault("source", raw.where)
    problem = Problem(row.key, question, values["answer"], solution, spec.name, meta, spec.grader, choices)
    reason = _check_gold(spec.grader, values["answer"], problem)
    if reason:
        issues.append(RowIssue(raw.where, f.answer, f"grader {spec.grader!r} cannot use it as a gold answer: {reason}",
                               "answer not a gold answer for the grader"))
        return
    row.problem = problem


def _test_count(spec: TaskSpec, n: int, where: str) -> int:
    size = DEFAULT_TEST_SIZE if spec.test_size is None else spec.test_size
    count = round(n * size) if 0 < size < 1 else int(size)
    if n < 2:
        raise ValueError(f"{where}: {n} usable row{'s' if n != 1 else ''}; holding out a test split needs at least 2 "
                         "(or give a separate test file)")
    if count < 1 or count >= n:
        raise ValueError(f"{where}: test_size {size} holds out {count} of {n} usable rows; give a count between 1 "
                         f"and {n - 1} or a fraction that leaves rows on both sides")
    return count


def _source(spec: TaskSpec, path: str) -> tuple[Any, str]:
    if spec.builtin:
        return package_file(path), f"trprompt/data/files/{path}"
    return Path(path), path


def _build(spec: TaskSpec, skip_bad_rows: bool) -> Task:
    issues: list[RowIssue] = []
    rows: list[_Row] = []
    for pool, path in spec.files:
        node, shown = _source(spec, path)
        file_rows = [_Row(r, pool) for r in read_rows(node, shown)]
        if not file_rows:
            raise DatasetError(spec.name, [RowIssue(shown, None, "the file has no rows")], hint=False)
        for row in file_rows:
            _row_problem(spec, row, issues)
        rows.extend(file_rows)
    if issues and not skip_bad_rows:  # the rows' own problems first, all of them
        raise DatasetError(spec.name, issues)
    good = [r for r in rows if r.problem is not None]
    # A single file: hash-based test split over its usable rows.
    single = [r for r in good if r.pool == "all"]
    if single:
        n_test = _test_count(spec, len(single), single[0].raw.file)
        def split_key(r: _Row) -> str:
            assert r.problem is not None
            return str(r.raw.index) if spec.split_key == "row" else builtin.normalize_question(r.problem.question)

        ranked = sorted(single, key=lambda r: (_hash(f"{spec.split_salt}:{spec.split_seed}:{split_key(r)}"),
                                               r.raw.index))
        for r in ranked[len(ranked) - n_test:]:
            r.pool = "test"
        for r in ranked[: len(ranked) - n_test]:
            r.pool = "train"
    # Ids: the id field, else "<task>-<pool>-<row>".
    for r in good:
        assert r.problem is not None
        if spec.fields.id is None:
            r.problem = replace(r.problem, id=f"{spec.name}-{r.pool}-{r.raw.index:05d}")
    # Duplicate ids (the later row is the bad one).
    first: dict[str, RawRow] = {}
    for r in good:
        assert r.problem is not None
        seen = first.get(r.problem.id)
        if seen is not None:
            issues.append(RowIssue(r.raw.where, spec.fields.id,
                                   f"duplicate id {r.problem.id!r} (first at {seen.where})", "duplicate id"))
            r.problem = None
        else:
            first[r.problem.id] = r.raw
    # A question both in the training pool and in the test split.
    test_questions = {builtin.normalize_question(r.problem.question): r.raw
                      for r in good if r.problem is not None and r.pool == "test"}
    for r in good:
        if r.problem is None or r.pool != "train":
            continue
        other = test_questions.get(builtin.normalize_question(r.problem.question))
        if other is not None:
            if spec.overlap == "error":
                issues.append(RowIssue(r.raw.where, spec.fields.question,
                                       f"question also in the test split (at {other.where})",
                                       "question also in the test split"))
            r.problem = None
    if issues and not skip_bad_rows:
        raise DatasetError(spec.name, issues)
    train = tuple(r.problem for r in rows if r.problem is not None and r.pool == "train")
    test = tuple(r.problem for r in rows if r.problem is not None and r.pool == "test")
    if not train and not test:
        raise DatasetError(spec.name, issues or [RowIssue(spec.name, None, "no usable rows")], hint=False)
    return Task(spec, train, test, tuple(issues))


@dataclass(frozen=True)
class Task:
    """A loaded task: its spec, the training pool and test split, and the rows dropped as bad."""

    spec: TaskSpec
    train_pool: tuple[Problem, ...]
    test: tuple[Problem, ...]
    dropped: tuple[RowIssue, ...] = ()
    _orders: dict[tuple[int, float], tuple[tuple[Problem, ...], tuple[Problem, ...]]] = field(
        default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        """The task's name."""
        return self.spec.name

    @property
    def grader(self) -> str:
        """The grader spec."""
        return self.spec.grader

    @property
    def description(self) -> str:
        """One or two sentences describing the task (fills the meta-instructions)."""
        return self.spec.description

    def _train_val(self, seed: int, val_fraction: float) -> tuple[tuple[Problem, ...], tuple[Problem, ...]]:
        key = (seed, val_fraction)
        if key not in self._orders:
            ordered = sorted(self.train_pool, key=lambda p: _hash(f"{seed}:{p.id}"))
            n_val = round(len(ordered) * val_fraction)
            self._orders[key] = (tuple(ordered[n_val:]), tuple(ordered[:n_val]))
        return self._orders[key]

    def split(self, split: str, seed: int = 0, limit: int | None = None, val_fraction: float = 0.1) -> list[Problem]:
        """The problems of ``split`` (``train``, ``val`` or ``test``); see the module docstring for the rules."""
        _check_split(split, val_fraction, limit)
        if split == "test":
            problems = list(self.test)
        else:
            if not self.train_pool:
                raise ValueError(f"{self.name} is test-only: it has no train or val split")
            train, val = self._train_val(seed, val_fraction)
            problems = list(train if split == "train" else val)
        return problems if limit is None else problems[:limit]

    def sizes(self, seed: int = 0, val_fraction: float = 0.1) -> dict[str, int]:
        """Problems per split, e.g. ``{"train": 6726, "val": 747, "test": 1319}``."""
        _check_split(None, val_fraction, None)
        n_val = round(len(self.train_pool) * val_fraction)
        return {"train": len(self.train_pool) - n_val, "val": n_val, "test": len(self.test)}

    def fingerprint(self) -> str:
        """Short hash of everything the task's results depend on: its rows (as loaded), grader and description."""
        rows = [(p.id, p.question, p.answer, p.solution, p.choices) for p in self.train_pool + self.test]
        text = json.dumps({"rows": rows, "grader": self.grader, "description": self.description,
                           "wording": self.spec.wording, "dropped": len(self.dropped)}, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def dropped_counts(self) -> dict[str, int]:
        """Dropped rows per reason (empty when nothing was dropped)."""
        return dict(Counter(i.kind for i in self.dropped).most_common())

    def data_report(self) -> dict[str, Any]:
        """What the run report shows about the data: task, grader, sources, dropped rows and why."""
        return {
            "task": self.name,
            "grader": self.grader,
            "description": self.description,
            "files": [{"pool": pool, "path": path} for pool, path in self.spec.files],
            "train_pool": len(self.train_pool),
            "test": len(self.test),
            "dropped": len(self.dropped),
            "dropped_by_reason": self.dropped_counts(),
            "dropped_rows": [str(i) for i in self.dropped],
        }


def _check_split(split: str | None, val_fraction: float, limit: int | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


def _file_spec(path: str, fields: Fields, test_file: str | None) -> tuple[str, tuple[tuple[Pool, str], ...]]:
    """The name and files of a user's task at ``path`` (file or folder)."""
    p = Path(path)
    if p.is_dir():
        train, test = find_split_file(p, "train"), find_split_file(p, "test")
        if train is None and test is None:
            raise ValueError(f"dataset {path!r}: the folder holds no train.jsonl/.csv/.parquet or test.* file")
        if test_file is not None:
            raise ValueError(f"dataset {path!r} is a folder; its test file is test.*, drop dataset.test_file")
        files: list[tuple[Pool, str]] = []
        if train is not None:
            files.append(("train" if test is not None else "all", str(train)))
        if test is not None:
            files.append(("test", str(test)))
        name = p.resolve().name
    elif p.is_file():
        files = [("train", str(p)), ("test", test_file)] if test_file else [("all", str(p))]
        if test_file and not Path(test_file).is_file():
            raise ValueError(f"dataset.test_file: no such file {test_file!r}")
        name = p.stem
    else:
        raise ValueError(f"dataset {path!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) "
                         "nor an existing file or folder")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "task"
    return name, tuple(files)


def _stamp(files: tuple[tuple[Pool, str], ...]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for _, path in files:
        st = os.stat(path)
        out.append((str(Path(path).resolve()), st.st_mtime_ns, st.st_size))
    return tuple(out)


def load_task(
    dataset: str | Task,
    *,
    fields: Fields | None = None,
    grader: str | None = None,
    description: str | None = None,
    test_file: str | None = None,
    test_size: float | None = None,
    split_seed: int | None = None,
    skip_bad_rows: bool = False,
) -> Task:
    """Load a built-in task by name, or a user's file or folder by path (a :class:`Task` is returned as is).

    Args:
        dataset: a name in :data:`BUILTIN_TASKS`, a ``.jsonl``/``.csv``/``.parquet`` file, or a folder
            with ``train.*`` and/or ``test.*``.
        fields: column mapping for files (default: ``question`` and ``answer``); not for built-ins.
        grader: grader spec (default: the built-in's; ``numeric`` for files).
        description: the task description (default: the built-in's; :data:`DEFAULT_DESCRIPTION` for
            files). Giving one for a built-in switches it to the task-neutral meta-instructions.
        test_file: a separate test file (with a single-file ``dataset``).
        test_size: rows held out as test from a single file (count, or fraction in (0, 1)).
        split_seed: seed of that hold-out (default 0).
        skip_bad_rows: drop bad rows (listed in :attr:`Task.dropped`) instead of raising.

    Raises:
        DatasetError: bad rows (each named by file, line or row, and field) and ``skip_bad_rows`` is off.
        ValueError: no such task or file, or a bad option.

    """
    if isinstance(dataset, Task):
        return dataset
    if grader is not None:
        check_grader_spec(grader)
    if dataset in BUILTIN_TASKS:
        if fields not in (None, Fields()):
            raise ValueError(f"dataset.fields applies to files; {dataset!r} is a built-in task")
        if test_file is not None:
            raise ValueError(f"dataset.test_file applies to files; {dataset!r} is a built-in task")
        spec = BUILTIN_TASKS[dataset]
        changes: dict[str, Any] = {}
        if grader is not None and grader != spec.grader:
            changes["grader"] = grader
        if description is not None and description != spec.description:
            changes.update(description=description, wording="neutral")
        if test_size is not None or split_seed is not None:
            if not any(pool == "all" for pool, _ in spec.files):
                raise ValueError(f"{dataset!r} has a test file; test_size/split_seed do not apply")
            changes.update(test_size=spec.test_size if test_size is None else test_size,
                           split_seed=spec.split_seed if split_seed is None else split_seed)
        return _load_cached(replace(spec, **changes) if changes else spec, skip_bad_rows, ())
    name, files = _file_spec(str(dataset), fields or Fields(), test_file)
    if test_size is not None and not (0 < test_size < 1 or (test_size >= 1 and float(test_size).is_integer())):
        raise ValueError(f"test_size must be a fraction in (0, 1) or a whole number of rows, got {test_size}")
    spec = TaskSpec(name, description or DEFAULT_DESCRIPTION, grader or "numeric", files, fields or Fields(),
                    test_size=test_size, split_seed=split_seed or 0)
    return _load_cached(spec, skip_bad_rows, _stamp(files))


@lru_cache(maxsize=32)
def _load_cached(spec: TaskSpec, skip_bad_rows: bool, stamp: tuple[tuple[str, int, int], ...]) -> Task:
    return _build(spec, skip_bad_rows)


_SPLIT_FIELDS = ("fields", "test_file", "test_size", "split_seed", "skip_bad_rows")


def fingerprint_inputs(cfg: Any) -> dict[str, Any]:
    """What a run's cached results depend on about its task, as fingerprint inputs.

    Empty for a built-in task as shipped (its data never changes), so the cache keys of those runs stay as they
    were; otherwise the loaded task's :meth:`Task.fingerprint` (rows, grader, description), the ``task`` section
    and the split settings.
    """
    import dataclasses

    from trprompt.config import DatasetConfig, TaskConfig

    plain = all(getattr(cfg.dataset, k) == getattr(DatasetConfig(), k) for k in _SPLIT_FIELDS)
    if cfg.dataset.name in BUILTIN_TASKS and plain and cfg.task == TaskConfig():
        return {}
    split = {f"dataset.{k}": getattr(cfg.dataset, k) for k in _SPLIT_FIELDS}
    split["dataset.fields"] = dataclasses.asdict(cfg.dataset.fields)
    return {"data": task_from_config(cfg).fingerprint(), "task": dataclasses.asdict(cfg.task), **split}


def task_from_config(cfg: Any) -> Task:
    """The task a :class:`~trprompt.config.TRPromptConfig` names (``dataset`` and ``task`` sections)."""
    ds = cfg.dataset
    task_cfg = getattr(cfg, "task", None)
    f = getattr(ds, "fields", None)
    fields = Fields(f.question, f.answer, f.solution, f.choices, f.id) if f is not None else None
    return load_task(
        ds.name,
        fields=fields,
        grader=getattr(task_cfg, "grader", None),
        description=getattr(task_cfg, "description", None),
        test_file=getattr(ds, "test_file", None),
        test_size=getattr(ds, "test_size", None),
        split_seed=getattr(ds, "split_seed", None),
        skip_bad_rows=bool(getattr(ds, "skip_bad_rows", False)),
    )
