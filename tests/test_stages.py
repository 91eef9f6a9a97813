"""Stage fingerprints: change one kind of setting between two runs of one run directory and check
exactly which stages recompute, and that no stale number reaches report.md, best.json or the test summaries.

Runs use the scripted echo engine and a fake SFT (see tests/test_loop.py), so each takes seconds.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from tests.test_loop import FakeSFT, fake_gold, make_cfg, scripted
from trprompt import artifacts
from trprompt.engines.echo import EchoEngine
from trprompt.loop import TRPromptTrainer

ROLES = ("prompt_model", "target_model", "reward_model", "optimizer_model")
ITER = ("synthetic_set", "sft", "val_sft", "reward_search", "val_reward_search")
ALL_K2 = ["iter0.val_initial", *[f"iter{k}.{s}" for k in (1, 2) for s in ITER], "test.plain", "test.cot",
          "test.trprompt"]
RECOMPUTED: dict[str, list[str]] = {}


def trainer(cfg) -> TRPromptTrainer:
    engine = EchoEngine(scripted)
    return TRPromptTrainer(cfg, {r: engine for r in ROLES}, FakeSFT(), base_model_path="unused", progress=False)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One finished K=2 run, copied by each test."""
    mp = pytest.MonkeyPatch()
    fake_gold(mp)
    tmp = tmp_path_factory.mktemp("base")
    cfg = make_cfg(tmp)
    summary = trainer(cfg).run()
    assert summary.recomputed == ALL_K2
    mp.undo()
    return cfg


def rerun(base_cfg, tmp_path, change) -> tuple[object, list[str]]:
    """Copy the base run, apply ``change(cfg)``, run again; return (config, recomputed stages)."""
    cfg = copy.deepcopy(base_cfg)
    cfg.run_dir = str(tmp_path / "run")
    shutil.copytree(base_cfg.run_dir, cfg.run_dir)
    change(cfg)
    cfg.validate()
    plan = TRPromptTrainer(cfg, None, None, "unused", progress=False).stage_plan()
    summary = trainer(cfg).run()
    planned = [d.name for d in plan if not d.reuse]
    assert planned == summary.recomputed  # --dry-run tells the truth
    return cfg, summary.recomputed


def check_nothing_stale(cfg) -> None:
    """Every artifact matches the current settings: a fresh plan reuses every stage, and the
    numbers in best.json, the test summaries and report.md are those of the current artifacts."""
    plan = TRPromptTrainer(cfg, None, None, "unused", progress=False).stage_plan()
    assert all(d.reuse for d in plan), [d.line() for d in plan if not d.reuse]
    rd = Path(cfg.run_dir)
    best = json.loads((rd / "best.json").read_text())
    for h in best["history"]:
        val = artifacts.read_json(rd / f"iter_{h['iteration']}" / f"val_{h['phase']}.json")
        assert val["accuracy"] == h["accuracy"] and val["n"] == min(cfg.dataset.val_limit, 10**9)
    assert len(best["history"]) == 1 + 2 * cfg.loop.iterations
    report = (rd / "report.md").read_text()
    for name in (*cfg.eval.baselines, "trprompt"):
        s = artifacts.read_json(rd / "test" / f"{name}.json")
        assert s["n"] == cfg.dataset.test_limit and s["dataset"] == cfg.dataset.name
        rows = artifacts.read_parquet(rd / "test" / f"{name}.parquet")
        assert len(rows) == s["n"] and sum(r["correct"] for r in rows) == s["correct"]
        assert f"| {name} | {s['accuracy'] * 100:.2f}% |" in report and f"| {s['n']} |" in report
    assert f"**{cfg.dataset.name}**" in report
    tp = artifacts.read_json(rd / "test" / "trprompt.json")["stage"]["inputs"]
    assert (tp["best.iteration"], tp["best.phase"]) == (best["iteration"], best["phase"])


@pytest.fixture(autouse=True)
def _gold(monkeypatch):
    fake_gold(monkeypatch)


def test_unchanged_settings_reuse_everything(base_run, tmp_path):
    cfg, redo = rerun(base_run, tmp_path, lambda c: None)
    RECOMPUTED["unchanged"] = redo
    assert redo == []
    check_nothing_stale(cfg)


def test_test_limit_recomputes_only_the_test_stages(base_run, tmp_path):
    def change(c):
        c.dataset.test_limit = 3

    cfg, redo = rerun(base_run, tmp_path, change)
    RECOMPUTED["dataset.test_limit 5->3"] = redo
    assert redo == ["test.plain", "test.cot", "test.trprompt"]
    check_nothing_stale(cfg)


def test_other_dataset_recomputes_everything(base_run, tmp_path):
    def change(c):
        c.dataset.name = "gsm_hard"

    cfg, redo = rerun(base_run, tmp_path, change)
    RECOMPUTED["dataset.name gsm8k->gsm_hard"] = redo
    assert redo == ALL_K2
    check_nothing_stale(cfg)


def test_more_iterations_with_a_new_best(tmp_path):
    cfg = make_cfg(tmp_path / "k1", loop={"iterations": 1})
    first = trainer(cfg).run()
    assert first.best_iteration == 1
    cfg.loop.iterations = 2
    summary = trainer(cfg).run()
    RECOMPUTED["loop.iterations 1->2 (new best)"] = summary.recomputed
    assert summary.best_iteration == 2  # ties go to the later iteration: a new best policy
    assert summary.recomputed == [f"iter2.{s}" for s in ITER] + ["test.trprompt"]
    check_nothing_stale(cfg)


def test_templates_recompute_everything(base_run, tmp_path):
    tf = tmp_path / "templates.yaml"
    tf.write_text("cot_instruction: \"Think it through step by step.\"\n")

    def change(c):
        c.templates_file = str(tf)

    cfg, redo = rerun(base_run, tmp_path, change)
    RECOMPUTED["templates_file (cot_instruction)"] = redo
    assert redo == ALL_K2
    check_nothing_stale(cfg)


def test_seed_recomputes_all_but_the_baselines(base_run, tmp_path):
    def change(c):
        c.seed = 1

    cfg, redo = rerun(base_run, tmp_path, change)
    RECOMPUTED["seed 0->1"] = redo
    # The test split ignores the seed and the greedy target (temperature 0) ignores its request seeds.
    assert redo == [s for s in ALL_K2 if s not in ("test.plain", "test.cot")]
    check_nothing_stale(cfg)


def test_seed_recomputes_the_baselines_too_when_the_target_samples(base_run, tmp_path):
    """At target_temperature > 0 every target request is seeded from the run seed
    (trprompt.evaluation.target_seed), so the baselines' test answers depend on the seed too."""
    def sampled(c):
        c.generation.target_temperature = 0.7

    cfg, redo = rerun(base_run, tmp_path / "t", sampled)
    assert redo == ALL_K2

    def reseed(c):
        c.seed = 1

    cfg, redo = rerun(cfg, tmp_path / "s", reseed)
    RECOMPUTED["seed 0->1 (target_temperature 0.7)"] = redo
    assert redo == ALL_K2
    check_nothing_stale(cfg)


def test_reward_model_recomputes_from_the_first_synthetic_set(base_run, tmp_path):
    def change(c):
        c.models.reward_model.model = "another-critic"

    cfg, redo = rerun(base_run, tmp_path, change)
    RECOMPUTED["models.reward_model.model"] = redo
    assert redo == [s for s in ALL_K2 if s not in ("iter0.val_initial", "test.plain", "test.cot")]
    check_nothing_stale(cfg)


def test_target_model_recomputes_everything(base_run, tmp_path):
    def change(c):
        c.models.target_model.model = "another-target"

    cfg, redo = rerun(base_run, tmp_path, change)
    RECOMPUTED["models.target_model.model"] = redo
    assert redo == ALL_K2
    check_nothing_stale(cfg)


def test_dtype_auto_resolving_differently_recomputes(base_run, tmp_path, monkeypatch):
    """``dtype: auto`` is fingerprinted as what it resolves to: float32 and bfloat16 runs never mix."""
    monkeypatch.setenv("TRPROMPT_CPU_BF16", "0")

    def to_hf(c):
        c.models.target_model.engine = "hf"  # the engines stay scripted; the label decides what auto means

    cfg, _ = rerun(base_run, tmp_path / "fp32", to_hf)
    assert cfg.models.target_model.resolved_dtype == "float32"
    same, redo = rerun(cfg, tmp_path / "again", lambda c: None)
    assert redo == []
    monkeypatch.setenv("TRPROMPT_CPU_BF16", "1")
    cfg2, redo = rerun(same, tmp_path / "bf16", lambda c: setattr(c.models.target_model, "resolved_dtype", None))
    RECOMPUTED["TRPROMPT_CPU_BF16 0 -> 1 (dtype auto)"] = redo
    assert cfg2.models.target_model.resolved_dtype == "bfloat16"
    assert redo == ALL_K2
    check_nothing_stale(cfg2)


def test_grader_version_recomputes_everything(base_run, tmp_path, monkeypatch):
    import trprompt.grading as grading

    monkeypatch.setattr(grading, "GRADER_VERSION", "test-grader-99", raising=False)
    cfg, redo = rerun(base_run, tmp_path, lambda c: None)
    RECOMPUTED["grader version"] = redo
    assert redo == ALL_K2
    check_nothing_stale(cfg)


def test_sft_setting_recomputes_from_the_first_sft(base_run, tmp_path):
    def change(c):
        c.sft.learning_rate = 1e-4

    cfg, redo = rerun(base_run, tmp_path, change)
    RECOMPUTED["sft.learning_rate"] = redo
    assert redo == [s for s in ALL_K2 if s not in ("iter0.val_initial", "iter1.synthetic_set", "test.plain",
                                                   "test.cot")]
    check_nothing_stale(cfg)


def test_dry_run_names_the_changed_fields(base_run, tmp_path, capsys):
    import yaml

    from jobs.train import main as train_main

    cfg = copy.deepcopy(base_run)
    cfg.run_dir = str(tmp_path / "run")
    shutil.copytree(base_run.run_dir, cfg.run_dir)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    assert train_main(["--config", str(p), "--set", "dataset.test_limit=4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "reuse     iter1.sft: fingerprint unchanged" in out
    assert "recompute test.plain: changed: dataset.test_limit" in out
    assert "11 stages reused, 3 recomputed" in out
    assert not (Path(cfg.run_dir) / "test" / "plain.json").read_text().count('"n": 4')  # nothing was run


def test_zz_print_recomputed_lists():
    """Prints the recomputed stages of each case (for the closing note); run with -s to see them."""
    for case, stages in RECOMPUTED.items():
        print(f"{case}: {stages}")
