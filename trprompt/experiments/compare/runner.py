"""Runs the methods of a comparison side by side: same engines, splits, grader and cost accounting.

Every method optimises on the training/validation split of ``run.dataset`` and is
then evaluated on the test split of ``compare.test_dataset`` with
:func:`trprompt.evaluation.evaluate` on the same target engine. Results are cached
per method under the keys of :mod:`trprompt.experiments.compare.cache`; a re-run
only computes what is missing. :class:`Comparison` is an orchestrator whose
methods are its stages: load the data, fit a method (context, optimise, record),
test a fitted policy (resume, evaluate chunk by chunk, summarise), write the report.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trprompt import artifacts
from trprompt.config import TRPromptConfig
from trprompt.data import Problem, Task, load_split, task_from_config
from trprompt.engines.base import Engine
from trprompt.engines.wrappers import MeteredEngine
from trprompt.evaluation import EvalResult, evaluate
from trprompt.experiments.compare.cache import fit_inputs, test_inputs, why_recomputed
from trprompt.experiments.compare.config import NO_TRAINING, CompareConfig
from trprompt.experiments.compare.report import ComparisonResult, MethodResult, write_report
from trprompt.fingerprint import fingerprint
from trprompt.methods import METHOD_NAMES, make_method
from trprompt.methods.base import MethodContext
from trprompt.policies import PromptPolicy, policy_from_spec, policy_spec
from trprompt.templates import load_templates

log = logging.getLogger("trprompt.compare")

FIT_FILE = "fit.json"
ERROR_FILE = "error.json"


@dataclass
class _TestProgress:
    """A test evaluation under way: rows graded so far, usage and wall time of earlier attempts."""

    rows: list[dict[str, Any]]
    usage_before: dict[str, dict[str, int]]
    wall_s: float


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
        self.templates = load_templates(run.templates_file, task_from_config(run))
        self._train: list[Problem] | None = None
        self._val: list[Problem] | None = None
        if any(m not in NO_TRAINING for m in cmp.methods):
            self._load_optimisation_data()

    # ------------------------------------------------------------------ stage: data
    def _load_optimisation_data(self) -> None:
        """The training and validation splits every optimising method shares."""
        ds = self.run.dataset
        task = task_from_config(self.run)
        self._train = load_split(task, "train", seed=self.run.seed, limit=ds.train_limit,
                                 val_fraction=ds.val_fraction)
        self._val = load_split(task, "val", seed=self.run.seed, limit=ds.val_limit, val_fraction=ds.val_fraction)

    def _task(self, dataset: str) -> str | Task:
        """The run's own task (with its fields, grader, description) for its name; else the name or path."""
        return task_from_config(self.run) if dataset == self.run.dataset.name else dataset

    def _say(self, msg: str) -> None:
        log.info(msg)
        print(f"[compare] {msg}", flush=True)

    # ------------------------------------------------------------------ cache paths
    def method_dir(self, name: str, key: str) -> Path:
        """Where ``name``'s results under ``key`` are cached."""
        return self.run_dir / "methods" / name / key

    def fit_inputs(self, name: str) -> dict[str, Any]:
        """The settings ``name``'s fit depends on (see :mod:`trprompt.experiments.compare.cache`)."""
        return fit_inputs(name, self.run, self.cmp, self.templates)

    def method_key(self, name: str) -> str:
        """The cache key of ``name``'s fit under this comparison's config."""
        return fingerprint(self.fit_inputs(name))

    def _test_path(self, res: MethodResult, dataset: str, limit: int | None) -> Path:
        tkey = fingerprint(test_inputs(self.run, self.templates, dataset, limit))
        stem = f"{dataset}-{limit if limit is not None else 'all'}-{tkey}"
        return self.method_dir(res.name, res.key) / "test" / f"{stem}.json"

    # ------------------------------------------------------------------ stage: fit
    def fit(self, name: str) -> MethodResult:
        """Fit ``name`` (or load its cached fit)."""
        inputs = self.fit_inputs(name)
        res = MethodResult(name, fingerprint(inputs))
        d = self.method_dir(name, res.key)
        if (d / FIT_FILE).exists():
            res.fit = artifacts.read_json(d / FIT_FILE)
            return res
        changed = why_recomputed(d.parent, inputs)
        if changed:
            self._say(f"{name}: earlier fit not reused, changed: {', '.join(changed)}")
        method = make_method(name, self.templates, self.cmp.settings_for(name))
        ctx = self._fit_context(name, d)
        self._say(f"{name}: optimising (budget {ctx.budget})")
        t0 = time.perf_counter()
        try:
            policy = method.fit(ctx)
        except Exception as e:  # one failing method must not sink the comparison
            self._record_failure(res, ctx, e, time.perf_counter() - t0)
            return res
        self._record_fit(res, inputs, method.settings(), ctx, policy, time.perf_counter() - t0)
        return res

    def _fit_context(self, name: str, method_dir: Path) -> MethodContext:
        """Fresh meters on the shared engines, the shared splits and ``name``'s budget."""
        return MethodContext.create(
            self.engines, train=self._train or [], val=self._val or [], templates=self.templates,
            generation=self.run.generation, budget=self.cmp.budget_for(name), seed=self.run.seed,
            work_dir=method_dir / "work", run_config=self.run, sft_runner=self.sft_runner,
            base_model_path=self.base_model_path, progress=self.progress,
        )

    def _record_failure(self, res: MethodResult, ctx: MethodContext, err: Exception, wall_s: float) -> None:
        """Keep what a failed fit spent in ``error.json`` (never cached as a fit: the next run retries)."""
        log.exception("%s failed", res.name, exc_info=err)
        res.error = f"{type(err).__name__}: {err}"
        res.fit = {"usage": ctx.usage(), "history": ctx.history, "wall_s": wall_s}
        artifacts.write_json(self.method_dir(res.name, res.key) / ERROR_FILE, {"error": res.error, **res.fit})

    def _record_fit(self, res: MethodResult, inputs: Mapping[str, Any], settings: Mapping[str, Any],
                    ctx: MethodContext, policy: PromptPolicy, wall_s: float) -> None:
        """Save the fitted policy, its validation history, its spending and its inputs as ``fit.json``."""
        res.fit = {
            "method": res.name,
            "key": res.key,
            "inputs": dict(inputs),
            "settings": dict(settings),
            "budget": dataclasses.asdict(ctx.budget),
            "policy": policy_spec(policy),
            "history": ctx.history,
            "usage": ctx.usage(),
            "metric_calls": ctx.metric_calls,
            "llm_requests": ctx.llm_requests,
            "wall_s": wall_s,
        }
        artifacts.write_json(self.method_dir(res.name, res.key) / FIT_FILE, res.fit)
        res.computed.append("fit")
        self._say(f"{res.name}: fitted in {wall_s:.1f} s, {ctx.llm_requests} LLM requests, "
                  f"{ctx.metric_calls} metric calls")

    def cached(self, name: str, test_sets: Sequence[tuple[str, int | None]]) -> MethodResult | None:
        """``name``'s result if its fit and its main test evaluation are cached (computes nothing), else None."""
        key = self.method_key(name)
        path = self.method_dir(name, key) / FIT_FILE
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

    # ------------------------------------------------------------------ stage: test
    def test(self, res: MethodResult, dataset: str, limit: int | None) -> dict[str, Any]:
        """Evaluate ``res``'s fitted policy on ``dataset``'s test split (or load the cached result)."""
        assert res.fit is not None and "policy" in res.fit
        path = self._test_path(res, dataset, limit)
        if path.exists():
            out = artifacts.read_json(path)
            res.tests[dataset] = out
            return out
        prompt = MeteredEngine(self.engines["prompt_model"], role="prompt_model")
        target = MeteredEngine(self.engines["target_model"], role="target_model")
        g = self.run.generation
        policy = policy_from_spec(res.fit["policy"], prompt, self.templates, g.batch_size, self.progress)
        problems = load_split(self._task(dataset), "test", seed=self.run.seed, limit=limit)
        partial_path = path.with_name(path.stem + ".partial.json")
        state = self._resume_test(partial_path, problems)
        self._say(f"{res.name}: test on {len(problems)} {dataset} questions"
                  + (f" ({len(state.rows)} done before)" if state.rows else ""))

        def usage_now() -> dict[str, dict[str, int]]:
            now = {"prompt_model": prompt.usage.as_dict(), "target_model": target.usage.as_dict()}
            return {role: {k: v + state.usage_before.get(role, {}).get(k, 0) for k, v in u.items()}
                    for role, u in now.items()}

        self._evaluate_chunks(res.name, dataset, policy, target, problems, state, partial_path, usage_now)
        out = self._save_test(res, dataset, limit, path, state, usage_now())
        partial_path.unlink(missing_ok=True)
        return out

    @staticmethod
    def _resume_test(partial_path: Path, problems: Sequence[Problem]) -> _TestProgress:
        """The checkpoint of an interrupted evaluation of the same questions, else an empty start."""
        if partial_path.exists():
            saved = artifacts.read_json(partial_path)
            if [r["id"] for r in saved["rows"]] == [p.id for p in problems[: len(saved["rows"])]]:
                return _TestProgress(list(saved["rows"]), dict(saved["usage"]), float(saved["wall_s"]))
        return _TestProgress([], {}, 0.0)

    def _evaluate_chunks(self, name: str, dataset: str, policy: PromptPolicy, target: Engine,
                         problems: Sequence[Problem], state: _TestProgress, partial_path: Path,
                         usage_now: Any) -> None:
        """Evaluate the remaining questions chunk by chunk, checkpointing each finished chunk."""
        g = self.run.generation
        for start in range(len(state.rows), len(problems), self.cmp.test_chunk):
            part = evaluate(policy, target, problems[start : start + self.cmp.test_chunk], self.templates,
                            g.target_max_tokens, g.target_temperature, g.batch_size, self.progress,
                            seed=self.run.seed)
            state.rows.extend(part.rows)
            state.wall_s += part.wall_s
            if len(state.rows) < len(problems):
                artifacts.write_json(partial_path, {"rows": state.rows, "usage": usage_now(), "wall_s": state.wall_s})
                self._say(f"{name}: {len(state.rows)}/{len(problems)} {dataset} test questions done "
                          f"({sum(r['correct'] for r in state.rows)} correct, {state.wall_s:.0f} s)")

    def _save_test(self, res: MethodResult, dataset: str, limit: int | None, path: Path, state: _TestProgress,
                   usage: dict[str, dict[str, int]]) -> dict[str, Any]:
        """Write the graded rows (parquet) and the summary with its cost per question (JSON)."""
        ev = EvalResult(res.name, dataset, state.rows, wall_s=state.wall_s)
        n = max(1, ev.n)
        requests = sum(u["requests"] for u in usage.values())
        tokens = sum(u["total_tokens"] for u in usage.values())
        out = {**ev.summary(), "method": res.name, "usage": usage, "requests_per_question": requests / n,
               "tokens_per_question": tokens / n, "fit_key": res.key,
               "inputs": test_inputs(self.run, self.templates, dataset, limit)}
        artifacts.write_parquet(path.with_suffix(".parquet"), ev.rows)
        artifacts.write_json(path, out)
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
        test_sets = [(main_set, main_limit), *(self.cmp.transfer_sets(self.run) if transfer else [])]
        results = []
        for name in self.cmp.methods + [m for m in names if m not in self.cmp.methods]:
            if name not in names:  # not asked for this time: report it only if it is fully cached
                cached = self.cached(name, test_sets)
                if cached is not None:
                    results.append(cached)
                continue
            results.append(self._fit_and_test(name, test_sets))
        out = ComparisonResult(self.run_dir, main_set, results, [d for d, _ in test_sets[1:]])
        write_report(out, self.run, self.cmp, plots=self.cmp.plots)
        return out

    def _fit_and_test(self, name: str, test_sets: Sequence[tuple[str, int | None]]) -> MethodResult:
        """Fit ``name``, then evaluate it on every test set (a failing test is recorded, not raised)."""
        res = self.fit(name)
        if res.error is None:
            for ds, lim in test_sets:
                try:
                    self.test(res, ds, lim)
                except Exception as e:
                    log.exception("%s: test on %s failed", name, ds)
                    res.error = f"test on {ds}: {type(e).__name__}: {e}"
        return res
