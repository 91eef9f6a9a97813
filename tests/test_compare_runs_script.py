"""scripts/compare_runs.py --across-versions: renamed fields, moved paths and cache keys are mapped; real
differences in shared values are still reported."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from trprompt import artifacts

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("compare_runs_script", ROOT / "scripts" / "compare_runs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def write_old(root: Path, critique: str = "Name the quantities.") -> None:
    """A run as an older version wrote it: absolute paths, ``best_reward``, the synthetic ``reward`` column."""
    (root / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text("seed: 0\n")
    artifacts.write_json(root / "best.json", {"iteration": 1, "adapter_path": str(root / "iter_1" / "adapter"),
                                              "optimal_reward": "t*"})
    artifacts.write_json(root / "iter_1" / "reward_search.json", {"best_reward": "t*", "trace": []})
    artifacts.write_parquet(root / "iter_1" / "synthetic_set.parquet",
                            [{"question": "q", "instruction": "p", "reward": critique, "reward_completion_tokens": 3}])
    artifacts.write_json(root / "methods" / "plain" / "0123456789ab" / "fit.json", {"key": "0123456789ab", "n": 1})
    (root / "templates.json").write_text(json.dumps({"version": "2", "prompt_model_system": "S"}))


def write_new(root: Path, critique: str = "Name the quantities.") -> None:
    """The same run as this version writes it, with fields added."""
    (root / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text("seed: 0\ntask: null\n")
    artifacts.write_json(root / "best.json", {"iteration": 1, "adapter_path": "iter_1/adapter",
                                              "optimal_reward": "t*", "format": 2})
    artifacts.write_json(root / "iter_1" / "reward_search.json", {"optimal_reward": "t*", "trace": [],
                                                                  "stage": {"fingerprint": "f"}})
    artifacts.write_parquet(root / "iter_1" / "synthetic_set.parquet",
                            [{"question": "q", "instruction": "p", "critique": critique,
                              "critique_completion_tokens": 3, "grader": "numeric"}])
    artifacts.write_json(root / "methods" / "plain" / "fedcba9876543210" / "fit.json",
                         {"key": "fedcba9876543210", "n": 1})
    (root / "templates.json").write_text(json.dumps({"version": "3", "prompt_model_system": "S", "fingerprint": "x"}))
    artifacts.write_json(root / "data.json", {"rows": 1})


def test_same_run_across_versions_is_same_and_lists_what_was_added(tmp_path: Path) -> None:
    mod = load_script()
    write_old(tmp_path / "old")
    write_new(tmp_path / "new")
    cmp = mod.compare_across_versions(tmp_path / "old", tmp_path / "new")
    verdicts = {r.path.split(" ~ ")[0]: r for r in cmp.results}
    assert cmp.same, cmp.lines()
    assert verdicts["best.json"].verdict == "same*" and verdicts["best.json"].only_b == [".format"]
    assert verdicts["iter_1/synthetic_set.parquet"].only_b == ["[*].grader"]  # reward -> critique mapped
    assert verdicts["iter_1/reward_search.json"].only_b == [".stage"]  # best_reward -> optimal_reward mapped
    assert "methods/plain/0123456789ab/fit.json" in verdicts  # 12- and 16-digit cache keys matched
    assert "expected change .version '2' -> '3'" in verdicts["templates.json"].detail
    assert cmp.only_in_b == ["data.json"] and cmp.only_in_a == []
    assert mod.main(["--across-versions", str(tmp_path / "old"), str(tmp_path / "new")]) == 0


def test_a_changed_generated_text_is_reported(tmp_path: Path) -> None:
    mod = load_script()
    write_old(tmp_path / "old")
    write_new(tmp_path / "new", critique="Something else.")
    cmp = mod.compare_across_versions(tmp_path / "old", tmp_path / "new")
    bad = [r for r in cmp.results if r.verdict == "DIFFERS"]
    assert not cmp.same and [r.path for r in bad] == ["iter_1/synthetic_set.parquet"]
    assert "critique" in bad[0].detail and "1 of 1 rows differ" in bad[0].detail
    assert mod.main(["--across-versions", str(tmp_path / "old"), str(tmp_path / "new")]) == 1
