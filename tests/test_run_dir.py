"""The run directory: typed records, relocatable runs, old runs still load, one reader for everyone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.cli import main as cli_main
from trprompt.config import config_from_dict
from trprompt.engines.echo import EchoEngine
from trprompt.loop import TRPromptTrainer
from trprompt.run_dir import BestRecord, HistoryEntry, RunDirError, RunPaths, load_run, resolve_stored_path

ROLES = ("prompt_model", "target_model", "reward_model", "optimizer_model")


class AdapterSFT:
    """Writes a real LoRA adapter of the tiny Llama (random weights) instead of training one."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    def __call__(self, examples, base_model, out_dir, cfg, templates, init_adapter=None, seed=0):
        from tests.fixtures_run import make_lora_adapter

        make_lora_adapter(self.model_dir, out_dir, seed=seed)
        return {"examples": len(examples), "steps": 1}


def finished_run(run_dir: str, model_dir: Path) -> TRPromptTrainer:
    """A small finished run (echo engines, a real adapter), run_dir given relative to the current folder."""
    cfg = config_from_dict({
        "run_dir": run_dir,
        "dataset": {"name": "gsm8k", "train_limit": 12, "val_limit": 3, "test_limit": 2},
        "models": {r: {"model": str(model_dir), "engine": "echo"} for r in ROLES[:3]},
        "loop": {"iterations": 1, "synthetic_size": 4},
        "reward_search": {"steps": 0},
        "eval": {"run_test": False},
        "generation": {"batch_size": 4, "prompt_max_tokens": 8, "target_max_tokens": 8},
    })
    echo = EchoEngine()
    trainer = TRPromptTrainer(cfg, {r: echo for r in ROLES}, AdapterSFT(model_dir), str(model_dir), progress=False)
    trainer.run()
    return trainer


def test_records_round_trip_and_old_names(tmp_path):
    paths = RunPaths(tmp_path)
    h = [HistoryEntry(0, "initial", 0.25, None, None, "t0"),
         HistoryEntry(1, "sft", 0.5, "iter1", "iter_1/adapter", "t0")]
    rec = BestRecord.from_history(h)
    assert rec.best.iteration == 1
    rec.write(paths)
    assert BestRecord.read(paths).to_json() == rec.to_json()
    # an old best.json: t* under another name, no history, no format
    paths.best.write_text(json.dumps({"iteration": 2, "phase": "reward_search", "accuracy": 0.7, "adapter": "iter2",
                                      "adapter_path": "runs/x/iter_2/adapter", "best_reward": "old t*"}))
    old = BestRecord.read(paths)
    assert old.best.optimal_reward == "old t*" and old.format == 1 and len(old.history) == 1
    paths.best.write_text("[1, 2]")
    with pytest.raises(RunDirError, match="best.json"):
        BestRecord.read(paths)


def test_resolve_stored_path_tries_run_dir_then_cwd_then_layout(tmp_path, monkeypatch):
    root = tmp_path / "moved" / "demo"
    (root / "iter_1" / "adapter").mkdir(parents=True)
    (root / "iter_1" / "adapter" / "adapter_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    want = (root / "iter_1" / "adapter").resolve()
    assert resolve_stored_path(root, "iter_1/adapter", marker="adapter_config.json") == want
    # old style: relative to the folder the job ran in ("runs/demo/..."), the run since moved
    assert resolve_stored_path(root, "runs/demo/iter_1/adapter", marker="adapter_config.json") == want
    assert resolve_stored_path(root, "nowhere/adapter", root / "iter_1" / "adapter",
                               marker="adapter_config.json") == want
    assert resolve_stored_path(root, "nowhere/adapter", marker="adapter_config.json") is None


def test_a_copied_run_evaluates_and_serves_from_another_folder(tmp_path, monkeypatch, tiny_model_dir):
    from cluster.serve.run_spec import RunSpec

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    trainer = finished_run("runs/demo", tiny_model_dir)
    best = json.loads((work / "runs" / "demo" / "best.json").read_text())
    assert best["adapter"] == "iter1"
    assert best["adapter_path"] == "iter_1/adapter"  # relative to the run directory itself
    assert all(not Path(h["adapter_path"]).is_absolute() for h in best["history"] if h["adapter_path"])
    assert trainer.run_dir == Path("runs/demo")

    moved = tmp_path / "elsewhere" / "fetched-run"
    shutil.copytree(work / "runs" / "demo", moved)
    shutil.rmtree(work / "runs")
    other = tmp_path / "other-cwd"
    other.mkdir()
    monkeypatch.chdir(other)

    run = load_run(moved)
    assert run.adapter_path == (moved / "iter_1" / "adapter").resolve() and run.adapter_id == "iter1"
    assert run.base_model == str(tiny_model_dir) and run.config.run_dir == str(moved.resolve())
    spec = RunSpec.from_run_dir(moved)  # what serving loads
    assert spec.adapter_path == str(run.adapter_path) and spec.optimal_reward == run.optimal_reward

    out = tmp_path / "eval-out"
    rc = cli_main(["eval", "--method", "trprompt", "--run-dir", str(moved), "--model", str(tiny_model_dir),
                   "--limit", "2", "--max-tokens", "4", "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["method"] == "trprompt"

    # An old-format run (adapter path relative to the job's folder, t* as best_reward) still loads when moved.
    data = json.loads((moved / "best.json").read_text())
    data["adapter_path"] = "runs/fetched-run/iter_1/adapter"
    data["best_reward"] = data.pop("optimal_reward")
    for h in data["history"]:
        h.pop("fingerprint", None)
    (moved / "best.json").write_text(json.dumps(data))
    old = load_run(moved)
    assert old.adapter_path == run.adapter_path and old.optimal_reward == run.optimal_reward

    shutil.rmtree(moved / "iter_1" / "adapter")
    with pytest.raises(RunDirError, match="adapter_config.json"):
        load_run(moved)


def test_compare_runs_ignores_wall_times_and_finds_real_differences(tmp_path):
    from trprompt import artifacts
    from trprompt.run_dir import compare_runs

    for name, acc, secs in (("a", 0.5, 1.0), ("b", 0.5, 9.0), ("c", 0.75, 1.0)):
        root = tmp_path / name
        artifacts.write_json(root / "iter_1" / "sft_metrics.json", {"steps": 3, "train_s": secs, "pid": secs})
        artifacts.write_parquet(root / "iter_1" / "val_sft.parquet", [{"id": "q1", "correct": acc > 0.6}])
        artifacts.write_json(root / "iter_1" / "val_sft.json", {"accuracy": acc, "wall_s": secs})
        (root / "iter_1" / "adapter").mkdir()
        (root / "iter_1" / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * int(acc * 8))
        (root / "report.md").write_text(f"took {secs} s")
    same = compare_runs(tmp_path / "a", tmp_path / "b")
    assert same.same and len(same.identical) == 4
    diff = compare_runs(tmp_path / "a", tmp_path / "c")
    assert set(diff.different) == {"iter_1/val_sft.json", "iter_1/val_sft.parquet",
                                   "iter_1/adapter/adapter_model.safetensors"}
    assert "accuracy" in diff.different["iter_1/val_sft.json"] and "[0].correct" in diff.different[
        "iter_1/val_sft.parquet"]
