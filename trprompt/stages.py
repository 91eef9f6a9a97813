"""The stage plan of a run: what each stage of Algorithm 1 depends on, and whether its stored artifact is reused.

Every stage (the initial validation; per iteration the synthetic set, SFT, validation after
SFT, the optimal-reward search and validation after it; the test evaluations) writes a marker
file holding the fingerprint of exactly the settings it depends on (:class:`StageKey`). On a
new invocation :meth:`StagePlan.begin` reuses a stage only when its fingerprint is unchanged
and no stage it depends on was recomputed; otherwise the stage and everything downstream of
it are recomputed, so a changed setting never returns a stale number.

:meth:`StagePlan.plan` walks the whole run without computing anything and says what would be
reused or recomputed, and why (``jobs/train.py --dry-run``); :meth:`StagePlan.invalidate`
removes the derived files (``best.json``, the report, stale summaries) before a recomputation.

A stage's output is named by a *source*: the stage's name (``iter1.sft``) or, for the
initial optimal reward t*_0, ``t*0:<hash of its text>``. A downstream stage's fingerprint
includes its sources' fingerprints (``upstream.*``), so a change propagates down the chain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trprompt import artifacts
from trprompt.config import TRPromptConfig
from trprompt.data.tasks import fingerprint_inputs
from trprompt.fingerprint import (
    changed_fields,
    config_fields,
    fingerprint,
    grader_version,
    model_identity,
    text_fingerprint,
)
from trprompt.run_dir import BestRecord, HistoryEntry, RunPaths
from trprompt.templates import TEMPLATES_VERSION, Templates

NOT_COMPUTED = "not computed yet"


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


def _is_t0(src: str | None) -> bool:
    return bool(src) and str(src).startswith("t*0")


class StagePlan:
    """The stage keys of one run and the reuse decisions taken so far.

    Args:
        cfg: the validated run config (its dtypes already resolved).
        paths: the run directory's layout.
        templates: the run's templates (their version and text are part of every fingerprint).
        initial_optimal_reward: t*_0, identified by its text.
        say: prints a progress line (used when a stored stage is recomputed because it changed).

    """

    def __init__(self, cfg: TRPromptConfig, paths: RunPaths, templates: Templates, initial_optimal_reward: str,
                 say: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.paths = paths
        self.templates = templates
        self.t0_source = "t*0:" + text_fingerprint(initial_optimal_reward)
        self.say = say
        self.decisions: list[StageDecision] = []
        self._fps: dict[str, str] = {}
        self._recomputed: set[str] = set()
        self._planning = False

    # ------------------------------------------------------------ decisions
    def reset(self) -> None:
        """Forget every decision (a new walk through the run starts)."""
        self._fps, self.decisions, self._recomputed = {}, [], set()

    def decide(self, key: StageKey, extra_ok: bool = True) -> StageDecision:
        """Reuse ``key``'s stored artifact only if its fingerprint matches and none of its inputs was recomputed.

        ``extra_ok`` False says an output beside the marker is missing (the stage is recomputed).
        """
        self._fps[key.name] = key.fingerprint
        if not key.marker.is_file() or not extra_ok:
            return StageDecision(key.name, False, NOT_COMPUTED)
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

    def begin(self, key: StageKey, extra_ok: bool = True) -> bool:
        """Decide and record the decision; True when the stage must be computed."""
        d = self.decide(key, extra_ok)
        self.decisions.append(d)
        if not d.reuse:
            self._recomputed.add(key.name)
            if d.reason != NOT_COMPUTED and not self._planning:
                self.say(f"{key.name}: recomputing ({d.reason})")
        return not d.reuse

    # ------------------------------------------------------------ sources
    def source_fingerprint(self, src: str | None) -> str | None:
        """The fingerprint standing for a stage's output (t*_0 is identified by its text)."""
        if src is None:
            return None
        if _is_t0(src):
            return src
        return self._fps[src]

    def policy_fingerprint(self, optimal_reward_src: str, adapter_src: str | None) -> str:
        """Identity of the query-aware policy Π(·, t*) with an adapter, from the stages that made them."""
        return fingerprint({"optimal_reward": self.source_fingerprint(optimal_reward_src),
                            "adapter": self.source_fingerprint(adapter_src)})

    # ------------------------------------------------------------ keys
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

    def _upstream(self, optimal_reward_src: str, adapter_src: str | None) -> dict[str, Any]:
        return {"upstream.optimal_reward": self.source_fingerprint(optimal_reward_src),
                "upstream.adapter": self.source_fingerprint(adapter_src)}

    @staticmethod
    def _deps(*sources: str | None) -> tuple[str, ...]:
        return tuple(s for s in sources if s and not _is_t0(s))

    def val(self, k: int, phase: str, optimal_reward_src: str, adapter_src: str | None) -> StageKey:
        """Validation after ``phase`` of iteration ``k`` of Π(·, t*) with the adapter from ``adapter_src``."""
        return StageKey(f"iter{k}.val_{phase}", self.paths.val_summary(k, phase),
                        {**self._val_inputs(), **self._upstream(optimal_reward_src, adapter_src)},
                        self._deps(optimal_reward_src, adapter_src))

    def synthetic_set(self, k: int, optimal_reward_src: str, adapter_src: str | None) -> StageKey:
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
            **self._upstream(optimal_reward_src, adapter_src),
        }
        if c.loop.textual_reward:
            inputs.update(config_fields(c, "generation.reward_temperature", "generation.reward_max_tokens"))
            inputs.update(model_identity(c.models.reward_model, "models.reward_model"))
        return StageKey(f"iter{k}.synthetic_set", self.paths.synthetic_summary(k), inputs,
                        self._deps(optimal_reward_src, adapter_src))

    def sft(self, k: int, prev_adapter_src: str | None) -> StageKey:
        """Step 2 of iteration ``k``, trained on its synthetic set (``threads``/``cpus_per_worker`` do not
        change the result); call after :meth:`synthetic_set` of the same iteration was decided.
        """
        c = self.cfg
        synthetic = f"iter{k}.synthetic_set"
        init = prev_adapter_src if c.sft.continue_from_previous else None
        sft = {f"sft.{k2}": v for k2, v in dataclasses.asdict(c.sft).items()
               if k2 not in ("threads", "cpus_per_worker")}
        inputs = {**sft, **model_identity(c.models.prompt_model, "models.prompt_model"), "seed": c.seed,
                  "iteration": k, "upstream.synthetic_set": self.source_fingerprint(synthetic),
                  "upstream.init_adapter": self.source_fingerprint(init)}
        deps = (synthetic,) + ((init,) if init else ())
        return StageKey(f"iter{k}.sft", self.paths.sft_metrics(k), inputs, deps)

    def reward_search(self, k: int, optimal_reward_src: str, adapter_src: str) -> StageKey:
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
            **self._upstream(optimal_reward_src, adapter_src),
        }
        return StageKey(f"iter{k}.reward_search", self.paths.reward_search(k), inputs,
                        self._deps(optimal_reward_src, adapter_src))

    def test(self, policy_name: str, best: HistoryEntry | None) -> StageKey:
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

    # ------------------------------------------------------------ the whole run
    def plan(self) -> list[StageDecision]:
        """What a run would reuse and recompute now, and why, without running anything.

        The test stage of the query-aware policy depends on which iteration turns out best; when
        a validation stage is recomputed that is not known yet, and it is listed as
        recomputed ("best iteration not known until validation reruns").
        """
        cfg, paths = self.cfg, self.paths
        self.reset()
        self._planning = True
        optimal_reward_src: str = self.t0_source
        adapter_src: str | None = None
        val_known = True
        history: list[HistoryEntry] = []

        def val(key: StageKey, k: int, phase: str) -> None:
            nonlocal val_known
            if self.begin(key):
                val_known = False
            else:
                acc = float(artifacts.read_json(key.marker)["accuracy"])
                history.append(HistoryEntry(k, phase, acc, None, None, "",
                                            self.policy_fingerprint(optimal_reward_src, adapter_src)))

        try:
            val(self.val(0, "initial", optimal_reward_src, None), 0, "initial")
            for k in range(1, cfg.loop.iterations + 1):
                syn = self.synthetic_set(k, optimal_reward_src, adapter_src)
                self.begin(syn, paths.synthetic_set(k).is_file())
                sft = self.sft(k, adapter_src)
                self.begin(sft, (paths.adapter(k) / "adapter_config.json").is_file())
                adapter_src = sft.name
                val(self.val(k, "sft", optimal_reward_src, adapter_src), k, "sft")
                rs = self.reward_search(k, optimal_reward_src, adapter_src)
                self.begin(rs)
                optimal_reward_src = rs.name
                val(self.val(k, "reward_search", optimal_reward_src, adapter_src), k, "reward_search")
            if cfg.eval.run_test:
                for b in cfg.eval.baselines:
                    self.begin(self.test(b, None), paths.test_rows(b).is_file())
                if val_known and history:
                    best = BestRecord.from_history(history).best
                    self.begin(self.test("trprompt", best), paths.test_rows("trprompt").is_file())
                else:
                    self.decisions.append(StageDecision("test.trprompt", False,
                                                        "best iteration not known until validation reruns"))
        finally:
            self._planning = False
        return list(self.decisions)

    def invalidate(self, plan: list[StageDecision]) -> None:
        """Before recomputing anything, remove the derived files that would otherwise show stale numbers.

        ``best.json``, ``report.md`` and its plot, the ``metrics.json`` of every iteration with a
        recomputed stage and the test summaries about to be recomputed disappear until the run
        rewrites them, so a reader (serving, a sweep polling metrics, a person) never sees a
        number computed under other settings while the run is redone or after it crashes.
        """
        redo = [d.name for d in plan if not d.reuse]
        if not redo:
            return
        for p in (self.paths.best, self.paths.report, self.paths.root / "validation_accuracy.png"):
            p.unlink(missing_ok=True)
        for name in redo:
            head, _, _ = name.partition(".")
            if head.startswith("iter") and head[4:].isdigit():
                self.paths.iteration_metrics(int(head[4:])).unlink(missing_ok=True)
            elif head == "test":
                policy = name.split(".", 1)[1]
                self.paths.test_summary(policy).unlink(missing_ok=True)
