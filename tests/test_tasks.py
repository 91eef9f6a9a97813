"""Tasks from users' files: formats, field mapping, splits, and every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trprompt.config import ConfigError, config_from_dict
from trprompt.data import DatasetError, Fields, grade_problem, load_split, load_task, task_from_config
from trprompt.data.tasks import DEFAULT_DESCRIPTION


def _rows(n: int = 30) -> list[dict]:
    return [{"question": f"How many centimetres are in {i} metres?", "answer": str(100 * i)} for i in range(1, n + 1)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_with_default_fields_loads_and_splits_by_hash(tmp_path):
    f = _jsonl(tmp_path / "units.jsonl", _rows(30))
    task = load_task(str(f))
    assert task.name == "units" and task.grader == "numeric" and task.description == DEFAULT_DESCRIPTION
    assert task.sizes() == {"train": 22, "val": 2, "test": 6}  # 20 % of 30 held out, 10 % of the rest for val
    test = load_split(task, "test")
    assert [p.id for p in test] == sorted(p.id for p in test)  # file order
    assert all(p.id.startswith("units-test-") for p in test)
    train, val = load_split(task, "train", seed=0), load_split(task, "val", seed=0)
    assert not {p.id for p in train} & {p.id for p in val} and not {p.id for p in train + val} & {p.id for p in test}
    assert test[0].metadata["source"].startswith(str(f) + ":")
    # stable: the same file under another name and another load gives the same split (hash of the row key)
    g = _jsonl(tmp_path / "copy.jsonl", _rows(30))
    assert [p.question for p in load_split(str(g), "test")] == [p.question for p in test]
    assert load_task(str(f), test_size=5).sizes()["test"] == 5


def test_csv_parquet_and_jsonl_give_the_same_problems(tmp_path):
    rows = [{"q": r["question"], "a": r["answer"], "why": "x100", "key": f"k{i}"} for i, r in enumerate(_rows(12))]
    _jsonl(tmp_path / "t.jsonl", rows)
    with (tmp_path / "t.csv").open("w", encoding="utf-8", newline="") as fh:
        import csv

        w = csv.DictWriter(fh, fieldnames=["q", "a", "why", "key"])
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    fields = Fields(question="q", answer="a", solution="why", id="key")
    got = {}
    for ext in ("jsonl", "csv", "parquet"):
        task = load_task(str(tmp_path / f"t.{ext}"), fields=fields, test_size=3)
        got[ext] = [(p.id, p.question, p.answer, p.solution) for p in task.train_pool + task.test]
    assert got["jsonl"] == got["csv"] == got["parquet"]
    assert got["jsonl"][0][0] == "k0" and got["jsonl"][0][3] == "x100"


def test_folder_with_train_and_test_files(tmp_path):
    d = tmp_path / "mytask"
    d.mkdir()
    _jsonl(d / "train.jsonl", _rows(20))
    _jsonl(d / "test.jsonl", [{"question": "How many grams are in 3 kilograms?", "answer": "3000"}])
    task = load_task(str(d))
    assert task.name == "mytask" and len(task.test) == 1 and len(task.train_pool) == 20
    assert task.test[0].id == "mytask-test-00000" and task.train_pool[4].id == "mytask-train-00004"
    only_test = tmp_path / "evalonly"
    only_test.mkdir()
    _jsonl(only_test / "test.jsonl", _rows(3))
    with pytest.raises(ValueError, match="test-only"):
        load_split(str(only_test), "train")


def test_choices_are_appended_to_the_question(tmp_path):
    f = _jsonl(tmp_path / "mc.jsonl", [{"question": f"Q{i}?", "answer": "B", "options": ["x", "y", "z"]}
                                      for i in range(6)])
    task = load_task(str(f), fields=Fields(choices="options"), grader="choice", test_size=2)
    p = task.test[0]
    assert p.choices == ("x", "y", "z") and p.question.endswith("\n\nA. x\nB. y\nC. z")
    assert grade_problem(p, "The answer is B.").correct and not grade_problem(p, "The answer is C.").correct
    assert grade_problem(p, "I pick y").correct  # the option text counts too


# ------------------------------------------------------------------------------------------ bad input
def _bad(path: Path, match: str, **kw) -> DatasetError:
    with pytest.raises(DatasetError) as e:
        load_task(str(path), **kw)
    assert match in str(e.value), str(e.value)
    assert "skip_bad_rows" in str(e.value)
    return e.value


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"answer": "3"}, "units.jsonl:3: field 'question': missing field"),
        ({"question": "Q?"}, "units.jsonl:3: field 'answer': missing field"),
        ({"question": "   ", "answer": "3"}, "units.jsonl:3: field 'question': empty question"),
        ({"question": "Q?", "answer": ""}, "units.jsonl:3: field 'answer': empty answer"),
        ({"question": "Q?", "answer": "three"}, "units.jsonl:3: field 'answer': grader 'numeric' cannot use it"),
        ({"question": "Q?", "answer": ["3"]}, "units.jsonl:3: field 'answer': must be text or a number"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    rows = _rows(10)
    rows.insert(2, row)
    err = _bad(_jsonl(tmp_path / "units.jsonl", rows), message)
    assert len(err.issues) == 1
    assert ("choose the grader that fits" in str(err)) == ("cannot use it" in message)
    task = load_task(str(tmp_path / "units.jsonl"), skip_bad_rows=True)
    assert len(task.train_pool) + len(task.test) == 10 and len(task.dropped) == 1
    assert "units.jsonl:3" in str(task.dropped[0])


def test_not_json_and_not_utf8(tmp_path):
    f = tmp_path / "units.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in _rows(6)).encode()
    f.write_bytes(good + b'{"question": "caf\xe9?", "answer": "1"}\n' + b"{not json}\n")
    err = _bad(f, "units.jsonl:7: field 'question': not valid UTF-8")
    assert "units.jsonl:8: not valid JSON" in str(err)
    task = load_task(str(f), skip_bad_rows=True)
    assert task.dropped_counts() == {"not valid UTF-8": 1, "not valid JSON": 1}
    c = tmp_path / "units.csv"
    c.write_bytes(b"question,answer\n" + b"".join(f"{r['question']},{r['answer']}\n".encode() for r in _rows(5))
                  + b"caf\xe9?,2\n")
    _bad(c, "units.csv:7: field 'question': not valid UTF-8")


def test_duplicate_ids_and_questions_in_train_and_test(tmp_path):
    d = tmp_path / "dup"
    d.mkdir()
    train = [{**r, "id": f"r{i}"} for i, r in enumerate(_rows(8))]
    train[5]["id"] = "r1"
    _jsonl(d / "train.jsonl", train)
    _jsonl(d / "test.jsonl", [{"question": _rows(8)[3]["question"] + "  ", "answer": "400", "id": "t0"}])
    err = _bad(d, "train.jsonl:6: field 'id': duplicate id 'r1' (first at", fields=Fields(id="id"))
    assert "train.jsonl:4: field 'question': question also in the test split (at " in str(err)
    task = load_task(str(d), fields=Fields(id="id"), skip_bad_rows=True)
    assert len(task.train_pool) == 6 and len(task.dropped) == 2
    report = task.data_report()
    assert report["dropped"] == 2 and report["dropped_by_reason"] == {"duplicate id": 1,
                                                                     "question also in the test split": 1}


def test_malformed_choices_and_missing_file(tmp_path):
    f = _jsonl(tmp_path / "mc.jsonl", [{"question": "Q?", "answer": "1", "options": ["only one"]}] +
               [{"question": f"Q{i}?", "answer": "1", "options": "x|y"} for i in range(5)])
    _bad(f, "mc.jsonl:1: field 'options': choices must be a list", fields=Fields(choices="options"))
    with pytest.raises(ValueError, match="neither a built-in task"):
        load_task(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown file type"):
        load_task(str(tmp_path / "x.txt"))


# ------------------------------------------------------------------------------------------ config
def test_config_dataset_shorthand_fields_and_task(tmp_path):
    f = _jsonl(tmp_path / "units.jsonl", [{"q": r["question"], "a": r["answer"]} for r in _rows(10)])
    cfg = config_from_dict({"dataset": str(f)})
    assert cfg.dataset.name == str(f)
    cfg = config_from_dict({"dataset": {"name": str(f), "fields": {"question": "q", "answer": "a"},
                                        "test_size": 2},
                            "task": {"description": "Convert units. A correct answer is one number."}})
    task = task_from_config(cfg)
    assert len(task.test) == 2 and task.description.startswith("Convert units")
    with pytest.raises(ConfigError, match="dataset.name must be a built-in task"):
        config_from_dict({"dataset": "gsm8kk"})
    missing = config_from_dict({"dataset": str(tmp_path / "missing.jsonl")})  # a run's config loads anywhere...
    with pytest.raises(ValueError, match="neither a built-in task .* nor an existing file"):
        task_from_config(missing)  # ...the data is checked when it is read (jobs: before any model loads)
    with pytest.raises(ConfigError, match="task.grader"):
        config_from_dict({"task": {"grader": "nonsense"}})
    with pytest.raises(ConfigError, match="dataset.test_size"):
        config_from_dict({"dataset": {"name": str(f), "test_size": 2.5}})
    with pytest.raises(ValueError, match="fields applies to files"):
        load_task("gsm8k", fields=Fields(question="q"))


def test_cli_eval_on_a_file_with_the_echo_engine(tmp_path, capsys):
    from jobs.cli import main

    f = _jsonl(tmp_path / "units.jsonl", _rows(20))
    out = tmp_path / "eval"
    rc = main(["eval", "--dataset", str(f), "--grader", "numeric", "--engine", "echo", "--method", "plain",
               "--limit", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "plain on units:" in printed and "(0/3" in printed  # echo repeats the question: its last number is i
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grader"] == "numeric" and summary["n"] == 3
    bad = _jsonl(tmp_path / "bad.jsonl", [*_rows(5), {"question": "Q?"}])
    with pytest.raises(SystemExit, match="bad.jsonl:6: field 'answer': missing field"):
        main(["eval", "--dataset", str(bad), "--engine", "echo", "--no-progress", "--out", str(out)])


def test_cli_splits_checks_a_task(tmp_path, capsys):
    from jobs.cli import main

    f = _jsonl(tmp_path / "units.jsonl", [*_rows(10), {"question": "Q?", "answer": ""}])
    with pytest.raises(SystemExit, match="units.jsonl:11: field 'answer': empty answer"):
        main(["splits", "--dataset", str(f)])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {{name: {f}, skip_bad_rows: true, test_size: 2}}\n")
    assert main(["splits", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "units: {'train': 7, 'val': 1, 'test': 2}, grader numeric" in out and "dropped 1 bad rows" in out


def test_cache_fingerprints_follow_the_data_file(tmp_path):
    """A comparison/sweep cache must not be reused when a user's file, fields, grader or description changes."""
    from trprompt.experiments.fingerprints import data_inputs

    assert data_inputs(config_from_dict({})) == {}  # built-ins as shipped: keys as before
    f = _jsonl(tmp_path / "units.jsonl", _rows(10))
    cfg = config_from_dict({"dataset": str(f)})
    first = data_inputs(cfg)
    assert first["data"] and first["dataset.fields"]["question"] == "question"
    assert data_inputs(config_from_dict({"dataset": str(f), "task": {"description": "Other."}})) != first
    import os
    import time

    _jsonl(f, _rows(11))
    os.utime(f, (time.time() + 5, time.time() + 5))
    assert data_inputs(cfg)["data"] != first["data"]


def test_config_knows_every_builtin_grader():
    """config.py (layer 0) spells the grader names itself; they must match the grading registry's."""
    from trprompt.config import GRADER_NAMES
    from trprompt.grading import GRADER_NAMES as REGISTRY_NAMES

    assert set(GRADER_NAMES) == set(REGISTRY_NAMES) - {"python"}
    with pytest.raises(ConfigError, match="package.module:function"):
        config_from_dict({"task": {"grader": "python: nomodule"}})


def test_user_metric_from_a_module_grades_a_file_task(tmp_path, monkeypatch):
    """``grader: 'python: module:function'`` on a file task: loaded once, floats averaged like accuracy."""
    (tmp_path / "unit_metric.py").write_text(
        "def score(prediction_text, example):\n"
        "    # full credit for the number, half credit when only the unit word is right\n"
        "    if example.answer in prediction_text:\n"
        "        return 1.0\n"
        "    return 0.5 if 'centimetres' in prediction_text else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = _jsonl(tmp_path / "units.jsonl", _rows(10))
    task = load_task(str(f), grader="python: unit_metric:score", test_size=3)
    p = task.test[0]
    assert p.grader == "python: unit_metric:score"
    assert grade_problem(p, f"It is {p.answer} centimetres.").score == 1.0
    assert grade_problem(p, "Some centimetres.").score == 0.5
    assert grade_problem(p, "No idea.").score == 0.0
    with pytest.raises(ValueError):
        load_task(str(f), grader="python: no_such_module_xyz:score")


def test_small_files_report_their_rows_before_the_split(tmp_path):
    f = _jsonl(tmp_path / "tiny.jsonl", [_rows(1)[0], {"question": "Q?"}])
    _bad(f, "tiny.jsonl:2: field 'answer': missing field")  # not a test-size complaint
    with pytest.raises(ValueError, match="1 usable row; holding out a test split needs at least 2"):
        load_task(str(f), skip_bad_rows=True)
    with pytest.raises(ValueError, match="test_size 5 holds out 5 of 3 usable rows"):
        load_task(str(_jsonl(tmp_path / "three.jsonl", _rows(3))), test_size=5)
