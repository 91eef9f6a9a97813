"""Algorithm 1 end to end on deterministic fake engines (no Ray): stages, artifacts, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trprompt import artifacts
from trprompt.config import config_from_dict
from trprompt.engines.base import ChatRequest
from trprompt.engines.echo import EchoEngine
from trprompt.engines.wrappers import BudgetExceededError
from trprompt.loop import TRPromptTrainer
from trprompt.roles import ROLES
from trprompt.templates import Templates

T = Templates()


def scripted(request: ChatRequest) -> str:
    """A fake model playing every role, recognised from the chat it gets."""
    msgs = list(request.messages)
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
    user = msgs[-1]["content"]
    if system == T.prompt_model_system:
        # The trained adapter writes a helpful instruction; the base model a useless one.
        return "Use the magic word." if request.adapter else "Just guess."
    if system == T.reward_model_system:
        return "The instruction was vague; it should point to the key quantity."
    if "<IMPROVED_VARIABLE>" in user or "IMPROVED_VARIABLE" in system:
        return "<IMPROVED_VARIABLE>An ideal instruction names the key quantity and uses the magic word." \
               "</IMPROVED_VARIABLE>"
    if len(msgs) == 1 and "magic word" in user:
        return "The answer is 42."  # the fake target is right only with the helpful instruction
    if len(msgs) == 1:
        return "I think it is 7."
    return "The feedback should mention the magic word."


class FakeSFT:
    """Writes a stand-in adapter folder; can crash on a given iteration."""

    def __init__(self, crash_on: int | None = None) -> None:
        self.crash_on = crash_on
        self.calls: list[dict[str, Any]] = []

    def __call__(self, examples, base_model, out_dir, cfg, templates, init_adapter=None, seed=0):
        k = int(Path(out_dir).parent.name.split("_")[1])
        if k == self.crash_on:
            raise KeyboardInterrupt(f"simulated crash in iteration {k}")
        self.calls.append({"k": k, "n": len(examples), "init": init_adapter})
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "adapter_config.json").write_text("{}")
        return {"examples": len(examples), "final_loss": 1.0}


def make_cfg(tmp_path: Path, **over: Any):
    data = {
        "run_dir": str(tmp_path / "run"),
        "dataset": {"name": "gsm8k", "train_limit": 40, "val_limit": 6, "test_limit": 5},
        "models": {r: {"model": "fake", "engine": "echo"} for r in ("prompt_model", "target_model", "reward_model")},
        "loop": {"iterations": 2, "synthetic_size": 8},
        "reward_search": {"steps": 1, "candidates_per_step": 2, "val_questions": 4},
        "generation": {"batch_size": 4},
    }
    for k, v in over.items():
        data.setdefault(k, {}).update(v) if isinstance(v, dict) else data.__setitem__(k, v)
    return config_from_dict(data)


def fake_gold(monkeypatch):
    """Make every problem's gold answer 42 so the scripted target can be right."""
    import trprompt.loop as loop_mod
    from trprompt.data import Problem

    real = loop_mod.load_split

    def load(*a, **kw):
        return [Problem(p.id, p.question, "42", p.solution, p.dataset, p.metadata) for p in real(*a, **kw)]

    monkeypatch.setattr(loop_mod, "load_split", load)


def run(cfg, engine, sft):
    engines = {r: engine for r in ROLES}
    return TRPromptTrainer(cfg, engines, sft, base_model_path="unused", progress=False).run()


def test_full_loop_writes_every_artifact(tmp_path, monkeypatch):
    fake_gold(monkeypatch)
    cfg = make_cfg(tmp_path)
    engine, sft = EchoEngine(scripted), FakeSFT()
    summary = run(cfg, engine, sft)
    rd = Path(cfg.run_dir)
    for k in (1, 2):
        rows = artifacts.read_parquet(rd / f"iter_{k}" / "synthetic_set.parquet")
        assert len(rows) == 8
        assert {"question", "critique", "instruction", "output", "extracted", "correct"} <= set(rows[0])
        assert (rd / f"iter_{k}" / "adapter").is_dir()
        assert (rd / f"iter_{k}" / "metrics.json").exists()
        assert (rd / f"iter_{k}" / "reward_search.json").exists()
    # Iteration 1 samples prompts from the base model (useless), iteration 2 from the trained adapter (helpful).
    it1 = artifacts.read_parquet(rd / "iter_1" / "synthetic_set.parquet")
    it2 = artifacts.read_parquet(rd / "iter_2" / "synthetic_set.parquet")
    assert not any(r["correct"] for r in it1) and all(r["correct"] for r in it2)
    assert all(r["critique"].startswith("The instruction was vague") for r in it1)
    # SFT continued from the previous adapter; the reward search trace has real accuracies.
    assert sft.calls[0]["init"] is None and sft.calls[1]["init"].endswith("iter_1/adapter")
    trace = artifacts.read_json(rd / "iter_1" / "reward_search.json")["trace"]
    assert trace and all(0.0 <= t["accuracy"] <= 1.0 for t in trace)
    assert summary.best_val_accuracy == 1.0 and summary.best_iteration >= 1
    assert set(summary.test) == {"plain", "cot", "trprompt"}
    assert summary.test["trprompt"]["accuracy"] == 1.0 and summary.test["plain"]["accuracy"] == 0.0
    assert (rd / "report.md").read_text().count("| trprompt |") == 1
    assert (rd / "validation_accuracy.png").stat().st_size > 1000
    usage = json.loads((rd / "usage.json").read_text())
    assert usage["target_model"]["requests"] > 0 and usage["prompt_model"]["requests"] > 0


def test_resume_after_crash_does_not_redo_iteration_1(tmp_path, monkeypatch):
    fake_gold(monkeypatch)
    cfg = make_cfg(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, EchoEngine(scripted), FakeSFT(crash_on=2))
    rd = Path(cfg.run_dir)
    first = (rd / "iter_1" / "synthetic_set.parquet").stat().st_mtime_ns
    rows_before = len(artifacts.read_parquet(rd / "iter_1" / "synthetic_set.parquet"))
    assert (rd / "iter_2" / "synthetic_set.parquet").exists() and not (rd / "iter_2" / "adapter").exists()
    engine, sft = EchoEngine(scripted), FakeSFT()
    run(cfg, engine, sft)
    assert [c["k"] for c in sft.calls] == [2]  # iteration 1's SFT was not redone
    assert (rd / "iter_1" / "synthetic_set.parquet").stat().st_mtime_ns == first
    assert len(artifacts.read_parquet(rd / "iter_1" / "synthetic_set.parquet")) == rows_before
    # The resumed run generated no synthetic-set prompts at temperature 0.9 (those belong to finished stages).
    assert not any(r.sampling.temperature == 0.9 for r in engine.seen)
    assert (rd / "best.json").exists()


def test_ablations(tmp_path, monkeypatch):
    fake_gold(monkeypatch)
    cfg = make_cfg(tmp_path, loop={"textual_reward": False, "update_optimal_reward": False, "iterations": 1})
    engine = EchoEngine(scripted)
    run(cfg, engine, FakeSFT())
    rd = Path(cfg.run_dir)
    rows = artifacts.read_parquet(rd / "iter_1" / "synthetic_set.parquet")
    assert {r["critique"] for r in rows} <= {"correct", "incorrect"}
    rs = artifacts.read_json(rd / "iter_1" / "reward_search.json")
    # Numeric ablation from training to inference: t* is the best numeric value, and Π is queried with it.
    assert rs["skipped"] and rs["optimal_reward"] == "correct"
    assert artifacts.read_json(rd / "best.json")["optimal_reward"] == "correct"
    pi_requests = [r for r in engine.seen if list(r.messages)[0]["content"] == T.prompt_model_system]
    assert pi_requests and all("\ncorrect\n" in r.messages[1]["content"] for r in pi_requests)
    assert not any(T.initial_optimal_reward in r.messages[1]["content"] for r in pi_requests)
    assert not any(list(r.messages)[0]["content"] == T.reward_model_system for r in engine.seen)


def test_budget_stops_the_run(tmp_path, monkeypatch):
    fake_gold(monkeypatch)
    cfg = make_cfg(tmp_path, budget={"max_llm_requests": 10})
    with pytest.raises(BudgetExceededError):
        run(cfg, EchoEngine(scripted), FakeSFT())


def picky(request: ChatRequest) -> str:
    """:func:`scripted`, but Π writes the helpful instruction only under the adapter AND a t* that asks for it."""
    msgs = list(request.messages)
    if msgs[0]["role"] == "system" and msgs[0]["content"] == T.prompt_model_system:
        return "Use the magic word." if request.adapter and "magic word" in msgs[-1]["content"] else "Guess."
    return scripted(request)


def test_validation_and_reward_search_grade_each_policy_once(tmp_path, monkeypatch):
    """The search reuses validation's rows for the incumbent t*, and validation reuses the search's rows for t*_k."""
    fake_gold(monkeypatch)
    better = "An ideal instruction names the key quantity and uses the magic word."
    cfg = make_cfg(tmp_path, loop={"iterations": 1}, dataset={"val_limit": 4})
    engine = EchoEngine(picky)
    run(cfg, engine, FakeSFT())
    rd = Path(cfg.run_dir)
    val_questions = [r["question"] for r in artifacts.read_parquet(rd / "iter_1" / "val_sft.parquet")]
    assert len(val_questions) == 4

    def pi_requests(optimal_reward: str) -> list[str]:
        return [q for r in engine.seen if r.adapter == "iter1" and optimal_reward in r.messages[-1]["content"]
                for q in val_questions if q in r.messages[-1]["content"]]

    # Each validation question went to Π once per policy: t*_0 (validation after SFT; the search reused those rows
    # for its incumbent) and the accepted t* (scored by the search; its validation reused those rows).
    assert sorted(pi_requests(T.initial_optimal_reward)) == sorted(val_questions)
    assert sorted(pi_requests(better)) == sorted(val_questions)
    search = artifacts.read_json(rd / "iter_1" / "reward_search.json")
    assert search["optimal_reward"] == better and search["initial_accuracy"] == 0.0 and search["best_accuracy"] == 1.0
    after = artifacts.read_json(rd / "iter_1" / "val_reward_search.json")
    before = artifacts.read_json(rd / "iter_1" / "val_sft.json")
    assert after["rows_from"] == "iter1.reward_search" and before["rows_from"] == "evaluated"
    assert after["accuracy"] == search["best_accuracy"] == 1.0 and before["accuracy"] == search["initial_accuracy"]
    rows = artifacts.read_parquet(rd / "iter_1" / "val_reward_search.parquet")
    assert [r["question"] for r in rows] == val_questions
    assert all(r["instruction"] == "Use the magic word." for r in rows)


def test_search_on_fewer_questions_than_validation_still_validates_t_star(tmp_path, monkeypatch):
    """With val_questions < val_limit the search reuses a prefix of validation's rows; validation of t*_k runs."""
    fake_gold(monkeypatch)
    cfg = make_cfg(tmp_path, loop={"iterations": 1})  # val_limit 6, val_questions 4
    engine = EchoEngine(picky)
    run(cfg, engine, FakeSFT())
    rd = Path(cfg.run_dir)
    search = artifacts.read_json(rd / "iter_1" / "reward_search.json")
    assert search["optimal_reward"] != T.initial_optimal_reward  # a new t*, scored on 4 of the 6 questions
    after = artifacts.read_json(rd / "iter_1" / "val_reward_search.json")
    assert after["rows_from"] == "evaluated" and after["n"] == 6 and after["accuracy"] == 1.0
    val = [r["question"] for r in artifacts.read_parquet(rd / "iter_1" / "val_sft.parquet")]
    incumbent = [r for r in engine.seen if r.adapter == "iter1"
                 and T.initial_optimal_reward in r.messages[-1]["content"]
                 and any(q in r.messages[-1]["content"] for q in val)]
    assert len(incumbent) == 6  # validation's 6; the search took its first 4 rows instead of asking Π again


def test_unchanged_t_star_is_validated_once(tmp_path, monkeypatch):
    """When the search keeps t* (here: already perfect), validation after it reuses validation after SFT."""
    fake_gold(monkeypatch)
    cfg = make_cfg(tmp_path, loop={"iterations": 1})
    run(cfg, EchoEngine(scripted), FakeSFT())
    rd = Path(cfg.run_dir)
    after = artifacts.read_json(rd / "iter_1" / "val_reward_search.json")
    before = artifacts.read_json(rd / "iter_1" / "val_sft.json")
    assert after["rows_from"] == "iter1.val_sft" and after["optimal_reward"] == before["optimal_reward"]
    assert after["accuracy"] == before["accuracy"] == 1.0
