"""Algorithm 1 of TRPrompt: synthetic set -> SFT -> optimal-reward search, K times.

This module has no Ray imports. Engines come in through the engine protocol (a
local engine or a pool of Ray actors look the same), SFT through an
:class:`SFTRunner` callable (in-process or Ray Train), and dashboard metrics
through :class:`LoopHooks`.

Every stage writes its artifact atomically into the run directory (layout:
:mod:`trprompt.run_dir`) together with the fingerprint of exactly the settings it
depends on. Re-running with the same ``run_dir`` reuses a stage only when its
fingerprint is unchanged and nothing upstream of it was recomputed; otherwise the
stage and everything downstream of it are recomputed, so a changed setting never
returns a stale number. :meth:`TRPromptTrainer.stage_plan` says what a run would
reuse and recompute, and why (``jobs/train.py --dry-run``).
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
from trprompt.data import Problem, load_split, task_from_config
from trprompt.data.tasks import fingerprint_inputs
from trprompt.engines.base import ChatRequest, Engine, SamplingParams, Usage
from trprompt.engines.wrappers import Budget, MeteredEngine, generate_in_chunks
from trprompt.evaluation import EvalResult, answer_and_grade, evaluate, row_score
from trprompt.fingerprint import (
    changed_fields,
    config_fields,
    fingerprint,
    grader_version,
    model_identity,
    text_fingerprint,
)
from trprompt.policies import QueryAwarePolicy, clean_instruction, fixed_policy, prompt_model_request
from trprompt.roles import ROLES
from trprompt.run_dir import (
    BestRecord,
    HistoryEntry,
    IterationMetrics,
    RunPaths,
    adapter_id,
    read_optimal_reward,
    write_templates,
)
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
class StageKey:
    """One stage of a run: where its marker lives, the settings it depends on and their fingerprint.

    ``inputs`` maps dotted setting names (and ``upstream.<stage>`` fingerprints) to values;
    ``deps`` names the stages whose output it consumes.
    """

    name: str
    marker: Path
    inputs: dict[str, Any]
    deps: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        """Hash of ``inputs``."""
        return fingerprint(self.inputs)

    def record(self) -> dict[str, Any]:
        """What the stage's marker stores under ``"stage"``."""
        return {"name": self.name, "fingerprint": self.fingerprint, "inputs": self.inputs}


@dataclass
class StageDecision:
    """Whether a stage is reused or recomputed, and why."""

    name: str
    reuse: bool
    reason: str
    changed: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One human-readable line (what ``--dry-run`` prints)."""
        verdict = "reuse    " if self.reuse else "recompute"
        return f"{verdict} {self.name}: {self.reason}"


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


class TRPromptTrainer:
    """Runs Algorithm 1 for one config.

    Every stage's marker records the fingerprint of exactly the settings it depends on
    (see :meth:`stage_plan`); on resume a stage is reused only when its fingerprint is
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
        self.decisions: list[StageDecision] = []
        self._recomputed: set[str] = set()
        self._planning = False
        self._reported: dict[str, Usage] = {r: Usage() for r in ROLES}
        self._loaded_adapters: dict[str, str] = {}
        gen = cfg.generation
        self.chunk = gen.batch_size
        self.train = load_split(self.task, "train", seed=cfg.seed, limit=cfg.dataset.train_limit,
                                val_fraction=cfg.dataset.val_fraction)
        self.val = load_split(self.task, "val", seed=cfg.seed, limit=cfg.dataset.val_limit,
                              val_fraction=cfg.dataset.val_fraction)

    # ------------------------------------------------------------------ helpers
    def _dir(self, k: int) -> Path:
        return self.paths.iteration(k)

    @property
    def numeric(self) -> bool:
        """The numeric-reward ablation: rewards are "correct"/"incorrect" from training to inference."""
        return not self.cfg.loop.textual_reward

    def initial_optimal_reward(self) -> str:
        """t*_0: the templates' paragraph, or the best numeric reward in the numeric ablation."""
        return self.templates.numeric_reward(True) if self.numeric else self.templates.initial_optimal_reward

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

    def _ensure_adapter(self, adapter_id: str | None, path: str | None) -> None:
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

    def policy(self, optimal_reward: str, adapter: str | None, name: str = "trprompt") -> QueryAwarePolicy:
        """The query-aware policy Π(·, ``optimal_reward``) with LoRA ``adapter``."""
        return QueryAwarePolicy.for_run(
            self.engines["prompt_model"], self.templates, optimal_reward, self.cfg.generation, self.cfg.seed,
            adapter=adapter, chunk_size=self.chunk, name=name, progress=self.progress,
        )

    def _evaluate(self, policy: Any, problems: Sequence[Problem]) -> EvalResult:
        g = self.cfg.generation
        return evaluate(policy, self.engines["target_model"], problems, self.templates, g.target_max_tokens,
                        g.target_temperature, self.chunk, self.progress, seed=self.cfg.seed)

    # ------------------------------------------------------------ fingerprints
    def _common_inputs(self) -> dict[str, Any]:
        return {
            "templates.version": TEMPLATES_VERSION,
            "templates.text": fingerprint(dataclasses.asdict(self.templates)),
            "grader_version": grader_version(),
            "dataset.name": self.cfg.dataset.name,
            **fingerprint_inputs(self.cfg),  # a user's task: its rows, grader, description (none for built-ins)
        }

    def _val_inputs(self) -> dict[str, Any]:
        c = self.cfg
        return {
            **self._common_inputs(),
            "seed": c.seed,
            **config_fields(c, "dataset.val_fraction", "dataset.val_limit", "generation.prompt_eval_temperature",
                            "generation.prompt_max_tokens", "generation.target_temperature",
                            "generation.target_max_tokens"),
            **model_identity(c.models.prompt_model, "models.prompt_model"),
            **model_identity(c.models.target_model, "models.target_model"),
        }

    def key_val(self, k: int, phase: str, optimal_reward_src: str, adapter_src: str | None) -> StageKey:
        """Validation after ``phase`` of iteration ``k`` of Π(·, t*) with the adapter from ``adapter_src``."""
        deps = tuple(d for d in (optimal_reward_src, adapter_src) if d and not d.startswith("t*0"))
        return StageKey(f"iter{k}.val_{phase}", self.paths.val_summary(k, phase),
                        {**self._val_inputs(), "upstream.optimal_reward": self._src_fp(optimal_reward_src),
                         "upstream.adapter": self._src_fp(adapter_src)}, deps)

    def key_synthetic(self, k: int, optimal_reward_src: str, adapter_src: str | None) -> StageKey:
        """Step 1 of iteration ``k``."""
        c = self.cfg
        inputs = {
            **self._common_inputs(),
            "seed": c.seed,
            **config_fields(c, "dataset.val_fraction", "dataset.train_limit", "loop.synthetic_size",
                            "loop.textual_reward", "generation.prompt_temperature", "generation.prompt_max_tokens",
                            "generation.target_temperature", "generation.target_max_tokens"),
            **model_identity(c.models.prompt_model, "models.prompt_model"),
            **model_identity(c.models.target_model, "models.target_model"),
            "iteration": k,
            "upstream.optimal_reward": self._src_fp(optimal_reward_src),
            "upstream.adapter": self._src_fp(adapter_src),
        }
        if c.loop.textual_reward:
            inputs.update(config_fields(c, "generation.reward_temperature", "generation.reward_max_tokens"))
            inputs.update(model_identity(c.models.reward_model, "models.reward_model"))
        deps = tuple(d for d in (optimal_reward_src, adapter_src) if d and not d.startswith("t*0"))
        return StageKey(f"iter{k}.synthetic_set", self.paths.synthetic_summary(k), inputs, deps)

    def key_sft(self, k: int, synthetic: StageKey, prev_adapter_src: str | None) -> StageKey:
        """Step 2 of iteration ``k`` (``threads``/``cpus_per_worker`` do not change the result)."""
        c = self.cfg
        init = prev_adapter_src if c.sft.continue_from_previous else None
        sft = {f"sft.{k2}": v for k2, v in dataclasses.asdict(c.sft).items()
               if k2 not in ("threads", "cpus_per_worker")}
        inputs = {**sft, **model_identity(c.models.prompt_model, "models.prompt_model"), "seed": c.seed,
                  "iteration": k, "upstream.synthetic_set": synthetic.fingerprint,
                  "upstream.init_adapter": self._src_fp(init)}
        deps = (synthetic.name,) + ((init,) if init else ())
        return StageKey(f"iter{k}.sft", self.paths.sft_metrics(k), inputs, deps)

    def key_reward_search(self, k: int, optimal_reward_src: str, adapter_src: str) -> StageKey:
        """Step 3 of iteration ``k``."""
        c = self.cfg
        opt = c.models.optimizer_model or c.models.reward_model
        inputs = {
            **self._val_inputs(),
            **config_fields(c, "loop.update_optimal_reward", "loop.textual_reward", "generation.reward_temperature",
                            "generation.reward_max_tokens"),
            **{f"reward_search.{k2}": v for k2, v in dataclasses.asdict(c.reward_search).items()},
            **model_identity(c.models.reward_model, "models.reward_model"),
            **model_identity(opt, "models.optimizer_model"),
            "iteration": k,
            "upstream.optimal_reward": self._src_fp(optimal_reward_src),
            "upstream.adapter": self._src_fp(adapter_src),
        }
        deps = tuple(d for d in (optimal_reward_src, adapter_src) if d and not d.startswith("t*0"))
        return StageKey(f"iter{k}.reward_search", self.paths.reward_search(k), inputs, deps)

    def key_test(self, policy_name: str, best: HistoryEntry | None) -> StageKey:
        """Test evaluation of a baseline (``best`` None) or of the best query-aware policy.

        The test split ignores the seed, and at ``target_temperature == 0`` the target decodes
        greedily (its request seeds change nothing), so a baseline's test result depends on the
        seed only when the target samples; the query-aware policy's always does, through its
        upstream fingerprint.
        """
        c = self.cfg
        inputs = {
            **self._common_inputs(),
            **config_fields(c, "dataset.test_limit", "generation.target_temperature", "generation.target_max_tokens"),
            **model_identity(c.models.target_model, "models.target_model"),
            "policy": policy_name,
        }
        if c.generation.target_temperature > 0:  # sampled answers: each request is seeded from the run seed
            inputs["seed"] = c.seed
        deps: tuple[str, ...] = ()
        if best is not None:
            inputs.update(config_fields(c, "generation.prompt_eval_temperature", "generation.prompt_max_tokens"))
            inputs.update(model_identity(c.models.prompt_model, "models.prompt_model"))
            inputs["upstream.best_policy"] = best.fingerprint
            inputs["best.iteration"] = best.iteration
            inputs["best.phase"] = best.phase
            deps = (f"iter{best.iteration}.val_{best.phase}",)
        return StageKey(f"test.{policy_name}", self.paths.test_summary(policy_name), inputs, deps)

    def _src_fp(self, src: str | None) -> str | None:
        """The fingerprint standing for a stage's output (t*_0 is identified by its text)."""
        if src is None:
            return None
        if src.startswith("t*0"):
            return src
        return self._fps[src]

    def _t0_src(self) -> str:
        return "t*0:" + text_fingerprint(self.initial_optimal_reward())

    def decide(self, key: StageKey, extra_ok: bool = True) -> StageDecision:
        """Reuse ``key``'s stored artifact only if its fingerprint matches and none of its inputs was recomputed."""
        self._fps[key.name] = key.fingerprint
        if not key.marker.is_file() or not extra_ok:
            return StageDecision(key.name, False, "not computed yet")
        try:
            stored = artifacts.read_json(key.marker).get("stage") or {}
        except (ValueError, OSError, AttributeError):
            stored = {}
        if not stored.get("fingerprint"):
            return StageDecision(key.name, False, "artifact has no fingerprint (written by an older version)")
        if stored["fingerprint"] != key.fingerprint:
            changed = changed_fields(stored.get("inputs"), key.inputs)
            return StageDecision(key.name, False, "changed: " + ", ".join(changed), changed)
        stale = [d for d in key.deps if d in self._recomputed]
        if stale:
            return StageDecision(key.name, False, "recomputed upstream: " + ", ".join(stale), stale)
        return StageDecision(key.name, True, "fingerprint unchanged")

    def _begin(self, key: StageKey, extra_ok: bool = True) -> bool:
        """Decide and record; True when the stage must be computed."""
        d = self.decide(key, extra_ok)
        self.decisions.append(d)
        if not d.reuse:
            self._recomputed.add(key.name)
            if d.reason != "not computed yet" and not self._planning:
                self._say(f"{key.name}: recomputing ({d.reason})")
        return not d.reuse

    _fps: dict[str, str]

    # ------------------------------------------------------------ the stages
    def _val_stage(self, key: StageKey, k: int, phase: str, optimal_reward: str, adapter: str | None) -> float:
        if not self._begin(key):
            return float(artifacts.read_json(key.marker)["accuracy"])
        self.hooks.stage(k, f"val_{phase}")
        policy = self.policy(optimal_reward, adapter)
        res = self._timed(f"iter{k}.val_{phase}", lambda: self._evaluate(policy, self.val))
        artifacts.write_parquet(self.paths.val_rows(k, phase), res.rows)
        artifacts.write_json(key.marker, {**res.summary(), "phase": phase, "optimal_reward": optimal_reward,
                                          "adapter": adapter, "stage": key.record()})
        self.hooks.validation_accuracy(k, res.accuracy, phase)
        self._say(f"iteration {k}: validation accuracy ({phase}) = {res.accuracy * 100:.2f}% (n={res.n})")
        return res.accuracy

    def synthetic_set(self, key: StageKey, k: int, optimal_reward: str, adapter: str | None) -> list[dict[str, Any]]:
        """Step 1: sample N questions; p = Π(q, t*), ŷ = target(q, p), critique = R(p, q, ŷ, y*).

        Rows hold ``critique`` (the per-question reward Π is trained on); in the numeric
        ablation it is "correct"/"incorrect" and no reward model is called.
        """
        path = self.paths.synthetic_set(k)
        if not self._begin(key, path.is_file()):
            return _read_synthetic(path)
        self.hooks.stage(k, "synthetic_set")
        cfg, g = self.cfg, self.cfg.generation
        rng = random.Random(cfg.seed * 7919 + k)
        n = min(cfg.loop.synthetic_size, len(self.train))
        problems = rng.sample(self.train, n)

        def run() -> list[dict[str, Any]]:
            prompt_reqs = [
                prompt_model_request(
                    self.templates, p.question, optimal_reward,
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
                                    g.target_max_tokens, g.target_temperature, self.chunk, self.progress,
                                    seed=cfg.seed)
            if cfg.loop.textual_reward:
                self._say(f"iteration {k}: synthetic set: reward model")
                sp = SamplingParams(temperature=g.reward_temperature, max_tokens=g.reward_max_tokens, seed=cfg.seed)
                rreqs = [
                    ChatRequest(self.templates.reward_model_messages(p.question, row["instruction"], row["output"],
                                                                     p.answer, p.solution), sp)
                    for p, row in zip(problems, rows, strict=True)
                ]
                rres = generate_in_chunks(self.engines["reward_model"], rreqs, self.chunk, "R(p, q, ŷ, y*)",
                                          self.progress)
                critiques = [r.text.strip() for r in rres]
                critique_tokens = [r.completion_tokens for r in rres]
            else:
                critiques = [self.templates.numeric_reward(row["correct"]) for row in rows]
                critique_tokens = [0] * len(rows)
            for row, pr, t, rt in zip(rows, pres, critiques, critique_tokens, strict=True):
                row["critique"] = t
                row["prompt_completion_tokens"] = pr.completion_tokens
                row["critique_completion_tokens"] = rt
                row["iteration"] = k
            return rows

        rows = self._timed(f"iter{k}.synthetic_set", run)
        artifacts.write_parquet(path, rows)
        acc = sum(row_score(r) for r in rows) / max(1, len(rows))  # mean score (float metrics too)
        artifacts.write_json(key.marker, {"iteration": k, "n": len(rows), "accuracy": acc,
                                          "optimal_reward": optimal_reward, "adapter": adapter, "stage": key.record()})
        self.hooks.synthetic_accuracy(k, acc)
        self._say(f"iteration {k}: synthetic set done, target accuracy {acc * 100:.2f}% on {len(rows)} rows")
        return rows

    def sft(self, key: StageKey, k: int, rows: list[dict[str, Any]], prev_adapter_path: str | None) -> tuple[str, str]:
        """Step 2: LoRA-fine-tune Π on (q, critique) -> p; returns (adapter id, adapter path)."""
        from trprompt.sft import build_sft_examples

        out = self.paths.adapter(k)
        aid = adapter_id(k)
        if self._begin(key, (out / "adapter_config.json").is_file()):
            self.hooks.stage(k, "sft")
            examples = build_sft_examples(rows, only_correct=self.cfg.sft.only_correct)
            if not examples:
                raise RuntimeError(f"iteration {k}: no usable SFT examples in the synthetic set")
            init = prev_adapter_path if self.cfg.sft.continue_from_previous else None
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
        return aid, str(out)

    def reward_search(self, key: StageKey, k: int, optimal_reward: str, adapter: str | None) -> str:
        """Step 3: TextGrad search for a better t*, every candidate scored on validation.

        Skipped (t* kept) when ``loop.update_optimal_reward`` is off, when there are no
        steps, and in the numeric ablation, whose optimal reward is already the best
        numeric value.
        """
        from trprompt.reward_search import FanOutRewardScorer, search_optimal_reward

        done = key.marker
        if not self._begin(key):
            return read_optimal_reward(artifacts.read_json(done))
        why = ("loop.update_optimal_reward is off" if not self.cfg.loop.update_optimal_reward
               else "reward_search.steps is 0" if self.cfg.reward_search.steps == 0
               else "numeric rewards: t* is the best numeric value" if self.numeric else None)
        if why is not None:
            artifacts.write_json(done, {"optimal_reward": optimal_reward, "skipped": True, "why": why, "trace": [],
                                        "stage": key.record()})
            return optimal_reward
        self.hooks.stage(k, "reward_search")
        trace_path = self.paths.reward_search_trace(k)
        meta = self.paths.reward_search_trace_meta(k)
        start_trace: list[dict[str, Any]] = []
        if trace_path.exists() and meta.is_file() and \
                artifacts.read_json(meta).get("fingerprint") == key.fingerprint:
            import json

            start_trace = [json.loads(line) for line in trace_path.read_text().splitlines() if line.strip()]
        else:
            trace_path.unlink(missing_ok=True)
            artifacts.write_json(meta, {"fingerprint": key.fingerprint})
        trace = list(start_trace)

        def on_candidate(row: dict[str, Any]) -> None:
            trace.append(row)
            artifacts.write_jsonl(trace_path, trace)

        val = self.val[: self.cfg.reward_search.val_questions]
        scorer = FanOutRewardScorer(self.engines["prompt_model"], self.engines["target_model"],
                                    self.engines["reward_model"], val, self.templates, self.cfg.generation,
                                    adapter=adapter, seed=self.cfg.seed)
        self._say(f"iteration {k}: optimal-reward search, {self.cfg.reward_search.steps} steps x "
                  f"{self.cfg.reward_search.candidates_per_step} candidates on {len(val)} questions")
        res = self._timed(
            f"iter{k}.reward_search",
            lambda: search_optimal_reward(optimal_reward, scorer, self.engines["optimizer_model"],
                                          self.cfg.reward_search,
                                          self.templates, on_candidate=on_candidate, progress=self.progress,
                                          start_trace=start_trace, seed=self.cfg.seed * 1_000 + k),
        )
        artifacts.write_text(self.paths.optimal_reward_text(k), res.optimal_reward + "\n")
        artifacts.write_json(done, {
            "optimal_reward": res.optimal_reward,
            "best_accuracy": res.best_accuracy,
            "initial_accuracy": res.initial_accuracy,
            "steps_run": res.steps_run,
            "trace": res.trace,
            "stage": key.record(),
        })
        self._say(f"iteration {k}: reward search: {res.initial_accuracy * 100:.2f}% -> {res.best_accuracy * 100:.2f}%")
        return res.optimal_reward

    # ------------------------------------------------------------------- run
    def run(self) -> RunSummary:
        """Run (or resume) all K iterations, pick the best, evaluate on test, write the report."""
        cfg = self.cfg
        self._invalidate(self.stage_plan())
        self._fps = {}
        self.decisions = []
        self._recomputed = set()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        optimal_reward = self.initial_optimal_reward()
        optimal_reward_src: str = self._t0_src()
        adapter: str | None = None
        adapter_path: str | None = None
        adapter_src: str | None = None
        history: list[HistoryEntry] = []

        key = self.key_val(0, "initial", optimal_reward_src, None)
        val0 = self._val_stage(key, 0, "initial", optimal_reward, None)
        history.append(HistoryEntry(0, "initial", val0, None, None, optimal_reward,
                                    self._policy_fp(optimal_reward_src, None)))
        for k in range(1, cfg.loop.iterations + 1):
            self._say(f"=== iteration {k}/{cfg.loop.iterations} ===")
            syn_key = self.key_synthetic(k, optimal_reward_src, adapter_src)
            rows = self.synthetic_set(syn_key, k, optimal_reward, adapter)
            sft_key = self.key_sft(k, syn_key, adapter_src)
            adapter, adapter_path = self.sft(sft_key, k, rows, adapter_path)
            adapter_src = sft_key.name
            self._ensure_adapter(adapter, adapter_path)
            v_sft = self._val_stage(self.key_val(k, "sft", optimal_reward_src, adapter_src), k, "sft",
                                    optimal_reward, adapter)
            history.append(HistoryEntry(k, "sft", v_sft, adapter, self.paths.relative(adapter_path), optimal_reward,
                                        self._policy_fp(optimal_reward_src, adapter_src)))
            rs_key = self.key_reward_search(k, optimal_reward_src, adapter_src)
            optimal_reward = self.reward_search(rs_key, k, optimal_reward, adapter)
            optimal_reward_src = rs_key.name
            v_rs = self._val_stage(self.key_val(k, "reward_search", optimal_reward_src, adapter_src), k,
                                   "reward_search", optimal_reward, adapter)
            history.append(HistoryEntry(k, "reward_search", v_rs, adapter, self.paths.relative(adapter_path),
                                        optimal_reward, self._policy_fp(optimal_reward_src, adapter_src)))
            IterationMetrics(
                iteration=k,
                synthetic_accuracy=sum(row_score(r) for r in rows) / max(1, len(rows)),
                val_after_sft=v_sft,
                val_after_reward_search=v_rs,
                stage_seconds={s: v for s, v in self.stage_seconds.items() if s.startswith(f"iter{k}.")},
            ).write(self.paths)
        record = BestRecord.from_history(history)
        record.write(self.paths)
        best = record.best
        self._say(f"best: iteration {best.iteration} ({best.phase}), validation {(best.accuracy or 0) * 100:.2f}%")
        abs_adapter = None if best.adapter is None else str(self.paths.adapter(best.iteration).absolute())
        summary = RunSummary(str(self.run_dir), best.iteration, float(best.accuracy or 0.0), best.optimal_reward,
                             abs_adapter, adapter_id=best.adapter, best_phase=best.phase, history=history)
        if cfg.eval.run_test:
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

    def _invalidate(self, plan: list[StageDecision]) -> None:
        """Before recomputing anything, remove the derived files that would otherwise show stale numbers.

        ``best.json``, ``report.md`` and its plot, the ``metrics.json`` of every iteration with a
        recomputed stage and the test summaries about to be recomputed disappear until the run
        rewrites them, so a reader (serving, a sweep polling metrics, a person) never sees a
        number computed under other settings while the run is redone or after it crashes.
        """
        redo = [d.name for d in plan if not d.reuse]
        if not redo:
            return
        for p in (self.paths.best, self.paths.report, self.run_dir / "validation_accuracy.png"):
            p.unlink(missing_ok=True)
        for name in redo:
            head, _, _ = name.partition(".")
            if head.startswith("iter") and head[4:].isdigit():
                self.paths.iteration_metrics(int(head[4:])).unlink(missing_ok=True)
            elif head == "test":
                policy = name.split(".", 1)[1]
                self.paths.test_summary(policy).unlink(missing_ok=True)

    def _policy_fp(self, optimal_reward_src: str, adapter_src: str | None) -> str:
        return fingerprint({"optimal_reward": self._src_fp(optimal_reward_src), "adapter": self._src_fp(adapter_src)})

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
            key = self.key_test(pol.name, best if pol.name == "trprompt" else None)
            if not self._begin(key, self.paths.test_rows(pol.name).is_file()):
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

    def stage_plan(self) -> list[StageDecision]:
        """What :meth:`run` would reuse and recompute now, and why, without running anything.

        The test stage of the query-aware policy depends on which iteration turns out best; when
        a validation stage is recomputed that is not known yet, and it is listed as
        recomputed ("best iteration not known until validation reruns").
        """
        cfg = self.cfg
        self._fps, self.decisions, self._recomputed = {}, [], set()
        self._planning = True
        optimal_reward_src: str = self._t0_src()
        adapter_src: str | None = None
        val_known = True
        history: list[HistoryEntry] = []

        def val(key: StageKey, k: int, phase: str) -> None:
            nonlocal val_known
            recompute = self._begin(key)
            if recompute:
                val_known = False
            else:
                acc = float(artifacts.read_json(key.marker)["accuracy"])
                history.append(HistoryEntry(k, phase, acc, None, None, "",
                                            self._policy_fp(optimal_reward_src, adapter_src)))

        val(self.key_val(0, "initial", optimal_reward_src, None), 0, "initial")
        for k in range(1, cfg.loop.iterations + 1):
            syn = self.key_synthetic(k, optimal_reward_src, adapter_src)
            self._begin(syn, self.paths.synthetic_set(k).is_file())
            sft = self.key_sft(k, syn, adapter_src)
            self._begin(sft, (self.paths.adapter(k) / "adapter_config.json").is_file())
            adapter_src = sft.name
            val(self.key_val(k, "sft", optimal_reward_src, adapter_src), k, "sft")
            rs = self.key_reward_search(k, optimal_reward_src, adapter_src)
            self._begin(rs)
            optimal_reward_src = rs.name
            val(self.key_val(k, "reward_search", optimal_reward_src, adapter_src), k, "reward_search")
        if cfg.eval.run_test:
            for b in cfg.eval.baselines:
                self._begin(self.key_test(b, None), self.paths.test_rows(b).is_file())
            if val_known and history:
                best = BestRecord.from_history(history).best
                self._begin(self.key_test("trprompt", best), self.paths.test_rows("trprompt").is_file())
            else:
                self.decisions.append(StageDecision("test.trprompt", False,
                                                    "best iteration not known until validation reruns"))
        self._planning = False
        return list(self.decisions)

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


def _adapter_stamp(path: str) -> str:
    """Changes whenever the adapter folder is rewritten (so a retrained adapter is reloaded)."""
    p = Path(path) / "adapter_config.json"
    try:
        return f"{p.stat().st_mtime_ns}"
    except OSError:
        return "missing"


def _read_synthetic(path: Path) -> list[dict[str, Any]]:
    """Synthetic-set rows; rows of older runs name the critique ``reward``."""
    rows = artifacts.read_parquet(path)
    for r in rows:
        if "critique" not in r and "reward" in r:
            r["critique"] = r.pop("reward")
    return rows
