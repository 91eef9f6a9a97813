"""TRPrompt (Algorithm 1) and its two ablations as :class:`~trprompt.methods.base.Method` objects.

``fit`` runs :class:`~trprompt.loop.TRPromptTrainer` on the context's metered
engines, with its run directory under the method's work directory (so a crashed
fit resumes from its last finished stage) and without the trainer's own test
stage (the comparison evaluates every method on test the same way). It returns a
:class:`TRPromptPolicy`: the query-aware policy Π(q, t*) of the best iteration, with
its LoRA adapter and t*.

Each ablation changes exactly one step of Algorithm 1 (arXiv 2507.18618) and is
consistent from training to inference (details: ``docs/ablations.md``):

* ``trprompt``: step 1 critiques are the reward model's paragraphs; step 3 searches the
  optimal reward t* with TextGrad every iteration; Π is queried with the best t*.
* ``trprompt-fixed-reward`` (``loop.update_optimal_reward = False``): step 3 is skipped,
  so t* stays t*_0 (``templates.initial_optimal_reward``) for every synthetic set, for
  validation, test and serving. Tests the optimal-reward update of Algorithm 1.
* ``trprompt-numeric-reward`` (``loop.textual_reward = False``): step 1's critique is
  just "correct"/"incorrect" (no reward-model calls), Π is trained on it, and the
  optimal reward is the best numeric value, "correct", from the first synthetic set to
  test and serving; step 3 is skipped (there is no paragraph to optimise). Tests the
  textual reward itself (the paper's Figure 1 motivation).

Several TRPrompt variants may share one prompt-model engine, and the trainer names
its adapters ``iter1``, ``iter2``, ...; :class:`~trprompt.engines.wrappers.AdapterNamespace` gives each
variant's adapter ids a prefix of their own so they never collide.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any

from trprompt import artifacts
from trprompt.engines.base import Engine
from trprompt.engines.wrappers import AdapterNamespace
from trprompt.methods.base import InstructionScore, MethodContext
from trprompt.policies import PromptPolicy, QueryAwarePolicy
from trprompt.run_dir import HistoryEntry, RunPaths

VARIANTS: dict[str, dict[str, bool]] = {
    "trprompt": {"textual_reward": True, "update_optimal_reward": True},
    "trprompt-fixed-reward": {"textual_reward": True, "update_optimal_reward": False},
    "trprompt-numeric-reward": {"textual_reward": False, "update_optimal_reward": True},
}
"""The loop switches of each TRPrompt variant."""


@dataclass
class TRPromptPolicy(QueryAwarePolicy):
    """:class:`QueryAwarePolicy` that also remembers where its LoRA adapter is saved."""

    adapter_path: str | None = None


class TRPromptMethod:
    """TRPrompt or one of its ablations (see :data:`VARIANTS`)."""

    def __init__(self, name: str = "trprompt") -> None:
        if name not in VARIANTS:
            raise ValueError(f"unknown TRPrompt variant {name!r}; choose from {sorted(VARIANTS)}")
        self.name = name
        self.switches = VARIANTS[name]

    def settings(self) -> dict[str, Any]:
        """The loop switches (the rest comes from the run config, which is part of the cache key)."""
        return dict(self.switches)

    def fit(self, ctx: MethodContext) -> PromptPolicy:
        """Run Algorithm 1 under ``ctx.work_dir/run`` and return the best iteration's query-aware policy."""
        from trprompt.loop import TRPromptTrainer

        if ctx.run_config is None or ctx.sft_runner is None or ctx.base_model_path is None:
            raise ValueError(f"{self.name} needs run_config, sft_runner and base_model_path in the method context")
        cfg = copy.deepcopy(ctx.run_config)
        cfg.run_dir = str(ctx.work_dir / "run")
        cfg.seed = ctx.seed
        cfg.eval.run_test = False
        cfg.loop.textual_reward = self.switches["textual_reward"]
        cfg.loop.update_optimal_reward = self.switches["update_optimal_reward"]
        cfg.validate()
        tag = hashlib.sha256(str(ctx.work_dir.resolve()).encode()).hexdigest()[:6]
        prompt_engine = AdapterNamespace(ctx.engines["prompt_model"], f"{self.name.replace('-', '_')}_{tag}_")
        engines: dict[str, Engine] = {role: e for role, e in ctx.engines.items()}
        engines["prompt_model"] = prompt_engine
        trainer = TRPromptTrainer(cfg, engines, ctx.sft_runner, ctx.base_model_path, progress=ctx.progress)
        summary = trainer.run()
        self._record_history(ctx, trainer.paths, summary.history)
        return TRPromptPolicy.for_run(
            ctx.engines["prompt_model"], trainer.templates, summary.optimal_reward, cfg.generation, cfg.seed,
            adapter=prompt_engine.full_id(summary.adapter_id), chunk_size=cfg.generation.batch_size,
            name=self.name, progress=ctx.progress, adapter_path=summary.adapter_path,
        )

    @staticmethod
    def _record_history(ctx: MethodContext, paths: RunPaths, history: list[HistoryEntry]) -> None:
        """One history row per validation evaluation of the run (initial, after each SFT and reward search)."""
        best = -1.0
        for h in history:
            summary = artifacts.read_json(paths.val_summary(h.iteration, h.phase))
            score = InstructionScore(h.optimal_reward, int(summary["correct"]), int(summary["n"]), [],
                                     mean_score=summary.get("accuracy"))
            accepted = score.accuracy > best
            best = max(best, score.accuracy)
            ctx.record(h.iteration, score, accepted=accepted, incumbent_accuracy=best, phase=h.phase,
                       adapter=h.adapter)
