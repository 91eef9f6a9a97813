"""Sweeps: spec parsing and validation (pure), adapter namespacing, hooks, and a tiny real Ray Tune sweep.

The Ray sweep runs two trials of K=2 on scripted echo engines hosted by real engine
actors: the trial whose reward-template variant mentions "the magic word" makes the
scripted prompt model write a helpful instruction (validation accuracy 1.0), the
other scores 0.0 and is stopped by ASHA after its first iteration.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from trprompt import artifacts
from trprompt.config import ConfigError, load_config
from trprompt.engines.base import ChatRequest, Usage
from trprompt.engines.echo import EchoEngine
from trprompt.experiments.sweep.results import collect_trials
from trprompt.experiments.sweep.spec import load_sweep_spec, sweep_spec_from_dict
from trprompt.experiments.sweep.trials import (
    SweepHooks,
    TokenLedger,
    TrialProgress,
    check_trial_configs,
    resolve_trial_config,
    validation_points,
    write_template_variants,
)
from trprompt.roles import ROLES
from trprompt.templates import Templates, load_templates

T = Templates()
MAGIC = "The instruction mentions the magic word; following it, the assistant answered correctly."

_GOLD: dict[str, str] = {}


def _gold(question: str) -> str | None:
    if not _GOLD:
        from trprompt.data import load_split

        for split in ("train", "val"):
            _GOLD.update({p.question: p.answer for p in load_split("gsm8k", split, seed=0)})
    return _GOLD.get(question)


def scripted(request: ChatRequest) -> str:
    """Plays every role. The prompt model helps only when its reward text mentions the magic word and
    its adapter (if any) carries a trial namespace; the target is right only when told the magic word."""
    msgs = list(request.messages)
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
    user = msgs[-1]["content"]
    if system == T.prompt_model_system:
        namespaced = request.adapter is None or "__iter" in request.adapter
        return "Use the magic word." if "magic word" in user and namespaced else "Just guess."
    if system == T.reward_model_system:
        return "The instruction was vague; it should point to the key quantity."
    if len(msgs) == 1:
        question = user.rsplit("\n\n", 1)[0]
        gold = _gold(question) if "magic word" in user else None
        return f"The answer is {gold}." if gold is not None else "I think it is 7."
    return "No comment."


def echo_builder(cfg: Any) -> EchoEngine:
    return EchoEngine(scripted)


class FakeSFT:
    """Writes a stand-in adapter folder instead of training."""

    def __call__(self, examples, base_model, out_dir, cfg, templates, init_adapter=None, seed=0):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "adapter_config.json").write_text("{}")
        return {"examples": len(examples), "final_loss": 1.0}


BASE: dict[str, Any] = {
    "dataset": {"name": "gsm8k", "train_limit": 24, "val_limit": 4, "test_limit": 4},
    "models": {"share_engines": True,
               **{r: {"model": "fake", "engine": "echo", "num_cpus": 0.25} for r in ROLES[:3]}},
    "loop": {"iterations": 2, "synthetic_size": 4},
    "reward_search": {"steps": 0},
    "generation": {"batch_size": 8},
    "eval": {"run_test": False, "baselines": []},
}


def sweep_dict(tmp_path: Path, **sweep: Any) -> dict[str, Any]:
    return {
        "name": "tiny",
        "base": BASE,
        "templates": {"magic": {"initial_optimal_reward": MAGIC}},
        "sweep": {
            "metric": "val_accuracy",
            "mode": "max",
            "search": {"templates_file": {"grid": ["magic", None]},
                       "generation.prompt_temperature": {"uniform": [0.3, 0.9]}},
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "max_concurrent_trials": 1,
            "budget": {"max_trials": 2, "max_total_tokens": 10_000_000},
            "resources_per_trial": {"CPU": 0.25},
            "run_dir": str(tmp_path / "sweep"),
            **sweep,
        },
    }


# ---------------------------------------------------------------------------- pure tests


def test_spec_parses_search_space_and_counts_trials(tmp_path):
    data = sweep_dict(tmp_path)
    data["sweep"]["search"].update({"sft.lora_r": {"grid": [8, 16]}, "loop.iterations": {"choice": [1, 3]},
                                    "sft.learning_rate": {"loguniform": [1e-5, 1e-3]},
                                    "reward_search.candidates_per_step": {"randint": [1, 4]}})
    data["sweep"]["num_samples"] = 3
    data["sweep"]["budget"]["max_trials"] = 12
    spec = sweep_spec_from_dict(data)
    kinds = {d.key: d.kind for d in spec.search}
    assert kinds == {"templates_file": "grid", "generation.prompt_temperature": "uniform", "sft.lora_r": "grid",
                     "loop.iterations": "choice", "sft.learning_rate": "loguniform",
                     "reward_search.candidates_per_step": "randint"}
    assert spec.grid_size() == 4 and spec.trial_count() == 12
    assert spec.max_iterations() == 3  # the largest K the search can pick
    assert Path(spec.run_dir).is_absolute() and spec.resources_per_trial == {"CPU": 0.25}
    # Validation covers both ends of every range and every listed value.
    points = validation_points(spec)
    assert {p["reward_search.candidates_per_step"] for p in points} == {1, 3}
    assert {p["generation.prompt_temperature"] for p in points} == {0.3, 0.9}
    assert check_trial_configs(spec) == len(points) == 2 * 2 * 2 * 2 * 2 * 2


def test_trial_config_applies_overrides_and_template_variant(tmp_path):
    spec = sweep_spec_from_dict(sweep_dict(tmp_path))
    assert write_template_variants(spec, tmp_path / "tpl") == [str(tmp_path / "tpl" / "magic.yaml")]
    assert load_templates(tmp_path / "tpl" / "magic.yaml").initial_optimal_reward == MAGIC
    cfg = resolve_trial_config(spec, {"templates_file": "magic", "generation.prompt_temperature": 0.42},
                               tmp_path / "run", templates_dir=tmp_path / "tpl")
    assert cfg.generation.prompt_temperature == 0.42
    assert cfg.templates_file == str(tmp_path / "tpl" / "magic.yaml")
    assert cfg.run_dir == str(tmp_path / "run") and cfg.loop.iterations == 2
    assert cfg.dataset.train_limit == 24  # the rest of the base is kept


def test_spec_from_file_resolves_base_path_and_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(BASE))
    data = sweep_dict(tmp_path)
    data["base"] = "run.yaml"  # relative to the sweep file's folder
    data["overrides"] = {"loop.synthetic_size": 6}
    path = tmp_path / "sweep-mine.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_sweep_spec(path, ["sweep.num_samples=2", "sweep.budget.max_trials=4"])
    assert spec.num_samples == 2 and spec.name == "tiny"
    assert spec.base["loop"]["synthetic_size"] == 6 and spec.base["dataset"]["train_limit"] == 24


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sweep": {"metric": "accuracy"}}, "sweep.metric: must be one of"),
        ({"sweep": {"mode": "maximise"}}, "sweep.mode"),
        ({"sweep": {"search": {"sft.lora_rank": {"grid": [8]}}}}, "sweep.search.sft.lora_rank: unknown config field"),
        ({"sweep": {"search": {"sft.lora_r": {"grd": [8]}}}}, "unknown search kind 'grd'"),
        ({"sweep": {"search": {"sft.lora_r": {"grid": []}}}}, "sweep.search.sft.lora_r.grid: must be a non-empty"),
        ({"sweep": {"search": {"generation.prompt_temperature": {"uniform": [0.9, 0.1]}}}}, "needs low < high"),
        ({"sweep": {"search": {"sft.learning_rate": {"loguniform": [0, 1e-3]}}}}, "needs low > 0"),
        ({"sweep": {"search": {"run_dir": {"grid": ["a"]}}}}, "run_dir cannot be searched"),
        ({"sweep": {"search": {}}}, "sweep.search: must be a non-empty mapping"),
        ({"sweep": {"scheduler": {"type": "pbt"}}}, "sweep.scheduler.type"),
        ({"sweep": {"scheduler": {"type": "asha", "grace_period": 5}}}, "sweep.scheduler.grace_period"),
        ({"sweep": {"budget": {"max_trials": 1}}}, "sweep.budget.max_trials: the search defines 2 trials"),
        ({"sweep": {"budget": {"max_total_tokens": -3}}}, "sweep.budget.max_total_tokens"),
        ({"sweep": {"resources_per_trial": {"CPU": -1}}}, "sweep.resources_per_trial.CPU"),
        ({"sweep": {"num_samples": 0}}, "sweep.num_samples"),
        ({"sweep": {"stop": 3}}, "unknown field 'stop'"),
        ({"extra": 1}, "unknown top-level field 'extra'"),
        ({"base": "does/not/exist.yaml"}, "base: run config file not found"),
        ({"templates": {"bad": {"no_such_template": "x"}}}, "templates.bad: "),
        ({"templates": {"bad": {"prompt_model_user": "{question} only"}}}, "templates.bad: "),
    ],
)
def test_spec_errors_name_the_field(tmp_path, change, message):
    data = sweep_dict(tmp_path)
    for k, v in change.items():
        if k == "sweep":
            data["sweep"].update(v)
        else:
            data[k] = v
    with pytest.raises(ConfigError, match=None) as err:
        sweep_spec_from_dict(data)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"generation.prompt_temperature": {"grid": [0.5, 3.0]}}, "generation.prompt_temperature must be in [0, 2]"),
        ({"sft.lora_r": {"uniform": [4, 32]}}, "sft.lora_r must be an integer"),
        ({"loop.iterations": {"choice": [1, 0]}}, "loop.iterations must be a positive number"),
        ({"templates_file": {"grid": ["nope.yaml"]}}, "templates_file: no such file"),
    ],
)
def test_every_trial_config_is_validated_before_start(tmp_path, search, message):
    data = sweep_dict(tmp_path)
    data["sweep"]["search"] = search
    data["sweep"]["budget"] = {}
    spec = sweep_spec_from_dict(data)
    with pytest.raises(ConfigError) as err:
        check_trial_configs(spec)
    assert "sweep.search: the trial with" in str(err.value) and message in str(err.value)


def test_base_config_errors_are_reported_as_base(tmp_path):
    data = sweep_dict(tmp_path)
    data["base"] = {**BASE, "loop": {"iterations": 2, "synthetic_sise": 3}}
    with pytest.raises(ConfigError, match="base: unknown field loop.synthetic_sise"):
        check_trial_configs(sweep_spec_from_dict(data))


def test_resume_fingerprint_supersedes_stale_trials_only_when_results_depend_on_the_change(tmp_path, monkeypatch):
    import copy

    from trprompt import grading
    from trprompt.experiments.sweep.spec import SUPERSEDED_DIR, prepare_sweep_dir

    def prepare(edit=None) -> list[str] | None:
        data = copy.deepcopy(sweep_dict(tmp_path))
        if edit:
            edit(data)
        spec = sweep_spec_from_dict(data)
        changed = prepare_sweep_dir(spec)
        if not (spec.trials_dir / "t1" / "sweep_trial.json").exists():  # a trial of the current settings
            artifacts.write_json(spec.trials_dir / "t1" / "sweep_trial.json", {"marker": True})
            (spec.tune_dir).mkdir(parents=True, exist_ok=True)
        return changed

    assert prepare() is None
    # Placement, concurrency, batch sizes and budget caps: the saved trials stay and resume.
    def speed(d):
        d["sweep"].update(resources_per_trial={"CPU": 1.0}, max_concurrent_trials=2,
                          budget={"max_trials": 4, "max_total_tokens": 5})
        d["base"] = {**d["base"], "generation": {"batch_size": 2},
                     "models": {**d["base"]["models"], "prompt_model": {"model": "fake", "engine": "echo",
                                                                        "num_cpus": 1.0, "threads": 2}}}
    assert prepare(speed) is None
    assert not (tmp_path / "sweep" / SUPERSEDED_DIR).exists()

    def base(**section):
        def edit(d):
            d["base"] = {**d["base"], **section}
        return edit

    cases = [
        (base(dataset={**BASE["dataset"], "test_limit": 3}), "base.dataset"),
        (base(dataset={**BASE["dataset"], "name": "gsm_hard"}), "base.dataset"),
        (lambda d: d["templates"]["magic"].update(initial_optimal_reward=MAGIC + " Really."), "templates.variants"),
        (lambda d: d["sweep"]["search"].update({"sft.lora_r": {"grid": [8]}}), "search"),
    ]
    for n, (edit, name) in enumerate(cases, 1):
        changed = prepare(edit)
        assert changed is not None and name in changed, (name, changed)
        moved = list((tmp_path / "sweep" / SUPERSEDED_DIR).glob("*/trials/t1/sweep_trial.json"))
        assert len(moved) == n  # the stale trial was moved aside, not deleted
        assert prepare(edit) is None  # the same settings again: resume
    monkeypatch.setattr(grading, "GRADER_VERSION", "test-next", raising=False)
    assert "base.grader_version" in prepare(cases[-1][0])


class _Meter:
    def __init__(self) -> None:
        self.usage = Usage()


class _FakeTrainer:
    def __init__(self) -> None:
        self.engines = {r: _Meter() for r in ROLES}


def _write_iteration(run_dir: Path, k: int, val: float) -> None:
    artifacts.write_json(run_dir / f"iter_{k}" / "metrics.json",
                         {"iteration": k, "synthetic_accuracy": 0.5, "val_after_sft": val / 2,
                          "val_after_reward_search": val})


def test_hooks_report_finished_iterations_with_tokens_and_resume(tmp_path):
    run_dir = tmp_path / "trial"
    artifacts.write_json(run_dir / "iter_0" / "val_initial.json", {"accuracy": 0.25})
    sent: list[dict[str, Any]] = []
    prog = TrialProgress("t1", {"x": 1}, iterations_planned=3)
    hooks = SweepHooks(run_dir, prog, sent.append)
    trainer = _FakeTrainer()
    hooks.attach(trainer)
    hooks.stage(1, "synthetic_set")
    assert sent == []
    _write_iteration(run_dir, 1, 0.5)
    trainer.engines["target_model"].usage.add(Usage(1, 4, 30, 10))
    hooks.usage("target_model", Usage(1, 4, 30, 10))
    assert [r["iteration"] for r in sent] == [1]
    assert sent[0]["val_accuracy"] == 0.5 and sent[0]["best_val_accuracy"] == 0.5
    assert sent[0]["total_tokens"] == 40 and sent[0]["tokens_target_model"] == 40 and sent[0]["requests"] == 4
    _write_iteration(run_dir, 2, 0.75)
    _write_iteration(run_dir, 3, 0.0)
    hooks.stage(3, "sft")
    assert [r["iteration"] for r in sent] == [1, 2]  # the last iteration waits for finish()
    hooks.finish()
    assert [r["iteration"] for r in sent] == [1, 2, 3]
    assert sent[2]["val_accuracy"] == 0.0 and sent[2]["best_val_accuracy"] == 0.75
    saved = TrialProgress.load(run_dir)
    assert saved is not None and [r["iteration"] for r in saved.reports] == [1, 2, 3]
    # A new attempt replays what was reported (not the last iteration) and carries the tokens on.
    again: list[dict[str, Any]] = []
    hooks2 = SweepHooks(run_dir, saved, again.append)
    trainer2 = _FakeTrainer()
    hooks2.attach(trainer2)
    assert hooks2.replay() == 2 and again == sent[:2]
    trainer2.engines["prompt_model"].usage.add(Usage(1, 1, 5, 5))
    hooks2.finish()
    assert again[-1]["iteration"] == 3 and again[-1]["total_tokens"] == 50


def test_token_ledger_sums_trials_and_reseeds_from_disk(tmp_path):
    trials = tmp_path / "trials"
    for tid, tokens in (("a", 300), ("b", 500)):
        p = TrialProgress(tid, {}, 2)
        p.tokens["target_model"] = tokens
        p.save(trials / tid)
    ledger = TokenLedger(trials, max_total_tokens=1000)
    assert ledger.total() == 800 and not ledger.exhausted()
    ledger.record("b", 700)
    assert ledger.total() == 1000 and ledger.exhausted()
    restored = pickle.loads(pickle.dumps(ledger))  # as Tune restores its stopper: recount from disk
    assert restored.total() == 800


def test_stopper_stops_the_sweep_at_the_token_cap(tmp_path):
    from cluster.tune_sweep import TokenBudgetStopper

    stopper = TokenBudgetStopper(tmp_path / "trials", max_total_tokens=100)
    assert stopper("a", {"total_tokens": 60}) is False and not stopper.stop_all()
    assert stopper("a", {"total_tokens": 70}) is False and not stopper.stop_all()  # latest total, not a sum
    stopper("b", {"total_tokens": 30})
    assert stopper.stop_all()
    assert not TokenBudgetStopper(tmp_path / "trials", None).stop_all()


def _fake_trial(spec, tid: str, vals: list[float], planned: int, tokens: int, status: str | None,
                early: bool = False) -> None:
    from trprompt.experiments.sweep.trials import EARLY_STOP_FILE, STATUS_FILE

    rd = spec.trials_dir / tid
    prog = TrialProgress(tid, {"templates_file": None, "generation.prompt_temperature": 0.5}, planned)
    prog.tokens["target_model"] = tokens
    prog.save(rd)
    for k, v in enumerate(vals, 1):
        _write_iteration(rd, k, v)
    if status:
        artifacts.write_json(rd / STATUS_FILE, {"status": status, "error": "boom" if status == "ERROR" else None})
    if early:
        artifacts.write_json(rd / EARLY_STOP_FILE, {"iteration": len(vals)})


def test_table_ranks_trials_and_labels_how_they_ended(tmp_path):
    spec = sweep_spec_from_dict(sweep_dict(tmp_path))
    _fake_trial(spec, "done_cheap", [0.5, 0.75], 2, 100, "TERMINATED")
    _fake_trial(spec, "done_dear", [0.75, 0.25], 2, 900, "TERMINATED")
    _fake_trial(spec, "asha", [0.25], 2, 50, "TERMINATED", early=True)
    _fake_trial(spec, "capped", [0.5], 2, 70, "TERMINATED")
    _fake_trial(spec, "broken", [], 2, 10, "ERROR")
    rows = collect_trials(spec)
    assert [r["trial_id"] for r in rows] == ["done_cheap", "done_dear", "capped", "asha", "broken"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    by_id = {r["trial_id"]: r for r in rows}
    assert by_id["done_dear"]["score"] == 0.75 and by_id["done_dear"]["val_accuracy_last"] == 0.25
    assert {k: r["stop_reason"] for k, r in by_id.items()} == {
        "done_cheap": "completed", "done_dear": "completed", "asha": "early_stopped", "capped": "budget",
        "broken": "error"}
    assert [k for k, r in by_id.items() if r["stopped_early"]] == ["asha"]
    assert by_id["broken"]["score"] is None and by_id["broken"]["error"] == "boom"
    from trprompt.experiments.sweep.results import write_sweep_outputs

    summary = write_sweep_outputs(spec)
    assert summary["best_trial"] == "done_cheap" and summary["total_tokens"] == 1130
    assert summary["stop_reasons"] == {"budget": 1, "completed": 2, "early_stopped": 1, "error": 1}
    assert load_config(spec.sweep_dir / "best_config.yaml").run_dir == str(spec.trials_dir / "done_cheap")
    assert len(artifacts.read_parquet(spec.sweep_dir / "results.parquet")) == 5


# --------------------------------------------------------------------------- Ray tests

def _register_by_value() -> None:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.ray
def test_shared_pool_pickles_and_keeps_every_trials_adapters(ray_session):
    import ray

    from cluster.resources import build_role_engines
    from cluster.tune_sweep import AdapterRegistry, SharedEngines
    from trprompt.config import config_from_dict

    _register_by_value()
    cfg = config_from_dict({**BASE, "run_dir": "unused"})
    engines = build_role_engines(cfg.models, local=False, engine_builder=echo_builder, use_placement_group=False)
    registry = ray.remote(num_cpus=0)(AdapterRegistry).remote()
    try:
        pool = engines["prompt_model"]
        with pytest.raises(TypeError):
            pickle.dumps(pool)  # why trials get SharedEnginePool clients instead
        shared = SharedEngines.from_role_engines(engines, cfg.models, registry)
        copy_a, copy_b = (pickle.loads(ray.cloudpickle.dumps(shared)) for _ in range(2))
        ea, wa, _ = copy_a.for_trial(cfg, "tA")
        eb, wb, priv = copy_b.for_trial(cfg, "tB")
        assert priv == [] and len(wa) == 1 and ea["prompt_model"] is ea["target_model"]
        ea["prompt_model"].load_adapter("iter1", "/a")
        eb["prompt_model"].load_adapter("iter1", "/b")
        msgs = [{"role": "user", "content": "q"}]
        # Each client's calls carry the union of adapters, so neither evicts the other's.
        ea["prompt_model"].generate([ChatRequest(msgs, adapter="iter1")])
        eb["prompt_model"].generate([ChatRequest(msgs, adapter="iter1")])
        assert pool.ping()[0]["adapters"] == ["tA__iter1", "tB__iter1"]
        wa[0].release()
        eb["prompt_model"].generate([ChatRequest(msgs)])
        assert pool.ping()[0]["adapters"] == ["tB__iter1"]
    finally:
        engines.close()
        ray.kill(registry)


@pytest.mark.ray
def test_tiny_sweep_end_to_end_and_resume(ray_session, tmp_path):
    from cluster.tune_sweep import run_sweep

    _register_by_value()
    spec = sweep_spec_from_dict(sweep_dict(tmp_path))
    out = run_sweep(spec, engine_builder=echo_builder, sft_runner=FakeSFT(), verbose=0)
    assert not out.restored and out.engine_requests > 0
    rows = out.rows
    assert len(rows) == 2
    best, worst = rows
    assert best["templates_file"] == "magic" and worst["templates_file"] is None
    # ASHA stopped the poor trial after its first iteration; the good one ran all K.
    assert best["stop_reason"] == "completed" and best["iterations_completed"] == 2 and not best["stopped_early"]
    assert worst["stopped_early"] and worst["stop_reason"] == "early_stopped" and worst["iterations_completed"] == 1
    assert not (Path(worst["run_dir"]) / "iter_2" / "metrics.json").exists()
    # The table agrees with each trial's own run directory.
    for row in rows:
        rd = Path(row["run_dir"])
        assert rd.parent == spec.trials_dir and rd.name == row["trial_id"]
        metrics = [artifacts.read_json(p) for p in sorted(rd.glob("iter_*/metrics.json"))]
        assert row["iterations_completed"] == len(metrics)
        assert row["val_accuracy"] == max(m["val_after_reward_search"] for m in metrics) == row["score"]
        assert row["total_tokens"] == sum(row[f"tokens_{r}"] for r in ROLES) > 0
        assert row["tokens_prompt_model"] > 0 and row["tokens_target_model"] > 0 and row["wall_s"] > 0
        prog = TrialProgress.load(rd)
        assert [r["iteration"] for r in prog.reports] == list(range(1, len(metrics) + 1))
        assert prog.reports[-1]["total_tokens"] <= row["total_tokens"]
    assert best["val_accuracy"] == 1.0 and worst["val_accuracy"] == 0.0
    assert best["total_tokens"] > worst["total_tokens"]
    # Parquet and Markdown tables, plot, best config.
    sd = spec.sweep_dir
    table = artifacts.read_parquet(sd / "results.parquet")
    assert [r["trial_id"] for r in table] == [best["trial_id"], worst["trial_id"]]
    assert [r["iterations_completed"] for r in table] == [2, 1]
    md = (sd / "results.md").read_text()
    assert md.index(best["trial_id"]) < md.index(worst["trial_id"]) and "early_stopped" in md
    assert (sd / "accuracy_vs_tokens.png").stat().st_size > 2000
    best_cfg = load_config(sd / "best_config.yaml")
    ran = load_config(Path(best["run_dir"]) / "config.yaml")
    ran.sft.resolved_dtype = None  # written by the run for the record (what dtype auto meant there)
    for role in ROLES:
        if getattr(ran.models, role) is not None:
            getattr(ran.models, role).resolved_dtype = None
    assert best_cfg == ran
    assert best_cfg.templates_file.endswith("templates/magic.yaml")
    assert best_cfg.generation.prompt_temperature == pytest.approx(best["generation.prompt_temperature"])
    assert 0.3 <= best_cfg.generation.prompt_temperature <= 0.9
    assert artifacts.read_json(sd / "best.json")["best_trial"] == best["trial_id"]
    assert collect_trials(spec) == rows

    # Resuming the finished sweep restores Tune's state and recomputes nothing.
    stamps = {p: p.stat().st_mtime_ns for p in spec.trials_dir.rglob("iter_*/*") if p.is_file()}
    again = run_sweep(sweep_spec_from_dict(sweep_dict(tmp_path)), engine_builder=echo_builder,
                      sft_runner=FakeSFT(), verbose=0)
    assert again.restored and again.engine_requests == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [(r["trial_id"], r["score"], r["iterations_completed"]) for r in again.rows] == \
        [(r["trial_id"], r["score"], r["iterations_completed"]) for r in rows]
