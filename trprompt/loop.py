"""Algorithm 1 of TRPrompt: synthetic set -> SFT -> optimal-reward search, K times.

:meth:`TRPromptTrainer.run` reads like the paper's Algorithm 1; each stage is one method:

* :meth:`~TRPromptTrainer.validate`: validation accuracy of the current Π(·, t*);
* :meth:`~TRPromptTrainer.synthetic_set`: step 1, {(q, critique, p)} (:mod:`trprompt.synthetic_set`);
* :meth:`~TRPromptTrainer.sft`: step 2, LoRA SFT of Π (an :class:`SFTRunner`);
* :meth:`~TRPromptTrainer.reward_search`: step 3, TextGrad over t* (:mod:`trprompt.reward_search`);
* :meth:`~TRPromptTrainer.test_stage`: the best Π(·, t*) and the baselines on the test split.

This module has no Ray imports. Engines come in through the engine protocol (a
local engine or a pool of Ray actors look the same), SFT through an
:class:`SFTRunner` callable (in-process or Ray Train), and dashboard metrics
through :class:`LoopHooks`.

Every stage writes its artifact atomically into the run directory (layout:
:mod:`trprompt.run_dir`) together with the fingerprint of exactly the settings it
depends on; :mod:`trprompt.stages` decides whether a stored stage is reused, and
:meth:`TRPromptTrainer.stage_plan` says what a run would reuse and recompute, and why
(``jobs/train.py --dry-run``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trprompt import artifacts
from trprompt.config import TRPromptConfig, dump_config
from trprompt.data import Problem, load_split, task_from_config
from trprompt.engines.base import Engine, Usage
from trprompt.engines.wrappers import Budget, MeteredEngine
from trprompt.evaluation import EvalResult, evaluate, row_score
from trprompt.fingerprint import fingerprint
from trprompt.policies import QueryAwarePolicy, fixed_policy
from trprompt.roles import ROLES
from trprompt.run_dir import (
    BestRecord,
    HistoryEntry,
    IterationMetrics,
    RunPaths,
    adapter_id,
    read_optimal_reward,
    read_synthetic_set,
    write_templates,
)
from trprompt.stages import StageDecision, StageKey, StagePlan
from trprompt.synthetic_set import generate_synthetic_set, sample_questions
from trprompt.templates import Templates, load_templates

__all__ = ["LoopHooks", "PolicyState", "RunSummary", "SFTRunner", "StageDecision", "StageKey", "TRPromptTrainer"]

log = logging.getLogger("trprompt.loop")


class SFTRunner(Protocol):
    """Runs one LoRA SFT stage; returns its metrics (in-process or on Ray Train)."""

    def __call__(
        self,
        examples: list[Any],
        base_model: str,
        out_dir: str,
        cfg: Any,
        templates: Templates,
        init_adapter: str | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Train and save a LoRA adapter at ``out_dir``."""
        ...


class LoopHooks:
    """Callbacks for progress reporting (e.g. Ray dashboard metrics). All no-ops here."""

    def stage(self, iteration: int, name: str) -> None:
        """A stage starts."""

    def synthetic_accuracy(self, iteration: int, accuracy: float) -> None:
        """Target accuracy on the synthetic set of ``iteration``."""

    def validation_accuracy(self, iteration: int, accuracy: float, phase: str) -> None:
        """Validation accuracy after ``phase`` (initial, sft, reward_search)."""

    def usage(self, role: str, delta: Usage) -> None:
        """Tokens/calls spent by ``role`` since the last report."""


@dataclass
class RunSummary:
    """The outcome of a run: what callers need without re-reading the run directory.

    ``adapter_path`` is absolute (None for the base prompt model); ``history`` holds
    every validation evaluation; ``stages`` says which stages this invocation reused or
    recomputed (and why).
    """

    run_dir: str
    best_iteration: int
    best_val_accuracy: float
    optimal_reward: str
    adapter_path: str | None
    adapter_id: str | None = None
    best_phase: str = "initial"
    history: list[HistoryEntry] = field(default_factory=list)
    test: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    stages: list[StageDecision] = field(default_factory=list)

    @property
    def recomputed(self) -> list[str]:
        """Names of the stages this invocation computed."""
        return [s.name for s in self.stages if not s.reuse]


@dataclass
class PolicyState:
    """The loop's current Π(·, t*): the optimal reward t* and the LoRA adapter, with the stages that made them.

    ``*_src`` name the producing stage (:mod:`trprompt.stages`); ``adapter_path`` is absolute
    or relative to the working folder, as the SFT stage returned it.
    """

    optimal_reward: str
    optimal_reward_src: str
    adapter: str | None = None
    adapter_path: str | None = None
    adapter_src: str | None = None


class TRPromptTrainer:
    """Runs Algorithm 1 for one config.

    Every stage's marker records the fingerprint of exactly the settings it depends on
    (see :mod:`trprompt.stages`); on resume a stage is reused only when its fingerprint is
    unchanged and no stage it depends on was recomputed.

    Args:
        cfg: the validated run config.
        engines: one engine per role (``prompt_model``, ``target_model``, ``reward_model``,
            ``optimizer_model``); several roles may share one object.
        sft_runner: trains the prompt model's LoRA adapter.
        base_model_path: local folder of the prompt model's base weights (for SFT).
        hooks: progress callbacks.
        progress: show progress bars.

    """

    def __init__(
        self,
        cfg: TRPromptConfig,
        engines: dict[str, Engine] | None,
        sft_runner: SFTRunner | None,
        base_model_path: str,
        hooks: LoopHooks | None = None,
        progress: bool = True,
    ) -> None:
        from trprompt.engines.dtype import resolve_config_dtypes

        self.cfg = cfg
        # What dtype "auto" means on this machine, recorded in config.yaml; resolved before any stage
        # fingerprint is computed, so the plan (--dry-run) and the run agree.
        m = cfg.models
        resolve_config_dtypes([m.prompt_model, m.target_model, m.reward_model, m.optimizer_model], cfg.sft)
        self.run_dir = Path(cfg.run_dir)
        self.paths = RunPaths(self.run_dir)
        self.task = task_from_config(cfg)
        self.templates = load_templates(cfg.templates_file, self.task)
        self.stages = StagePlan(cfg, self.paths, self.templates, self.initial_optimal_reward(), say=self._say)
        self.budget = Budget(cfg.budget.max_llm_requests, cfg.budget.max_tokens)
        engines = engines or {}
        missing = [r for r in ROLES if r not in engines]
        if missing and sft_runner is not None:
            raise ValueError(f"engines missing for roles: {missing}")
        self.engines = {r: MeteredEngine(engines[r], role=r, budget=self.budget) for r in ROLES if r in engines}
        self.sft_runner = sft_runner
        self.base_model_path = base_model_path
        self.hooks = hooks or LoopHooks()
        self.progress = progress
        self.stage_seconds: dict[str, float] = {}
        self._reported: dict[str, Usage] = {r: Usage() for r in ROLES}
        self._loaded_adapters: dict[str, str] = {}
        self._graded: dict[tuple[str | None, str | None, str], tuple[str, list[dict[str, Any]]]] = {}
        """Graded validation rows per policy (adapter id, adapter path, t*) seen in this process: validation and the
        reward search send the same requests for the same policy, so neither grades a policy the other has graded."""
        self.chunk = cfg.generation.batch_size
        self.train = load_split(self.task, "train", seed=cfg.seed, limit=cfg.dataset.train_limit,
                                val_fraction=cfg.dataset.val_fraction)
        self.val = load_split(self.task, "val", seed=cfg.seed, limit=cfg.dataset.val_limit,
                              val_fraction=cfg.dataset.val_fraction)

    # ------------------------------------------------------------------ Algorithm 1
    def run(self) -> RunSummary:
        """Run (or resume) all K iterations, pick the best, evaluate on test, write the report."""
        self.stages.invalidate(self.stage_plan())
        self.stages.reset()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        pi = PolicyState(self.initial_optimal_reward(), self.stages.t0_source)
        history = [self.validate(0, "initial", pi)]
        for k in range(1, self.cfg.loop.iterations + 1):
            self._say(f"=== iteration {k}/{self.cfg.loop.iterations} ===")
            rows = self.synthetic_set(k, pi)           # 1. {(q, critique, p)} with p = Π(q, t*_{k-1})
            pi = self.sft(k, rows, pi)                 # 2. LoRA SFT of Π on (q, critique) -> p
            history.append(self.validate(k, "sft", pi))
            pi = self.reward_search(k, pi)             # 3. t*_k: TextGrad, scored on validation accuracy
            history.append(self.validate(k, "reward_search", pi))
            self._write_iteration_metrics(k, rows, history[-2], history[-1])
        return self._finish(history)

    def stage_plan(self) -> list[StageDecision]:
        """What :meth:`run` would reuse and recompute now, and why, without running anything."""
        return self.stages.plan()

    @property
    def decisions(self) -> list[StageDecision]:
        """The reuse decisions taken so far by this invocation (or by the last :meth:`stage_plan`)."""
        return self.stages.decisions

    @property
    def numeric(self) -> bool:
        """The numeric-reward ablation: rewards are "correct"/"incorrect" from training to inference."""
        return not self.cfg.loop.textual_reward

    def initial_optimal_reward(self) -> str:
        """t*_0: the templates' paragraph, or the best numeric reward in the numeric ablation."""
        return self.templates.numeric_reward(True) if self.numeric else self.templates.initial_optimal_reward

    def policy(self, optimal_reward: str, adapter: str | None, name: str = "trprompt") -> QueryAwarePolicy:
        """The query-aware policy Π(·, ``optimal_reward``) with LoRA ``adapter``."""
        return QueryAwarePolicy.for_run(
            self.engines["prompt_model"], self.templates, optimal_reward, self.cfg.generation, self.cfg.seed,
            adapter=adapter, chunk_size=self.chunk, name=name, progress=self.progress,
        )

    # ------------------------------------------------------------------ the stages
    def validate(self, k: int, phase: str, pi: PolicyState) -> HistoryEntry:
        """Validation accuracy of Π(·, t*) with ``pi``'s adapter after ``phase`` of iteration ``k``."""
        key = self.stages.val(k, phase, pi.optimal_reward_src, pi.adapter_src)
        if self.stages.begin(key):
            self.hooks.stage(k, f"val_{phase}")
            policy = self.policy(pi.optimal_reward, pi.adapter)
            graded = self._graded.get(_policy_key(pi))
            if graded is not None:  # this very policy was graded on these questions already (search or validation)
                res = EvalResult(policy.name, self.val[0].dataset, [dict(r) for r in graded[1]])
                self.stage_seconds[f"iter{k}.val_{phase}"] = 0.0
            else:
                res = self._timed(f"iter{k}.val_{phase}", lambda: self._evaluate(policy, self.val))
            artifacts.write_parquet(self.paths.val_rows(k, phase), res.rows)
            artifacts.write_json(key.marker, {**res.summary(), "phase": phase, "optimal_reward": pi.optimal_reward,
                                              "adapter": pi.adapter, "stage": key.record(),
                                              "rows_from": graded[0] if graded is not None else "evaluated"})
            self.hooks.validation_accuracy(k, res.accuracy, phase)
            self._say(f"iteration {k}: validation accuracy ({phase}) = {res.accuracy * 100:.2f}% (n={res.n})"
                      + (f" (the rows {graded[0]} graded for the same policy)" if graded is not None else ""))
            accuracy = res.accuracy
            self._remember(pi, res.rows, f"iter{k}.val_{phase}")
        else:
            accuracy = float(artifacts.read_json(key.marker)["accuracy"])
            rows_path = self.paths.val_rows(k, phase)
            if rows_path.is_file():
                self._remember(pi, artifacts.read_parquet(rows_path), f"iter{k}.val_{phase}")
        return HistoryEntry(k, phase, accuracy, pi.adapter,
                            None if pi.adapter_path is None else self.paths.relative(pi.adapter_path),
                            pi.optimal_reward, self.stages.policy_fingerprint(pi.optimal_reward_src, pi.adapter_src))

    def synthetic_set(self, k: int, pi: PolicyState) -> list[dict[str, Any]]:
        """Step 1: sample N questions; p = Π(q, t*), ŷ = target(q, p), critique = R(p, q, ŷ, y*).

        Rows hold ``critique`` (the per-question reward Π is trained on); in the numeric
        ablation it is "correct"/"incorrect" and no reward model is called.
        """
        key = self.stages.synthetic_set(k, pi.optimal_reward_src, pi.adapter_src)
        path = self.paths.synthetic_set(k)
        if not self.stages.begin(key, path.is_file()):
            return read_synthetic_set(path)
        self.hooks.stage(k, "synthetic_set")
        cfg = self.cfg
        problems = sample_questions(self.train, cfg.loop.synthetic_size, cfg.seed, k)
        rows = self._timed(f"iter{k}.synthetic_set", lambda: generate_synthetic_set(
            self.engines, problems, pi.optimal_reward, pi.adapter, self.templates, cfg.generation, seed=cfg.seed,
            iteration=k, textual_reward=cfg.loop.textual_reward, chunk_size=self.chunk, progress=self.progress,
            say=self._say))
        artifacts.write_parquet(path, rows)
        acc = sum(row_score(r) for r in rows) / max(1, len(rows))  # mean score (float metrics too)
        artifacts.write_json(key.marker, {"iteration": k, "n": len(rows), "accuracy": acc,
                                          "optimal_reward": pi.optimal_reward, "adapter": pi.adapter,
                                          "stage": key.record()})
        self.hooks.synthetic_accuracy(k, acc)
        self._say(f"iteration {k}: synthetic set done, target accuracy {acc * 100:.2f}% on {len(rows)} rows")
        return rows

    def sft(self, k: int, rows: list[dict[str, Any]], pi: PolicyState) -> PolicyState:
        """Step 2: LoRA-fine-tune Π on (q, critique) -> p; returns Π with the new adapter (loaded in the engine)."""
        from trprompt.sft import build_sft_examples

        key = self.stages.sft(k, pi.adapter_src)
        out = self.paths.adapter(k)
        aid = adapter_id(k)
        if self.stages.begin(key, (out / "adapter_config.json").is_file()):
            self.hooks.stage(k, "sft")
            examples = build_sft_examples(rows, only_correct=self.cfg.sft.only_correct)
            if not examples:
                raise RuntimeError(f"iteration {k}: no usable SFT examples in the synthetic set")
            init = pi.adapter_path if self.cfg.sft.continue_from_previous else None
            self._say(f"iteration {k}: SFT on {len(examples)} examples")
            assert self.sft_runner is not None
            metrics = self._timed(
                f"iter{k}.sft",
                lambda: self.sft_runner(examples, self.base_model_path, str(out), self.cfg.sft, self.templates,
                                        init_adapter=init, seed=self.cfg.seed + k),
            )
            metrics = {**metrics, "adapter": aid, "adapter_path": self.paths.relative(out), "stage": key.record()}
            metrics.pop("adapter_dir", None)
            artifacts.write_json(key.marker, metrics)
            brief = {m: metrics[m] for m in ("steps", "examples", "trimmed", "skipped", "first_loss",
                                              "mean_loss_last_epoch", "train_s") if m in metrics}
            self._say(f"iteration {k}: SFT done: {brief} (all metrics in sft_metrics.json)")
        self._ensure_adapter(aid, str(out))
        return dataclasses.replace(pi, adapter=aid, adapter_path=str(out), adapter_src=key.name)

    def reward_search(self, k: int, pi: PolicyState) -> PolicyState:
        """Step 3: TextGrad search for a better t*, every candidate scored on validation; returns Π with t*_k.

        Skipped (t* kept) when ``loop.update_optimal_reward`` is off, when there are no
        steps, and in the numeric ablation, whose optimal reward is already the best
        numeric value.
        """
        key = self.stages.reward_search(k, pi.optimal_reward_src, pi.adapter_src)
        if self.stages.begin(key):
            optimal_reward = self._search_optimal_reward(k, key, pi)
        else:
            optimal_reward = read_optimal_reward(artifacts.read_json(key.marker))
        return dataclasses.replace(pi, optimal_reward=optimal_reward, optimal_reward_src=key.name)

    def _search_optimal_reward(self, k: int, key: StageKey, pi: PolicyState) -> str:
        """The body of :meth:`reward_search`: run (or resume from its trace) the search and store it."""
        from trprompt.reward_search import FanOutRewardScorer, search_optimal_reward

        cfg = self.cfg
        why = ("loop.update_optimal_reward is off" if not cfg.loop.update_optimal_reward
               else "reward_search.steps is 0" if cfg.reward_search.steps == 0
               else "numeric rewards: t* is the best numeric value" if self.numeric else None)
        if why is not None:
            artifacts.write_json(key.marker, {"optimal_reward": pi.optimal_reward, "skipped": True, "why": why,
                                              "trace": [], "stage": key.record()})
            return pi.optimal_reward
        self.hooks.stage(k, "reward_search")
        trace_path = self.paths.reward_search_trace(k)
        meta = self.paths.reward_search_trace_meta(k)
        start_trace: list[dict[str, Any]] = []
        if trace_path.exists() and meta.is_file() and \
                artifacts.read_json(meta).get("fingerprint") == key.fingerprint:
            start_trace = [json.loads(line) for line in trace_path.read_text().splitlines() if line.strip()]
        else:
            trace_path.unlink(missing_ok=True)
            artifacts.write_json(meta, {"fingerprint": key.fingerprint})
        trace = list(start_trace)

        def on_candidate(row: dict[str, Any]) -> None:
            trace.append(row)
            artifacts.write_jsonl(trace_path, trace)

        val = self.val[: cfg.reward_search.val_questions]
        scorer = FanOutRewardScorer(self.engines["prompt_model"], self.engines["target_model"],
                                    self.engines["reward_model"], val, self.templates, cfg.generation,
                                    adapter=pi.adapter, seed=cfg.seed)
        graded = self._graded.get(_policy_key(pi))
        if graded is not None:  # validation graded the incumbent t* with this adapter: same requests, reuse them
            scorer.restore(pi.optimal_reward, graded[1][: len(val)])
        self._say(f"iteration {k}: optimal-reward search, {cfg.reward_search.steps} steps x "
                  f"{cfg.reward_search.candidates_per_step} candidates on {len(val)} questions")
        res = self._timed(
            f"iter{k}.reward_search",
            lambda: search_optimal_reward(pi.optimal_reward, scorer, self.engines["optimizer_model"],
                                          cfg.reward_search, self.templates, on_candidate=on_candidate,
                                          progress=self.progress, start_trace=start_trace, seed=cfg.seed * 1_000 + k),
        )
        if scorer.rows_scored(res.optimal_reward) == len(self.val) == len(val):
            self._remember(dataclasses.replace(pi, optimal_reward=res.optimal_reward), scorer.rows(res.optimal_reward),
                           f"iter{k}.reward_search")
        artifacts.write_text(self.paths.optimal_reward_text(k), res.optimal_reward + "\n")
        artifacts.write_json(key.marker, {
            "optimal_reward": res.optimal_reward,
            "best_accuracy": res.best_accuracy,
            "initial_accuracy": res.initial_accuracy,
            "steps_run": res.steps_run,
            "trace": res.trace,
            "stage": key.record(),
        })
        self._say(f"iteration {k}: reward search: {res.initial_accuracy * 100:.2f}% -> {res.best_accuracy * 100:.2f}%")
        return res.optimal_reward

    def test_stage(self, best: HistoryEntry | str, adapter: str | None = None) -> dict[str, dict[str, Any]]:
        """Evaluate the best policy and the baselines on the same test questions.

        Each summary records its fingerprint (test split and size, target model, templates,
        grader version and, for TRPrompt, the best policy's); a summary whose fingerprint
        differs is recomputed, never returned.
        """
        if isinstance(best, str):  # older call style: (optimal_reward, adapter)
            best = HistoryEntry(-1, "given", None, adapter, None, best, fingerprint([best, adapter]))
        problems = load_split(self.task, "test", seed=self.cfg.seed, limit=self.cfg.dataset.test_limit)
        policies: list[Any] = [fixed_policy(b, self.templates) for b in self.cfg.eval.baselines]
        policies.append(self.policy(best.optimal_reward, best.adapter))
        out: dict[str, dict[str, Any]] = {}
        for pol in policies:
            key = self.stages.test(pol.name, best if pol.name == "trprompt" else None)
            if not self.stages.begin(key, self.paths.test_rows(pol.name).is_file()):
                out[pol.name] = {k: v for k, v in artifacts.read_json(key.marker).items() if k != "stage"}
                continue
            self.hooks.stage(-1, f"test_{pol.name}")
            self._say(f"test: {pol.name} on {len(problems)} questions")
            res = self._timed(f"test.{pol.name}", lambda pol=pol: self._evaluate(pol, problems))
            artifacts.write_parquet(self.paths.test_rows(pol.name), res.rows)
            artifacts.write_json(key.marker, {**res.summary(), "stage": key.record()})
            out[pol.name] = res.summary()
            self._say(res.summary_line())
        return out

    # ------------------------------------------------------------------ bookkeeping
    def _finish(self, history: list[HistoryEntry]) -> RunSummary:
        """Pick the best validation entry (``best.json``), run the test stage, write usage, stages and the report."""
        record = BestRecord.from_history(history)
        record.write(self.paths)
        best = record.best
        self._say(f"best: iteration {best.iteration} ({best.phase}), validation {(best.accuracy or 0) * 100:.2f}%")
        abs_adapter = None if best.adapter is None else str(self.paths.adapter(best.iteration).absolute())
        summary = RunSummary(str(self.run_dir), best.iteration, float(best.accuracy or 0.0), best.optimal_reward,
                             abs_adapter, adapter_id=best.adapter, best_phase=best.phase, history=history)
        if self.cfg.eval.run_test:
            self._ensure_adapter(best.adapter, abs_adapter)
            summary.test = self.test_stage(best)
        summary.stage_seconds = dict(self.stage_seconds)
        summary.usage = {r: e.usage.as_dict() for r, e in self.engines.items()}
        summary.stages = list(self.decisions)
        artifacts.write_json(self.paths.usage, summary.usage)
        artifacts.write_json(self.run_dir / "stages.json", [dataclasses.asdict(d) for d in self.decisions])
        from trprompt.report import write_run_report

        write_run_report(self.run_dir, history, summary)
        return summary

    def _write_iteration_metrics(self, k: int, rows: list[dict[str, Any]], after_sft: HistoryEntry,
                                 after_search: HistoryEntry) -> None:
        IterationMetrics(
            iteration=k,
            synthetic_accuracy=sum(row_score(r) for r in rows) / max(1, len(rows)),
            val_after_sft=after_sft.accuracy,
            val_after_reward_search=after_search.accuracy,
            stage_seconds={s: v for s, v in self.stage_seconds.items() if s.startswith(f"iter{k}.")},
        ).write(self.paths)

    def _write_config(self) -> None:
        path = self.paths.config
        text = dump_config(self.cfg)
        if path.exists() and path.read_text() != text:
            old = path.read_text()
            artifacts.write_text(self.paths.previous_config, old)
            self._say("config differs from the one this run_dir was started with; stages whose settings changed "
                      "are recomputed (the old config is kept as config.previous.yaml)")
        artifacts.write_text(path, text)
        artifacts.write_json(self.run_dir / "data.json", self.task.data_report())
        write_templates(self.paths, self.templates)

    def _remember(self, pi: PolicyState, rows: Sequence[dict[str, Any]], origin: str) -> None:
        """Keep ``pi``'s graded rows (made by stage ``origin``) if they cover exactly the validation questions."""
        if [r.get("id") for r in rows] == [p.id for p in self.val] and _policy_key(pi) not in self._graded:
            self._graded[_policy_key(pi)] = (origin, [dict(r) for r in rows])

    def _evaluate(self, policy: Any, problems: Sequence[Problem]) -> EvalResult:
        g = self.cfg.generation
        return evaluate(policy, self.engines["target_model"], problems, self.templates, g.target_max_tokens,
                        g.target_temperature, self.chunk, self.progress, seed=self.cfg.seed)

    def _ensure_adapter(self, adapter_id: str | None, path: str | None) -> None:
        """Load (or reload, when retrained) LoRA ``adapter_id`` into the prompt model's engine."""
        if adapter_id is None:
            return
        assert path is not None
        stamp = _adapter_stamp(path)
        if self._loaded_adapters.get(adapter_id) == stamp:
            return
        if adapter_id in self._loaded_adapters:  # retrained in this process: replace the old weights
            self.engines["prompt_model"].unload_adapter(adapter_id)
        self.engines["prompt_model"].load_adapter(adapter_id, path)
        self._loaded_adapters[adapter_id] = stamp

    def _timed(self, key: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.stage_seconds[key] = self.stage_seconds.get(key, 0.0) + time.perf_counter() - t0
            self._report_usage()

    def _report_usage(self) -> None:
        for r, eng in self.engines.items():
            now = eng.usage
            prev = self._reported[r]
            delta = Usage(
                now.calls - prev.calls,
                now.requests - prev.requests,
                now.prompt_tokens - prev.prompt_tokens,
                now.completion_tokens - prev.completion_tokens,
            )
            if delta.calls:
                self.hooks.usage(r, delta)
            self._reported[r] = dataclasses.replace(now)

    def _say(self, msg: str) -> None:
        log.info(msg)
        print(f"[trprompt] {msg}", flush=True)


def _policy_key(pi: PolicyState) -> tuple[str | None, str | None, str]:
    """What decides Π(·, t*)'s outputs within one run: the adapter (id and folder) and t*."""
    return (pi.adapter, pi.adapter_path, pi.optimal_reward)


def _adapter_stamp(path: str) -> str:
    """Changes whenever the adapter folder is rewritten (so a retrained adapter is reloaded)."""
    p = Path(path) / "adapter_config.json"
    try:
        return f"{p.stat().st_mtime_ns}"
    except OSError:
        return "missing"
