"""Baselines, ablations and TRPrompt side by side: same engines, splits, grader and cost accounting.

A comparison config is a YAML file with two sections::

    run:      # an ordinary TRPrompt run config (models, dataset, generation, loop, sft, ...)
      ...
    compare:  # what to compare and how much each method may spend (:class:`CompareConfig`)
      methods: [plain, cot, textgrad, opro, gepa, trprompt]
      ...

so :func:`trprompt.config.load_config` keeps working on plain run configs. Every
method optimises on the training/validation split of ``run.dataset`` (SVAMP has
no training split: optimise on GSM8K and set ``compare.test_dataset: svamp``) and
is then evaluated on the test split of ``compare.test_dataset`` with
:func:`trprompt.evaluation.evaluate` on the same target engine.

Budgets: ``compare.budget`` caps each task-level optimiser (textgrad, opro, gepa)
in metric calls (target requests) and LLM requests; ``compare.budgets.<method>``
overrides it per method. The TRPrompt variants spend what their loop config asks
for (``run.loop``, ``run.reward_search``), capped only by ``compare.budgets`` if
given; the report shows what every method really spent.

Caching: each method's results live in ``<run_dir>/methods/<method>/<key>/``
where ``key`` hashes everything its fit depends on (method settings, budget,
seed, data set and split sizes, models, generation settings, templates and, for
TRPrompt, the loop/SFT/reward-search config); placement and speed knobs
(:data:`PLACEMENT_FIELDS`, the request batch size) are left out. ``fit.json`` holds the fitted
policy, its validation history and its spending; ``test/<dataset>-<n>.json`` each
test evaluation. A re-run only computes what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trprompt import artifacts
from trprompt.config import DATASETS, ConfigError, TRPromptConfig, _build, apply_override, config_from_dict
from trprompt.data import Problem, load_split
from trprompt.engines.base import Engine, MeteredEngine
from trprompt.evaluation import EvalResult, evaluate
from trprompt.methods import METHOD_NAMES, TRPROMPT_NAMES, make_method
from trprompt.methods.base import MethodBudget, MethodContext, policy_from_spec, policy_spec
from trprompt.methods.gepa_method import GEPASettings
from trprompt.methods.opro import OPROSettings
from trprompt.methods.textgrad_task import TextGradSettings
from trprompt.templates import TEMPLATES_VERSION, Templates, load_templates

log = logging.getLogger("trprompt.compare")

NO_TRAINING = ("plain", "cot")
"""Methods that need no training data."""


@dataclass
class BudgetSettings:
    """A method's spending cap while it optimises (``None``: no cap)."""

    max_metric_calls: int | None = None
    max_llm_requests: int | None = None

    def validate(self, path: str) -> None:
        """Raise ConfigError for values out of range."""
        for k in ("max_metric_calls", "max_llm_requests"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"{path}.{k} must be >= 1 or null, got {v}")

    def as_budget(self) -> MethodBudget:
        """The :class:`MethodBudget` the meters enforce."""
        return MethodBudget(self.max_metric_calls, self.max_llm_requests)


@dataclass
class CompareConfig:
    """The ``compare:`` section of a comparison config."""

    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    """Methods to run, in report order."""
    test_dataset: str | None = None
    """Data set whose test split every method is evaluated on (``None``: ``run.dataset.name``)."""
    test_limit: int | None = None
    """Test questions (``None``: ``run.dataset.test_limit``)."""
    transfer_datasets: list[str] | None = None
    """``--transfer``: other test sets each trained policy is evaluated on (``None``: all the others)."""
    transfer_limit: int | None = None
    """Questions per transfer test set (``None``: ``test_limit``)."""
    budget: BudgetSettings = field(default_factory=lambda: BudgetSettings(max_metric_calls=400))
    """Default cap of textgrad, opro and gepa."""
    budgets: dict[str, BudgetSettings] = field(default_factory=dict)
    """Per-method caps (any method, TRPrompt variants included)."""
    textgrad: TextGradSettings = field(default_factory=TextGradSettings)
    opro: OPROSettings = field(default_factory=OPROSettings)
    gepa: GEPASettings = field(default_factory=GEPASettings)
    test_chunk: int = 16
    """Test questions evaluated per chunk; finished chunks are checkpointed (an interrupted test resumes)."""
    plots: bool = True
    """Write the PNG plots."""

    def validate(self, run: TRPromptConfig) -> CompareConfig:
        """Check every field against the run config; raise ConfigError naming the first bad one."""
        if not self.methods:
            raise ConfigError("compare.methods must not be empty")
        for i, m in enumerate(self.methods):
            if m not in METHOD_NAMES:
                raise ConfigError(f"compare.methods[{i}]: unknown method {m!r}; choose from {', '.join(METHOD_NAMES)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("compare.methods lists a method twice")
        for k in ("test_dataset",):
            v = getattr(self, k)
            if v is not None and v not in DATASETS:
                raise ConfigError(f"compare.{k} must be one of {DATASETS}, got {v!r}")
        for i, d in enumerate(self.transfer_datasets or []):
            if d not in DATASETS:
                raise ConfigError(f"compare.transfer_datasets[{i}] must be one of {DATASETS}, got {d!r}")
        for k in ("test_limit", "transfer_limit", "test_chunk"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"compare.{k} must be >= 1 or null, got {v}")
        self.budget.validate("compare.budget")
        for name, b in self.budgets.items():
            if name not in METHOD_NAMES:
                raise ConfigError(f"compare.budgets: unknown method {name!r}")
            b.validate(f"compare.budgets.{name}")
        self.textgrad.validate("compare.textgrad")
        self.opro.validate("compare.opro")
        self.gepa.validate("compare.gepa")
        if run.dataset.name == "svamp" and any(m not in NO_TRAINING for m in self.methods):
            raise ConfigError("run.dataset.name is svamp, which has no training split: optimise on another data set "
                              "(e.g. gsm8k) and set compare.test_dataset: svamp")
        if "gepa" in self.methods and self.budget_for("gepa").max_metric_calls is None:
            raise ConfigError("gepa needs a metric-call budget: set compare.budget.max_metric_calls "
                              "or compare.budgets.gepa.max_metric_calls")
        return self

    def budget_for(self, method: str) -> MethodBudget:
        """The cap ``method`` optimises under (see the module docstring)."""
        if method in self.budgets:
            return self.budgets[method].as_budget()
        if method in TRPROMPT_NAMES or method in NO_TRAINING:
            return MethodBudget()
        return self.budget.as_budget()

    def settings_for(self, method: str) -> Any:
        """The settings object of ``method`` (``None`` for methods without one)."""
        return {"textgrad": self.textgrad, "opro": self.opro, "gepa": self.gepa}.get(method)

    def test_set(self, run: TRPromptConfig) -> tuple[str, int | None]:
        """(data set, limit) of the main test evaluation."""
        limit = self.test_limit if self.test_limit is not None else run.dataset.test_limit
        return self.test_dataset or run.dataset.name, limit

    def transfer_sets(self, run: TRPromptConfig) -> list[tuple[str, int | None]]:
        """(data set, limit) of each transfer evaluation."""
        main, limit = self.test_set(run)
        names = self.transfer_datasets if self.transfer_datasets is not None else [d for d in DATASETS if d != main]
        t_limit = self.transfer_limit if self.transfer_limit is not None else limit
        return [(d, t_limit) for d in names if d != main]


def compare_config_from_dict(data: Mapping[str, Any], run: TRPromptConfig) -> CompareConfig:
    """Build and validate the ``compare:`` section."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"compare must be a mapping, got {type(data).__name__}")
    data = dict(data)
    raw_budgets = data.pop("budgets", None) or {}
    if not isinstance(raw_budgets, Mapping):
        raise ConfigError("compare.budgets must be a mapping of method name to budget")
    cmp = _build(CompareConfig, data, "compare")
    cmp.budgets = {str(k): _build(BudgetSettings, v or {}, f"compare.budgets.{k}") for k, v in raw_budgets.items()}
    return cmp.validate(run)


def load_compare_config(path: str | Path, overrides: Sequence[str] | None = None
                        ) -> tuple[TRPromptConfig, CompareConfig]:
    """Load a comparison YAML (``run:`` + ``compare:``), apply ``run.a.b=v`` / ``compare.a.b=v`` overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a comparison config must be a mapping with 'run' and 'compare'")
    unknown = sorted(set(data) - {"run", "compare"})
    if unknown:
        raise ConfigError(f"unknown top-level key {unknown[0]!r} (a comparison config has 'run' and 'compare')")
    for ov in overrides or []:
        if not (ov.startswith("run.") or ov.startswith("compare.")):
            raise ConfigError(f"override {ov!r} must start with run. or compare.")
        apply_override(data, ov)
    try:
        run = config_from_dict(data.get("run") or {})
    except ConfigError as e:
        raise ConfigError(f"run: {e}") from e
    return run, compare_config_from_dict(data.get("compare") or {}, run)


# ------------------------------------------------------------------ cache keys
PLACEMENT_FIELDS = ("num_actors", "num_cpus", "num_gpus", "threads", "max_batch_size", "timeout_s", "max_retries",
                    "gpu_memory_utilization")
"""Model settings that decide where and how fast an engine runs, not what it answers (left out of cache keys)."""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _models_key(run: TRPromptConfig) -> dict[str, Any]:
    """The models of each role without their placement/performance settings."""
    out: dict[str, Any] = {}
    for role in ("prompt_model", "target_model", "reward_model", "optimizer_model"):
        m = getattr(run.models, role) or run.models.reward_model
        out[role] = {k: v for k, v in dataclasses.asdict(m).items() if k not in PLACEMENT_FIELDS}
    return out


def _generation_key(run: TRPromptConfig) -> dict[str, Any]:
    """Generation settings without the request batch size (it changes speed, not answers)."""
    g = dataclasses.asdict(run.generation)
    g.pop("batch_size", None)
    return g


def method_key(name: str, run: TRPromptConfig, cmp: CompareConfig, templates: Templates) -> str:
    """Hash of everything ``name``'s fit depends on (its results are cached under it)."""
    method = make_method(name, templates, cmp.settings_for(name))
    payload: dict[str, Any] = {"method": name, "settings": method.settings()}
    if name not in NO_TRAINING:
        ds = dataclasses.asdict(run.dataset)
        ds.pop("test_limit", None)
        payload.update({
            "budget": dataclasses.asdict(cmp.budget_for(name)),
            "seed": run.seed,
            "dataset": ds,
            "models": _models_key(run),
            "generation": _generation_key(run),
            "templates": dataclasses.asdict(templates),
        })
    if name in TRPROMPT_NAMES:
        payload.update({k: dataclasses.asdict(getattr(run, k)) for k in ("loop", "sft", "reward_search", "budget")})
        payload["sft"].pop("threads", None)  # speed only
    return _digest(payload)


def _test_key(run: TRPromptConfig, templates: Templates, dataset: str, limit: int | None) -> str:
    """What a test evaluation depends on besides the fitted policy."""
    return _digest({"models": _models_key(run), "generation": _generation_key(run),
                    "templates": dataclasses.asdict(templates), "dataset": dataset, "limit": limit})


# ------------------------------------------------------------------ results
@dataclass
class MethodResult:
    """One method's fit and test evaluations."""

    name: str
    key: str
    fit: dict[str, Any] | None = None
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Test summaries by data set name (the main test set and any transfer sets)."""
    error: str | None = None
    computed: list[str] = field(default_factory=list)
    """What this invocation computed (``fit``, ``test:<dataset>``), the rest came from the cache."""

    def optimisation_totals(self) -> dict[str, int]:
        """Requests and tokens over all roles while fitting."""
        usage = (self.fit or {}).get("usage", {})
        return {k: sum(int(u.get(k, 0)) for u in usage.values())
                for k in ("calls", "requests", "prompt_tokens", "completion_tokens", "total_tokens")}

    def best_val_accuracy(self) -> float | None:
        """The best validation accuracy the method recorded (``None`` without a history)."""
        hist = (self.fit or {}).get("history") or []
        return max((float(h["val_accuracy"]) for h in hist), default=None)


@dataclass
class ComparisonResult:
    """All methods' results plus where the report was written."""

    run_dir: Path
    test_dataset: str
    results: list[MethodResult]
    transfer: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, MethodResult]:
        """Results keyed by method name."""
        return {r.name: r for r in self.results}


class Comparison:
    """Runs the methods of a comparison config on shared engines and writes the report.

    Args:
        run: the TRPrompt run config (models, data set, generation, loop, ...).
        cmp: the ``compare:`` section.
        engines: one engine per role (``prompt_model``, ``target_model``, ``reward_model``,
            ``optimizer_model``), shared by every method; each method gets its own meters.
        sft_runner: LoRA SFT runner for the TRPrompt variants.
        base_model_path: local folder of the prompt model (TRPrompt variants).
        progress: show progress bars.

    """

    def __init__(self, run: TRPromptConfig, cmp: CompareConfig, engines: Mapping[str, Engine],
                 sft_runner: Any = None, base_model_path: str | None = None, progress: bool = False) -> None:
        self.run = run
        self.cmp = cmp
        self.engines = dict(engines)
        self.sft_runner = sft_runner
        self.base_model_path = base_model_path
        self.progress = progress
        self.run_dir = Path(run.run_dir)
        self.templates = load_templates(run.templates_file)
        ds = run.dataset
        self._train: list[Problem] | None = None
        self._val: list[Problem] | None = None
        self._needs_training = any(m not in NO_TRAINING for m in cmp.methods)
        if self._needs_training:
            self._train = load_split(ds.name, "train", seed=run.seed, limit=ds.train_limit,
                                     val_fraction=ds.val_fraction)
            self._val = load_split(ds.name, "val", seed=run.seed, limit=ds.val_limit, val_fraction=ds.val_fraction)

    def _say(self, msg: str) -> None:
        log.info(msg)
        print(f"[compare] {msg}", flush=True)

    def method_dir(self, name: str, key: str) -> Path:
        """Where ``name``'s results under ``key`` are cached."""
        return self.run_dir / "methods" / name / key

    # ------------------------------------------------------------------ fit
    def fit(self, name: str) -> MethodResult:
        """Fit ``name`` (or load its cached fit)."""
        key = method_key(name, self.run, self.cmp, self.templates)
        res = MethodResult(name, key)
        d = self.method_dir(name, key)
        path = d / "fit.json"
        if path.exists():
            res.fit = artifacts.read_json(path)
            return res
        method = make_method(name, self.templates, self.cmp.settings_for(name))
        budget = self.cmp.budget_for(name)
        ctx = MethodContext.create(
            self.engines, train=self._train or [], val=self._val or [], templates=self.templates,
            generation=self.run.generation, budget=budget, seed=self.run.seed, work_dir=d / "work",
            run_config=self.run, sft_runner=self.sft_runner, base_model_path=self.base_model_path,
            progress=self.progress,
        )
        self._say(f"{name}: optimising (budget {budget})")
        t0 = time.perf_counter()
        try:
            policy = method.fit(ctx)
        except Exception as e:  # one failing method must not sink the comparison
            log.exception("%s failed", name)
            res.error = f"{type(e).__name__}: {e}"
            res.fit = {"usage": ctx.usage(), "history": ctx.history, "wall_s": time.perf_counter() - t0}
            artifacts.write_json(d / "error.json", {"error": res.error, **res.fit})
            return res
        res.fit = {
            "method": name,
            "key": key,
            "settings": method.settings(),
            "budget": dataclasses.asdict(budget),
            "policy": policy_spec(policy),
            "history": ctx.history,
            "usage": ctx.usage(),
            "metric_calls": ctx.metric_calls,
            "llm_requests": ctx.llm_requests,
            "wall_s": time.perf_counter() - t0,
        }
        artifacts.write_json(path, res.fit)
        res.computed.append("fit")
        self._say(f"{name}: fitted in {res.fit['wall_s']:.1f} s, {ctx.llm_requests} LLM requests, "
                  f"{ctx.metric_calls} metric calls")
        return res

    def cached(self, name: str, test_sets: Sequence[tuple[str, int | None]]) -> MethodResult | None:
        """``name``'s result if its fit and its main test evaluation are cached (computes nothing), else None."""
        key = method_key(name, self.run, self.cmp, self.templates)
        path = self.method_dir(name, key) / "fit.json"
        if not path.exists():
            return None
        res = MethodResult(name, key, fit=artifacts.read_json(path))
        for i, (dataset, limit) in enumerate(test_sets):
            test_path = self._test_path(res, dataset, limit)
            if test_path.exists():
                res.tests[dataset] = artifacts.read_json(test_path)
            elif i == 0:
                return None
        return res

    def _test_path(self, res: MethodResult, dataset: str, limit: int | None) -> Path:
        tkey = _test_key(self.run, self.templates, dataset, limit)
        stem = f"{dataset}-{limit if limit is not None else 'all'}-{tkey}"
        return self.method_dir(res.name, res.key) / "test" / f"{stem}.json"

    # ------------------------------------------------------------------ test
    def test(self, res: MethodResult, dataset: str, limit: int | None) -> dict[str, Any]:
        """Evaluate ``res``'s fitted policy on ``dataset``'s test split (or load the cached result)."""
        assert res.fit is not None and "policy" in res.fit
        path = self._test_path(res, dataset, limit)
        if path.exists():
            out = artifacts.read_json(path)
            res.tests[dataset] = out
            return out
        g = self.run.generation
        prompt = MeteredEngine(self.engines["prompt_model"], role="prompt_model")
        target = MeteredEngine(self.engines["target_model"], role="target_model")
        policy = policy_from_spec(res.fit["policy"], prompt, self.templates, g.batch_size, self.progress)
        problems = load_split(dataset, "test", seed=self.run.seed, limit=limit)
        # Finished chunks are checkpointed, so an interrupted evaluation resumes where it stopped.
        partial_path = path.with_name(path.stem + ".partial.json")
        rows: list[dict[str, Any]] = []
        before: dict[str, dict[str, int]] = {}
        wall = 0.0
        if partial_path.exists():
            saved = artifacts.read_json(partial_path)
            if [r["id"] for r in saved["rows"]] == [p.id for p in problems[: len(saved["rows"])]]:
                rows, before, wall = list(saved["rows"]), dict(saved["usage"]), float(saved["wall_s"])
        self._say(f"{res.name}: test on {len(problems)} {dataset} questions"
                  + (f" ({len(rows)} done before)" if rows else ""))

        def usage_now() -> dict[str, dict[str, int]]:
            now = {"prompt_model": prompt.usage.as_dict(), "target_model": target.usage.as_dict()}
            return {role: {k: v + before.get(role, {}).get(k, 0) for k, v in u.items()} for role, u in now.items()}

        for start in range(len(rows), len(problems), self.cmp.test_chunk):
            part = evaluate(policy, target, problems[start : start + self.cmp.test_chunk], self.templates,
                            g.target_max_tokens, g.target_temperature, g.batch_size, self.progress)
            rows.extend(part.rows)
            wall += part.wall_s
            if len(rows) < len(problems):
                artifacts.write_json(partial_path, {"rows": rows, "usage": usage_now(), "wall_s": wall})
                self._say(f"{res.name}: {len(rows)}/{len(problems)} {dataset} test questions done "
                          f"({sum(r['correct'] for r in rows)} correct, {wall:.0f} s)")
        ev = EvalResult(res.name, dataset, rows, wall_s=wall)
        n = max(1, ev.n)
        usage = usage_now()
        requests = sum(u["requests"] for u in usage.values())
        tokens = sum(u["total_tokens"] for u in usage.values())
        out = {**ev.summary(), "method": res.name, "usage": usage, "requests_per_question": requests / n,
               "tokens_per_question": tokens / n}
        artifacts.write_parquet(path.with_suffix(".parquet"), ev.rows)
        artifacts.write_json(path, out)
        partial_path.unlink(missing_ok=True)
        res.tests[dataset] = out
        res.computed.append(f"test:{dataset}")
        self._say(ev.summary_line())
        return out

    # ------------------------------------------------------------------ everything
    def run_all(self, methods: Sequence[str] | None = None, transfer: bool = False) -> ComparisonResult:
        """Fit and test ``methods`` (default: all of ``compare.methods``; cached parts are loaded), write the report.

        Methods of ``compare.methods`` that were not asked for this time still appear in the
        report when their results are fully cached, so a comparison can be built method by method.
        """
        names = list(methods) if methods is not None else list(self.cmp.methods)
        unknown = [m for m in names if m not in METHOD_NAMES]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHOD_NAMES)}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        main_set, main_limit = self.cmp.test_set(self.run)
        transfer_sets = self.cmp.transfer_sets(self.run) if transfer else []
        results = []
        for name in self.cmp.methods + [m for m in names if m not in self.cmp.methods]:
            if name not in names:  # not asked for this time: report it only if it is fully cached
                cached = self.cached(name, [(main_set, main_limit), *transfer_sets])
                if cached is not None:
                    results.append(cached)
                continue
            res = self.fit(name)
            if res.error is None:
                for ds, lim in [(main_set, main_limit), *transfer_sets]:
                    try:
                        self.test(res, ds, lim)
                    except Exception as e:
                        log.exception("%s: test on %s failed", name, ds)
                        res.error = f"test on {ds}: {type(e).__name__}: {e}"
            results.append(res)
        out = ComparisonResult(self.run_dir, main_set, results, [d for d, _ in transfer_sets])
        write_report(out, self.run, self.cmp, plots=self.cmp.plots)
        return out


# ------------------------------------------------------------------ report
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _short(text: str, n: int = 160) -> str:
    t = " ".join(str(text).split())
    t = t.replace("|", "\\|")
    return t if len(t) <= n else t[: n - 1] + "…"


def comparison_rows(result: ComparisonResult) -> list[dict[str, Any]]:
    """One flat row per method with the headline numbers of the report."""
    rows = []
    for r in result.results:
        test = r.tests.get(result.test_dataset) or {}
        tot = r.optimisation_totals()
        rows.append({
            "method": r.name,
            "status": "ok" if r.error is None else f"error: {r.error}",
            "test_accuracy": test.get("accuracy"),
            "ci95_low": test.get("ci95_low"),
            "ci95_high": test.get("ci95_high"),
            "correct": test.get("correct"),
            "n": test.get("n"),
            "best_val_accuracy": r.best_val_accuracy(),
            "opt_llm_requests": tot["requests"],
            "opt_tokens": tot["total_tokens"],
            "opt_metric_calls": (r.fit or {}).get("usage", {}).get("target_model", {}).get("requests", 0),
            "test_requests_per_question": test.get("requests_per_question"),
            "test_tokens_per_question": test.get("tokens_per_question"),
            "fit_wall_s": (r.fit or {}).get("wall_s"),
            "test_wall_s": test.get("wall_s"),
            "cached": not r.computed,
        })
    return rows


def write_report(result: ComparisonResult, run: TRPromptConfig, cmp: CompareConfig, plots: bool = True) -> Path:
    """Write ``comparison.md``, ``comparison.json`` and (with ``plots``) the two PNG plots into the run dir."""
    d = result.run_dir
    rows = comparison_rows(result)
    artifacts.write_json(d / "comparison.json", {"test_dataset": result.test_dataset, "rows": rows,
                                                 "transfer": _transfer_table(result)})
    if plots:
        plot_validation_curves(result, d / "val_accuracy.png")
        plot_accuracy_vs_tokens(rows, d / "test_vs_tokens.png", result.test_dataset)
    lines = [
        f"# Prompt-optimisation comparison on {result.test_dataset}",
        "",
        f"Run directory: `{d}`. Optimisation data: {run.dataset.name} (train {run.dataset.train_limit or 'all'}, "
        f"validation {run.dataset.val_limit or 'all'} questions), seed {run.seed}, templates v{TEMPLATES_VERSION}.",
        f"Target model: `{run.models.target_model.model}` ({run.models.target_model.engine}); "
        f"prompt/reward/optimizer: `{run.models.prompt_model.model}` / `{run.models.reward_model.model}` / "
        f"`{(run.models.optimizer_model or run.models.reward_model).model}`.",
        "",
        "Opt. = spent while optimising (all roles); metric calls = target requests while optimising "
        "(one problem scored under one instruction). Test cost per question counts the prompt model "
        "(query-aware methods) and the target. 95% CI: Wilson interval.",
        "",
        "| method | test acc. (%) | 95% CI | correct/n | best val. acc. (%) | opt. LLM requests | opt. tokens "
        "| opt. metric calls | test requests/q | test tokens/q | fit wall (s) | test wall (s) | status |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ci = "—" if r["ci95_low"] is None else f"{_pct(r['ci95_low'])}–{_pct(r['ci95_high'])}"
        cn = "—" if r["n"] is None else f"{r['correct']}/{r['n']}"
        rq = "—" if r["test_requests_per_question"] is None else f"{r['test_requests_per_question']:.2f}"
        tq = "—" if r["test_tokens_per_question"] is None else f"{r['test_tokens_per_question']:.0f}"
        fw = "—" if r["fit_wall_s"] is None else f"{r['fit_wall_s']:.0f}"
        tw = "—" if r["test_wall_s"] is None else f"{r['test_wall_s']:.0f}"
        status = _short(r["status"], 80) + (" (cached)" if r["cached"] and r["status"] == "ok" else "")
        lines.append(
            f"| {r['method']} | {_pct(r['test_accuracy'])} | {ci} | {cn} | {_pct(r['best_val_accuracy'])} | "
            f"{r['opt_llm_requests']} | {r['opt_tokens']} | {r['opt_metric_calls']} | {rq} | {tq} | {fw} | {tw} | "
            f"{status} |"
        )
    lines += ["", "## Optimisation cost per role", "",
              "| method | role | requests | prompt tokens | completion tokens |", "|---|---|---:|---:|---:|"]
    for r in result.results:
        for role, u in sorted(((r.fit or {}).get("usage") or {}).items()):
            if u.get("requests"):
                lines.append(f"| {r.name} | {role} | {u['requests']} | {u['prompt_tokens']} | "
                             f"{u['completion_tokens']} |")
    lines += ["", "## Budgets and settings", ""]
    for r in result.results:
        fit = r.fit or {}
        lines.append(f"- **{r.name}**: budget {fit.get('budget', '—')}, settings {fit.get('settings', '—')}, "
                     f"cache key `{r.key}`")
    lines += ["", "## What each method found", ""]
    for r in result.results:
        spec = (r.fit or {}).get("policy")
        if spec is None:
            continue
        if spec["kind"] == "fixed":
            lines.append(f"- **{r.name}**: instruction “{_short(spec['instruction'], 400)}”")
        else:
            lines.append(f"- **{r.name}**: query-aware Π with adapter `{spec.get('adapter')}`, "
                         f"t* “{_short(spec['optimal_reward'], 400)}”")
    transfer = _transfer_table(result)
    if result.transfer:
        names = [result.test_dataset, *result.transfer]
        lines += ["", "## Transfer (test accuracy % on other data sets, paper Table 4)", "",
                  "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for method, accs in transfer.items():
            cells = [("—" if accs.get(n) is None else f"{_pct(accs[n]['accuracy'])} (n={accs[n]['n']})")
                     for n in names]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if plots:
        lines += ["", "## Plots", "", "![validation accuracy](val_accuracy.png)", "",
                  "![test accuracy vs optimisation tokens](test_vs_tokens.png)"]
    path = artifacts.write_text(d / "comparison.md", "\n".join(lines) + "\n")
    return path


def _transfer_table(result: ComparisonResult) -> dict[str, dict[str, dict[str, Any] | None]]:
    names = [result.test_dataset, *result.transfer]
    return {r.name: {n: ({"accuracy": r.tests[n]["accuracy"], "n": r.tests[n]["n"]} if n in r.tests else None)
                     for n in names} for r in result.results}


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def plot_validation_curves(result: ComparisonResult, path: str | Path) -> Path:
    """Best validation accuracy so far after each step/iteration, one line per optimising method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.2))
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    drawn = 0
    for r in result.results:
        hist = (r.fit or {}).get("history") or []
        if not hist:
            continue
        last: dict[int, float] = {}
        for h in hist:
            last[int(h["step"])] = 100 * float(h["incumbent_accuracy"])
        steps = sorted(last)
        ax.plot(steps, [last[s] for s in steps], marker=markers[drawn % len(markers)],
                linestyle=styles[drawn % len(styles)], drawstyle="steps-post", label=r.name, alpha=0.85)
        drawn += 1
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step (TextGrad/OPRO), iteration (GEPA, TRPrompt)")
    ax.set_ylabel("best validation accuracy so far (%)")
    ax.set_title("Validation accuracy during optimisation")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    return path


def plot_accuracy_vs_tokens(rows: Sequence[Mapping[str, Any]], path: str | Path, dataset: str) -> Path:
    """Test accuracy (with its 95% CI) against the tokens each method spent optimising."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    drawn = 0
    for i, r in enumerate(rows):
        if r["test_accuracy"] is None:
            continue
        drawn += 1
        x = max(1, int(r["opt_tokens"]))
        y = 100 * r["test_accuracy"]
        err = [[y - 100 * r["ci95_low"]], [100 * r["ci95_high"] - y]]
        ax.errorbar([x], [y], yerr=err, fmt=markers[i % len(markers)], capsize=3, label=r["method"], alpha=0.85)
    ax.set_xscale("log")
    ax.set_xlabel("tokens spent optimising, all roles (log scale; 1 = none)")
    ax.set_ylabel(f"{dataset} test accuracy (%) with 95% CI")
    ax.set_title("Test accuracy vs optimisation cost")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    return path
