"""Algorithm 1 of TRPrompt: synthetic set -> SFT -> optimal-reward search, K times.

This module has no Ray imports. Engines come in through the engine protocol (a
local engine or a pool of Ray actors look the same), SFT through an
:class:`SFTRunner` callable (in-process or Ray Train), and dashboard metrics
through :class:`LoopHooks`.

Every stage writes its artifact atomically into the run directory and is skipped
when that artifact already exists, so re-running with the same ``run_dir``
resumes from the last finished stage.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trprompt import artifacts
from trprompt.config import TRPromptConfig, dump_config
from trprompt.data import Problem, load_split
from trprompt.engines.base import Budget, ChatRequest, Engine, MeteredEngine, SamplingParams, Usage
from trprompt.engines.wrappers import generate_in_chunks
from trprompt.evaluation import EvalResult, answer_and_grade, evaluate
from trprompt.policies import QueryAwarePolicy, clean_instruction, fixed_policy, prompt_model_request
from trprompt.roles import ROLES
from trprompt.templates import TEMPLATES_VERSION, Templates, load_templates

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
class IterationState:
    """What is known about one finished (or partly finished) iteration."""

    k: int
    optimal_reward: str
    adapter: str | None
    adapter_path: str | None = None
    synthetic_accuracy: float | None = None
    val_after_sft: float | None = None
    val_after_search: float | None = None


@dataclass
class RunSummary:
    """The outcome of a run."""

    run_dir: str
    best_iteration: int
    best_val_accuracy: float
    optimal_reward: str
    adapter_path: str | None
    test: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)


class TRPromptTrainer:
    """Runs Algorithm 1 for one config.

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
        engines: dict[str, Engine],
        sft_runner: SFTRunner,
        base_model_path: str,
        hooks: LoopHooks | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.templates = load_templates(cfg.templates_file)
        self.budget = Budget(cfg.budget.max_llm_requests, cfg.budget.max_tokens)
        missing = [r for r in ROLES if r not in engines]
        if missing:
            raise ValueError(f"engines missing for roles: {missing}")
        self.engines = {r: MeteredEngine(engines[r], role=r, budget=self.budget) for r in ROLES}
        self.sft_runner = sft_runner
        self.base_model_path = base_model_path
        self.hooks = hooks or LoopHooks()
        self.progress = progress
        self.stage_seconds: dict[str, float] = {}
        self._reported: dict[str, Usage] = {r: Usage() for r in ROLES}
        self._loaded_adapters: set[str] = set()
        gen = cfg.generation
        self.chunk = gen.batch_size
        self.train = load_split(cfg.dataset.name, "train", seed=cfg.seed, limit=cfg.dataset.train_limit,
                                val_fraction=cfg.dataset.val_fraction)
        self.val = load_split(cfg.dataset.name, "val", seed=cfg.seed, limit=cfg.dataset.val_limit,
                              val_fraction=cfg.dataset.val_fraction)

    # ------------------------------------------------------------------ helpers
    def _dir(self, k: int) -> Path:
        return self.run_dir / f"iter_{k}"

    def _timed(self, key: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.stage_seconds[key] = self.stage_seconds.get(key, 0.0) + time.perf_counter() - t0
            self._report_usage()

    def _report_usage(self) -> None:
        for r in ROLES:
            now = self.engines[r].usage
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

    def _ensure_adapter(self, adapter_id: str | None, path: str | None) -> None:
        if adapter_id is None or adapter_id in self._loaded_adapters:
            return
        assert path is not None
        self.engines["prompt_model"].load_adapter(adapter_id, path)
        self._loaded_adapters.add(adapter_id)

    def policy(self, reward: str, adapter: str | None, name: str = "trprompt") -> QueryAwarePolicy:
        """The query-aware policy Π(·, ``reward``) with LoRA ``adapter``."""
        return QueryAwarePolicy.for_run(
            self.engines["prompt_model"], self.templates, reward, self.cfg.generation, self.cfg.seed,
            adapter=adapter, chunk_size=self.chunk, name=name, progress=self.progress,
        )

    def _evaluate(self, policy: Any, problems: Sequence[Problem]) -> EvalResult:
        g = self.cfg.generation
        return evaluate(policy, self.engines["target_model"], problems, self.templates, g.target_max_tokens,
                        g.target_temperature, self.chunk, self.progress)

    def _val_stage(self, k: int, phase: str, reward: str, adapter: str | None) -> float:
        path = self._dir(k) / f"val_{phase}.json"
        if path.exists():
            return float(artifacts.read_json(path)["accuracy"])
        self.hooks.stage(k, f"val_{phase}")
        res = self._timed(f"iter{k}.val_{phase}", lambda: self._evaluate(self.policy(reward, adapter), self.val))
        artifacts.write_parquet(self._dir(k) / f"val_{phase}.parquet", res.rows)
        artifacts.write_json(path, {**res.summary(), "phase": phase, "optimal_reward": reward, "adapter": adapter})
        self.hooks.validation_accuracy(k, res.accuracy, phase)
        self._say(f"iteration {k}: validation accuracy ({phase}) = {res.accuracy * 100:.2f}% (n={res.n})")
        return res.accuracy

    # ------------------------------------------------------------ the stages
    def synthetic_set(self, k: int, reward: str, adapter: str | None) -> list[dict[str, Any]]:
        """Step 1: sample N questions; p = Π(q, t*), ŷ = target(q, p), t = R(p, q, ŷ, y*)."""
        path = self._dir(k) / "synthetic_set.parquet"
        if path.exists():
            return artifacts.read_parquet(path)
        self.hooks.stage(k, "synthetic_set")
        cfg, g = self.cfg, self.cfg.generation
        rng = random.Random(cfg.seed * 7919 + k)
        n = min(cfg.loop.synthetic_size, len(self.train))
        problems = rng.sample(self.train, n)

        def run() -> list[dict[str, Any]]:
            prompt_reqs = [
                prompt_model_request(
                    self.templates, p.question, reward,
                    SamplingParams(temperature=g.prompt_temperature, max_tokens=g.prompt_max_tokens,
                                   seed=cfg.seed * 100_003 + k * 10_007 + i),
                    adapter=adapter,
                )
                for i, p in enumerate(problems)
            ]
            self._say(f"iteration {k}: synthetic set of {n} questions: prompt model")
            pres = generate_in_chunks(self.engines["prompt_model"], prompt_reqs, self.chunk, "Π(q, t*)",
                                      self.progress)
            instructions = [clean_instruction(r.text) for r in pres]
            self._say(f"iteration {k}: synthetic set: target model")
            rows = answer_and_grade(self.engines["target_model"], problems, instructions, self.templates,
                                    g.target_max_tokens, g.target_temperature, self.chunk, self.progress)
            if cfg.loop.textual_reward:
                self._say(f"iteration {k}: synthetic set: reward model")
                sp = SamplingParams(temperature=g.reward_temperature, max_tokens=g.reward_max_tokens, seed=cfg.seed)
                rreqs = [
                    ChatRequest(self.templates.reward_model_messages(p.question, row["instruction"], row["output"],
                                                                     p.answer), sp)
                    for p, row in zip(problems, rows, strict=True)
                ]
                rres = generate_in_chunks(self.engines["reward_model"], rreqs, self.chunk, "R(p, q, ŷ, y*)",
                                          self.progress)
                rewards = [r.text.strip() for r in rres]
                reward_tokens = [r.completion_tokens for r in rres]
            else:
                rewards = [self.templates.numeric_reward(row["correct"]) for row in rows]
                reward_tokens = [0] * len(rows)
            for row, pr, t, rt in zip(rows, pres, rewards, reward_tokens, strict=True):
                row["reward"] = t
                row["prompt_completion_tokens"] = pr.completion_tokens
                row["reward_completion_tokens"] = rt
                row["iteration"] = k
            return rows

        rows = self._timed(f"iter{k}.synthetic_set", run)
        artifacts.write_parquet(path, rows)
        acc = sum(r["correct"] for r in rows) / max(1, len(rows))
        self.hooks.synthetic_accuracy(k, acc)
        self._say(f"iteration {k}: synthetic set done, target accuracy {acc * 100:.2f}% on {len(rows)} rows")
        return rows

    def sft(self, k: int, rows: list[dict[str, Any]], prev_adapter_path: str | None) -> tuple[str, str]:
        """Step 2: LoRA-fine-tune Π on (q, t) -> p; returns (adapter id, adapter path)."""
        from trprompt.sft import build_sft_examples

        out = self._dir(k) / "adapter"
        metrics_path = self._dir(k) / "sft_metrics.json"
        adapter_id = f"iter{k}"
        if not metrics_path.exists():
            self.hooks.stage(k, "sft")
            examples = build_sft_examples(rows, only_correct=self.cfg.sft.only_correct)
            if not examples:
                raise RuntimeError(f"iteration {k}: no usable SFT examples in the synthetic set")
            init = prev_adapter_path if self.cfg.sft.continue_from_previous else None
            self._say(f"iteration {k}: SFT on {len(examples)} examples")
            metrics = self._timed(
                f"iter{k}.sft",
                lambda: self.sft_runner(examples, self.base_model_path, str(out), self.cfg.sft, self.templates,
                                        init_adapter=init, seed=self.cfg.seed + k),
            )
            artifacts.write_json(metrics_path, metrics)
            brief = {key: metrics[key] for key in ("steps", "examples", "first_loss", "mean_loss_last_epoch", "train_s")
                     if key in metrics}
            self._say(f"iteration {k}: SFT done: {brief} (all metrics in sft_metrics.json)")
        return adapter_id, str(out)

    def reward_search(self, k: int, reward: str, adapter: str | None) -> str:
        """Step 3: TextGrad search for a better t*, every candidate scored on validation."""
        from trprompt.reward_search import FanOutRewardScorer, search_optimal_reward

        d = self._dir(k)
        done = d / "reward_search.json"
        if done.exists():
            return str(artifacts.read_json(done)["best_reward"])
        if not self.cfg.loop.update_optimal_reward or self.cfg.reward_search.steps == 0:
            artifacts.write_json(done, {"best_reward": reward, "skipped": True, "trace": []})
            return reward
        self.hooks.stage(k, "reward_search")
        trace_path = d / "reward_search_trace.jsonl"
        start_trace = []
        if trace_path.exists():
            import json

            start_trace = [json.loads(line) for line in trace_path.read_text().splitlines() if line.strip()]
        trace = list(start_trace)

        def on_candidate(row: dict[str, Any]) -> None:
            trace.append(row)
            artifacts.write_jsonl(trace_path, trace)

        val = self.val[: self.cfg.reward_search.val_questions]
        scorer = FanOutRewardScorer(self.engines["prompt_model"], self.engines["target_model"],
                                    self.engines["reward_model"], val, self.templates, self.cfg.generation,
                                    adapter=adapter)
        self._say(f"iteration {k}: optimal-reward search, {self.cfg.reward_search.steps} steps x "
                  f"{self.cfg.reward_search.candidates_per_step} candidates on {len(val)} questions")
        res = self._timed(
            f"iter{k}.reward_search",
            lambda: search_optimal_reward(reward, scorer, self.engines["optimizer_model"], self.cfg.reward_search,
                                          self.templates, on_candidate=on_candidate, progress=self.progress,
                                          start_trace=start_trace),
        )
        artifacts.write_text(d / "optimal_reward.txt", res.best_reward + "\n")
        artifacts.write_json(done, {
            "best_reward": res.best_reward,
            "best_accuracy": res.best_accuracy,
            "initial_accuracy": res.initial_accuracy,
            "steps_run": res.steps_run,
            "trace": res.trace,
        })
        self._say(f"iteration {k}: reward search: {res.initial_accuracy * 100:.2f}% -> {res.best_accuracy * 100:.2f}%")
        return res.best_reward

    # ------------------------------------------------------------------- run
    def run(self) -> RunSummary:
        """Run (or resume) all K iterations, pick the best, evaluate on test, write the report."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        reward = self.templates.initial_optimal_reward
        adapter: str | None = None
        adapter_path: str | None = None
        history: list[dict[str, Any]] = []
        val0 = self._val_stage(0, "initial", reward, None)
        history.append({"iteration": 0, "phase": "initial", "accuracy": val0, "adapter": None,
                        "adapter_path": None, "optimal_reward": reward})
        for k in range(1, cfg.loop.iterations + 1):
            self._say(f"=== iteration {k}/{cfg.loop.iterations} ===")
            rows = self.synthetic_set(k, reward, adapter)
            adapter, adapter_path = self.sft(k, rows, adapter_path)
            self._ensure_adapter(adapter, adapter_path)
            v_sft = self._val_stage(k, "sft", reward, adapter)
            history.append({"iteration": k, "phase": "sft", "accuracy": v_sft, "adapter": adapter,
                            "adapter_path": adapter_path, "optimal_reward": reward})
            reward = self.reward_search(k, reward, adapter)
            v_rs = self._val_stage(k, "reward_search", reward, adapter)
            history.append({"iteration": k, "phase": "reward_search", "accuracy": v_rs, "adapter": adapter,
                            "adapter_path": adapter_path, "optimal_reward": reward})
            artifacts.write_json(self._dir(k) / "metrics.json", {
                "iteration": k,
                "synthetic_accuracy": sum(r["correct"] for r in rows) / max(1, len(rows)),
                "val_after_sft": v_sft,
                "val_after_reward_search": v_rs,
                "stage_seconds": {s: v for s, v in self.stage_seconds.items() if s.startswith(f"iter{k}.")},
            })
        best = max(history, key=lambda h: (h["accuracy"], h["iteration"]))
        artifacts.write_json(self.run_dir / "best.json", {**best, "history": history})
        self._say(f"best: iteration {best['iteration']} ({best['phase']}), validation {best['accuracy'] * 100:.2f}%")
        summary = RunSummary(str(self.run_dir), best["iteration"], best["accuracy"], best["optimal_reward"],
                             best["adapter_path"])
        if cfg.eval.run_test:
            self._ensure_adapter(best["adapter"], best["adapter_path"])
            summary.test = self.test_stage(best["optimal_reward"], best["adapter"])
        summary.stage_seconds = dict(self.stage_seconds)
        summary.usage = {r: e.usage.as_dict() for r, e in self.engines.items()}
        artifacts.write_json(self.run_dir / "usage.json", summary.usage)
        from trprompt.report import write_run_report

        write_run_report(self.run_dir, history, summary)
        return summary

    def test_stage(self, reward: str, adapter: str | None) -> dict[str, dict[str, Any]]:
        """Evaluate the best policy and the baselines on the same test questions."""
        d = self.run_dir / "test"
        problems = load_split(self.cfg.dataset.name, "test", seed=self.cfg.seed, limit=self.cfg.dataset.test_limit)
        policies: list[Any] = [fixed_policy(b, self.templates) for b in self.cfg.eval.baselines]
        policies.append(self.policy(reward, adapter))
        out: dict[str, dict[str, Any]] = {}
        for pol in policies:
            path = d / f"{pol.name}.json"
            if path.exists():
                out[pol.name] = artifacts.read_json(path)
                continue
            self.hooks.stage(-1, f"test_{pol.name}")
            self._say(f"test: {pol.name} on {len(problems)} questions")
            res = self._timed(f"test.{pol.name}", lambda pol=pol: self._evaluate(pol, problems))
            artifacts.write_parquet(d / f"{pol.name}.parquet", res.rows)
            artifacts.write_json(path, res.summary())
            out[pol.name] = res.summary()
            self._say(res.summary_line())
        return out

    def _write_config(self) -> None:
        path = self.run_dir / "config.yaml"
        text = dump_config(self.cfg)
        if path.exists() and path.read_text() != text:
            old = path.read_text()
            artifacts.write_text(self.run_dir / "config.previous.yaml", old)
            self._say("config differs from the one this run_dir was started with; the old one is kept as "
                      "config.previous.yaml")
        artifacts.write_text(path, text)
        artifacts.write_json(self.run_dir / "templates.json",
                             {"version": TEMPLATES_VERSION, **dataclasses.asdict(self.templates)})
