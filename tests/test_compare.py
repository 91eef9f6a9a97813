"""The comparison: config, every method on shared fake engines, the report, per-(method, config) caching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_methods import FakeSFT, gold_of, scripted_engine

from trprompt.config import ConfigError, load_config
from trprompt.experiments.compare.cache import method_key
from trprompt.experiments.compare.config import load_compare_config
from trprompt.experiments.compare.runner import Comparison
from trprompt.methods.names import METHOD_NAMES
from trprompt.roles import ROLES
from trprompt.templates import Templates

ROOT = Path(__file__).resolve().parent.parent


def compare_yaml(tmp_path: Path, **compare_over: Any) -> Path:
    data = {
        "run": {
            "run_dir": str(tmp_path / "cmp"),
            "dataset": {"name": "gsm8k", "train_limit": 24, "val_limit": 6, "test_limit": 5},
            "models": {r: {"model": "fake", "engine": "echo"} for r in ("prompt_model", "target_model",
                                                                         "reward_model")},
            "loop": {"iterations": 1, "synthetic_size": 6},
            "reward_search": {"steps": 1, "candidates_per_step": 2, "val_questions": 4},
            "generation": {"batch_size": 8, "target_max_tokens": 64},
        },
        "compare": {
            "methods": list(METHOD_NAMES),
            "test_dataset": "svamp",
            "test_limit": 4,
            "budget": {"max_metric_calls": 60, "max_llm_requests": 200},
            "budgets": {"trprompt": {"max_llm_requests": 400}},
            "textgrad": {"steps": 2, "candidates_per_step": 2, "minibatch_size": 4},
            "opro": {"steps": 2, "proposals_per_step": 2, "exemplars": 2},
            "gepa": {"minibatch_size": 3},
            **compare_over,
        },
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_compare(path: Path, overrides: list[str] | None = None, methods=None, transfer=False):
    run, cmp = load_compare_config(path, overrides)
    engine = scripted_engine()
    comparison = Comparison(run, cmp, {r: engine for r in ROLES}, sft_runner=FakeSFT(), base_model_path="unused")
    return comparison.run_all(methods, transfer=transfer), engine


def table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.split("\n## ")[0].splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_full_comparison_report_and_caching(tmp_path):
    path = compare_yaml(tmp_path)
    result, engine = run_compare(path)
    rd = tmp_path / "cmp"
    by = result.by_name()
    assert list(by) == list(METHOD_NAMES)
    assert all(r.error is None for r in result.results), [(r.name, r.error) for r in result.results]
    # Every method row is in the table, with its test accuracy on the same 4 SVAMP questions.
    md = (rd / "comparison.md").read_text()
    rows = table_rows(md)
    assert set(rows) == set(METHOD_NAMES)
    for name in METHOD_NAMES:
        assert rows[name][3] == f"{by[name].tests['svamp']['correct']}/4"
    # The scripted target is right only under the keyword: plain/cot score 0, every optimiser finds it.
    acc = {n: by[n].tests["svamp"]["accuracy"] for n in METHOD_NAMES}
    assert acc["plain"] == acc["cot"] == 0.0
    assert acc["textgrad"] == acc["opro"] == acc["gepa"] == acc["trprompt"] == 1.0
    # Costs: fixed baselines spend nothing; optimisers stay within their budgets and report what they spent.
    for name in ("plain", "cot"):
        assert by[name].optimisation_totals()["requests"] == 0
    for name in ("textgrad", "opro", "gepa"):
        fit = by[name].fit
        assert 0 < fit["metric_calls"] <= 60 and fit["llm_requests"] <= 200
        assert fit["usage"]["target_model"]["requests"] == fit["metric_calls"]
        assert int(rows[name][7]) == fit["metric_calls"]
    assert by["trprompt"].fit["llm_requests"] <= 400
    # The query-aware policy costs a prompt-model request per test question; fixed ones do not.
    assert by["trprompt"].tests["svamp"]["requests_per_question"] == 2.0
    assert by["opro"].tests["svamp"]["requests_per_question"] == 1.0
    assert (rd / "val_accuracy.png").stat().st_size > 1000 and (rd / "test_vs_tokens.png").stat().st_size > 1000
    data = json.loads((rd / "comparison.json").read_text())
    assert [r["method"] for r in data["rows"]] == list(METHOD_NAMES)
    total_requests = len(engine.seen)
    assert total_requests > 0

    # A second run recomputes nothing: no engine request at all, every result comes from the cache.
    again, engine2 = run_compare(path)
    assert engine2.seen == [] and engine2.calls == 0
    assert all(r.computed == [] for r in again.results)
    assert {r.name: r.tests["svamp"]["accuracy"] for r in again.results} == acc
    assert "(cached)" in (rd / "comparison.md").read_text()

    # Changing OPRO's steps refits OPRO only; the other methods stay cached.
    third, engine3 = run_compare(path, ["compare.opro.steps=1"])
    computed = {r.name: r.computed for r in third.results}
    assert computed["opro"] == ["fit", "test:svamp"]
    assert all(computed[n] == [] for n in METHOD_NAMES if n != "opro")
    assert engine3.seen

    # A different test size re-tests but refits nothing.
    fourth, engine4 = run_compare(path, ["compare.test_limit=3"], methods=["plain", "textgrad"])
    assert {r.name: r.computed for r in fourth.results} == {"plain": ["test:svamp"], "textgrad": ["test:svamp"]}
    assert all(len(r.messages) == 1 and gold_of(r.messages[0]["content"]) for r in engine4.seen)
    assert len(engine4.seen) == 6
    # Methods not asked for appear in the report only when fully cached (no test at limit 3 for them).
    assert set(table_rows((rd / "comparison.md").read_text())) == {"plain", "textgrad"}
    fifth, engine5 = run_compare(path, methods=["cot"])
    assert engine5.seen == [] and [r.name for r in fifth.results] == list(METHOD_NAMES)
    assert set(table_rows((rd / "comparison.md").read_text())) == set(METHOD_NAMES)


def test_transfer_table(tmp_path):
    path = compare_yaml(tmp_path, methods=["cot", "opro", "trprompt"], transfer_datasets=["gsm8k"],
                        transfer_limit=3)
    result, _ = run_compare(path, transfer=True)
    assert result.transfer == ["gsm8k"]
    for r in result.results:
        assert set(r.tests) == {"svamp", "gsm8k"} and r.tests["gsm8k"]["n"] == 3
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    section = md.split("## Transfer")[1]
    assert "| method | svamp | gsm8k |" in section
    assert "| opro | 100.0 (n=4) | 100.0 (n=3) |" in section and "| cot | 0.0 (n=4) | 0.0 (n=3) |" in section


def test_failing_method_is_reported_not_fatal(tmp_path):
    # trprompt with a tiny request budget fails; the others still run and the table says why.
    path = compare_yaml(tmp_path, methods=["cot", "trprompt"], budgets={"trprompt": {"max_llm_requests": 5}})
    result, _ = run_compare(path)
    by = result.by_name()
    assert by["cot"].error is None and "BudgetExceededError" in by["trprompt"].error
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| trprompt | — |" in md and "error: BudgetExceededError" in md
    assert by["trprompt"].optimisation_totals()["requests"] <= 5


def test_method_key_tracks_what_matters(tmp_path):
    path = compare_yaml(tmp_path)
    run, cmp = load_compare_config(path)
    t = Templates()
    keys = {m: method_key(m, run, cmp, t) for m in METHOD_NAMES}
    run2, cmp2 = load_compare_config(path, ["compare.gepa.minibatch_size=2", "run.loop.iterations=2",
                                            "compare.test_limit=2"])
    keys2 = {m: method_key(m, run2, cmp2, t) for m in METHOD_NAMES}
    changed = {m for m in METHOD_NAMES if keys[m] != keys2[m]}
    assert changed == {"gepa", "trprompt", "trprompt-fixed-reward", "trprompt-numeric-reward"}
    # Placement and speed knobs change no answer, so no key.
    run4, cmp4 = load_compare_config(path, ["run.models.target_model.threads=4", "run.generation.batch_size=3",
                                            "run.models.prompt_model.num_actors=2"])
    assert {m: method_key(m, run4, cmp4, t) for m in METHOD_NAMES} == keys
    run5, cmp5 = load_compare_config(path, ["run.models.target_model.model=other"])
    assert method_key("opro", run5, cmp5, t) != keys["opro"]
    run6, cmp6 = load_compare_config(path, ["run.sft.threads=1", "run.sft.cpus_per_worker=2"])
    assert {m: method_key(m, run6, cmp6, t) for m in METHOD_NAMES} == keys
    run3, cmp3 = load_compare_config(path, ["run.seed=3"])
    assert {m for m in METHOD_NAMES if method_key(m, run3, cmp3, t) != keys[m]} == set(METHOD_NAMES) - {"plain",
                                                                                                          "cot"}


@pytest.mark.parametrize("override,message", [
    ("compare.methods=[plain, nope]", "compare.methods[1]: unknown method 'nope'"),
    ("compare.methods=[cot, cot]", "twice"),
    ("run.dataset.name=svamp", "svamp, which has no training split"),
    ("compare.budget.max_metric_calls=null", "gepa needs a metric-call budget"),
    ("compare.opro.proposals_per_step=0", "compare.opro.proposals_per_step"),
    ("compare.test_dataset=mnist", "compare.test_dataset"),
    ("compare.budgets={oops: {max_metric_calls: 3}}", "compare.budgets: unknown method 'oops'"),
    ("compare.textgrad.nope=1", "unknown field compare.textgrad.nope"),
    ("run.loop.iterations=0", "run: loop.iterations"),
    ("other.x=1", "must start with run. or compare."),
])
def test_config_errors_name_the_field(tmp_path, override, message):
    path = compare_yaml(tmp_path)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_compare_config(path, [override])


def test_shipped_compare_configs_load():
    for name in ("compare-svamp.yaml", "compare-gsm8k.yaml"):
        run, cmp = load_compare_config(ROOT / "configs" / name)
        assert cmp.methods and run.dataset.name == "gsm8k"
        assert set(cmp.methods) <= set(METHOD_NAMES)
    _, cmp = load_compare_config(ROOT / "configs" / "compare-svamp.yaml")
    assert cmp.test_dataset == "svamp"
    with pytest.raises(ConfigError):  # a comparison file is not a run config (and says so)
        load_config(ROOT / "configs" / "compare-svamp.yaml")


def test_job_entry_point_local(tmp_path):
    import jobs.compare as job

    path = compare_yaml(tmp_path, methods=["plain", "cot"])
    rc = job.main(["--config", str(path), "--local", "--no-progress", "--methods", "cot"])
    assert rc == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| cot |" in md and "| plain |" not in md
    assert job.main(["--config", str(path), "--local", "--no-progress", "--methods", "plain"]) == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| cot |" in md and "| plain |" in md  # cot came from the cache
    assert job.main(["--config", str(path), "--local", "--methods", "opro"]) == 2  # not in compare.methods


class FlakyEngine:
    """Delegates to a scripted engine but fails on its ``fail_on``-th generate call."""

    def __init__(self, fail_on: int) -> None:
        self.inner = scripted_engine()
        self.fail_on = fail_on
        self.calls = 0

    def generate(self, requests):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated crash")
        return self.inner.generate(requests)

    def load_adapter(self, adapter_id, path):
        self.inner.load_adapter(adapter_id, path)

    def unload_adapter(self, adapter_id):
        self.inner.unload_adapter(adapter_id)


def test_interrupted_test_evaluation_resumes(tmp_path):
    path = compare_yaml(tmp_path, methods=["cot"], test_limit=5, test_chunk=2)
    run, cmp = load_compare_config(path)
    flaky = FlakyEngine(fail_on=3)  # chunks [0, 1] and [2, 3] finish, [4] crashes
    result = Comparison(run, cmp, {r: flaky for r in ROLES}).run_all()
    assert "simulated crash" in result.by_name()["cot"].error
    assert len(flaky.inner.seen) == 4
    engine = scripted_engine()
    again = Comparison(run, cmp, {r: engine for r in ROLES}).run_all()
    test = again.by_name()["cot"].tests["svamp"]
    assert len(engine.seen) == 1  # only the last question was asked again
    assert test["n"] == 5 and test["usage"]["target_model"]["requests"] == 5
    assert not list((tmp_path / "cmp").rglob("*.partial.json"))
    rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"]
    assert rows[0]["method"] == "cot" and rows[0]["n"] == 5


def test_cache_fingerprints_invalidate_on_relevant_settings_only(tmp_path, monkeypatch):
    """A changed grader version, templates, data set or test size never returns the old cached numbers;
    placement, threads and batch sizes reuse everything."""
    from trprompt import grading

    path = compare_yaml(tmp_path, methods=["cot", "opro"])
    first, _ = run_compare(path)
    assert {r.name: r.computed for r in first.results} == {"cot": ["fit", "test:svamp"], "opro": ["fit", "test:svamp"]}
    fit = json.loads(next((tmp_path / "cmp" / "methods" / "opro").glob("*/fit.json")).read_text())
    assert fit["inputs"]["grader_version"] and fit["inputs"]["templates.version"]

    def computed(overrides: list[str]) -> dict[str, list[str]]:
        result, _ = run_compare(path, overrides)
        return {r.name: r.computed for r in result.results}

    # Irrelevant knobs: placement, threads, request/engine batch sizes, SFT threads -> everything cached.
    assert computed(["run.models.target_model.num_actors=3", "run.models.target_model.threads=2",
                     "run.models.prompt_model.num_cpus=2", "run.models.target_model.max_batch_size=7",
                     "run.generation.batch_size=3", "run.sft.threads=1"]) == {"cot": [], "opro": []}
    # test_limit: a new test, no refit.
    assert computed(["compare.test_limit=3"]) == {"cot": ["test:svamp"], "opro": ["test:svamp"]}
    # the test data set: a new test, no refit.
    assert computed(["compare.test_dataset=gsm8k"]) == {"cot": ["test:gsm8k"], "opro": ["test:gsm8k"]}
    # the optimisation data set: opro refits (and so re-tests); cot trains on nothing, stays cached.
    assert computed(["run.dataset.name=gsm_hard"]) == {"cot": [], "opro": ["fit", "test:svamp"]}
    # templates text: everything is recomputed.
    tpl = tmp_path / "templates.yaml"
    tpl.write_text(yaml.safe_dump({"numeric_reward_correct": "right"}))
    assert computed([f"run.templates_file={tpl}"]) == {"cot": ["test:svamp"], "opro": ["fit", "test:svamp"]}
    # the grader version: every graded result is recomputed (the fit grades validation answers too).
    monkeypatch.setattr(grading, "GRADER_VERSION", "test-next", raising=False)
    assert computed([]) == {"cot": ["test:svamp"], "opro": ["fit", "test:svamp"]}
    assert computed([]) == {"cot": [], "opro": []}  # and then it is cached under the new version


@pytest.mark.parametrize("unit,amount", [("target_calls", 60), ("tokens", 30_000)])
def test_budget_matched_mode_spends_the_same_budget(tmp_path, unit, amount):
    """Every optimising method gets the same cap and keeps stepping (past its configured steps) until the
    next step no longer fits; the report names the budget each method used."""
    from trprompt.experiments.compare.config import parse_budget_flag

    path = compare_yaml(tmp_path, methods=["cot", "textgrad", "opro", "gepa"], budgets={},
                        textgrad={"steps": 1, "candidates_per_step": 2, "minibatch_size": 4},
                        opro={"steps": 1, "proposals_per_step": 2, "exemplars": 2})
    run, cmp = load_compare_config(path, parse_budget_flag(f"{unit}={amount}"))
    assert cmp.budget_match is not None and cmp.budget_match.describe().startswith(str(amount))
    engine = scripted_engine(good_after=10**6)  # no proposal ever helps: nothing stops early on 100% validation
    result = Comparison(run, cmp, {r: engine for r in ROLES}).run_all()
    by = result.by_name()
    val = 6
    step_cost = {"textgrad": 4 + 2 * val, "opro": 2 * val, "gepa": 2 * 3 + val}  # worst-case metric calls per step
    for name in ("textgrad", "opro", "gepa"):
        fit = by[name].fit
        assert by[name].error is None, by[name].error
        assert fit["budget"]["exhaust"] is True
        calls, tokens = fit["metric_calls"], by[name].optimisation_totals()["total_tokens"]
        if unit == "target_calls":
            assert fit["budget"]["max_metric_calls"] == amount
            assert amount - step_cost[name] < calls <= amount, (name, calls)
        else:
            assert fit["budget"]["max_tokens"] == amount
            assert 0.5 * amount < tokens <= 1.1 * amount, (name, tokens)
    # One configured step would have spent far less than the matched budget.
    assert len({h["step"] for h in by["opro"].fit["history"]}) > 2
    assert by["cot"].fit["budget"] == {"max_metric_calls": None, "max_llm_requests": None, "max_tokens": None,
                                       "exhaust": False}
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    word = "target calls" if unit == "target_calls" else "tokens"
    assert f"**Budget-matched**: every optimising method had {amount} {word}" in md
    for name in ("textgrad", "opro", "gepa"):
        assert f"| {name} |" in md
    assert md.count(f"≤{amount} {word}, spend all") == 3


def test_budget_match_config_errors():
    from trprompt.config import ConfigError as CE
    from trprompt.experiments.compare.config import parse_budget_flag

    with pytest.raises(CE, match="use target_calls=N or tokens=N"):
        parse_budget_flag("calls=3")
    path = ROOT / "configs" / "compare-svamp.yaml"
    with pytest.raises(CE, match="compare.budget_match: set exactly one"):
        load_compare_config(path, ["compare.budget_match={target_calls: 3, tokens: 4}"])
    with pytest.raises(CE, match="compare.budget_match.target_calls must be a positive integer"):
        load_compare_config(path, ["compare.budget_match.target_calls=0"])
    with pytest.raises(CE, match="cannot be combined"):
        load_compare_config(path, ["compare.budget_match.target_calls=5",
                                   "compare.budgets={opro: {max_metric_calls: 3}}"])
