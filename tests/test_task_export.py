"""Each built-in task exported to JSONL files and loaded back as a user's task: same splits, same eval numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trprompt.data import BUILTIN_TASKS, Fields, load_split, load_task

SEEDS = (0, 3)


def export(name: str, folder: Path) -> Path:
    """Write the built-in task's training pool and test split as train.jsonl / test.jsonl (with ids)."""
    task = load_task(name)
    folder.mkdir(parents=True)
    for pool, problems in (("train", task.train_pool), ("test", task.test)):
        if not problems:
            continue
        with (folder / f"{pool}.jsonl").open("w", encoding="utf-8") as fh:
            for p in problems:
                fh.write(json.dumps({"id": p.id, "question": p.question, "answer": p.answer,
                                     "solution": p.solution}, ensure_ascii=False) + "\n")
    return folder


def _rows(problems):
    return [(p.id, p.question, p.answer, p.solution, p.grader) for p in problems]


@pytest.mark.parametrize("name", list(BUILTIN_TASKS))
def test_exported_builtin_task_has_the_same_splits(tmp_path, name):
    spec = BUILTIN_TASKS[name]
    folder = export(name, tmp_path / name)
    custom = load_task(str(folder), fields=Fields(solution="solution", id="id"), grader=spec.grader)
    assert custom.grader == spec.grader and not custom.dropped
    for seed in SEEDS:
        for split in ("train", "val", "test"):
            if split != "test" and not custom.train_pool:
                with pytest.raises(ValueError, match="test-only"):
                    load_split(custom, split, seed=seed)
                continue
            assert _rows(load_split(custom, split, seed=seed)) == _rows(load_split(name, split, seed=seed)), split
    assert custom.sizes() == load_task(name).sizes()


@pytest.mark.parametrize("name", list(BUILTIN_TASKS))
def test_exported_builtin_task_gives_the_same_eval_numbers(tmp_path, name, capsys):
    from jobs.cli import main

    spec = BUILTIN_TASKS[name]
    folder = export(name, tmp_path / name)
    common = ["eval", "--engine", "echo", "--method", "cot", "--limit", "25", "--no-progress"]
    split = ["--split", "val"] if load_task(name).train_pool else []
    assert main([*common, *split, "--dataset", name, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, *split, "--dataset", str(folder), "--id-field", "id", "--solution-field", "solution",
                 "--grader", spec.grader, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    keys = ("n", "correct", "accuracy", "ci95_low", "ci95_high", "target_prompt_tokens", "target_completion_tokens",
            "grader")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert a["n"] == 25
