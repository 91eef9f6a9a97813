"""Cache keys of a comparison: what each method's fit and each test evaluation depend on.

Each method's results live in ``<run_dir>/methods/<method>/<key>/`` where ``key``
hashes everything its fit depends on (method settings, budget, seed, data set and
split sizes, models, generation settings, templates and, for TRPrompt, the
loop/SFT/reward-search config); placement and speed knobs (:data:`PLACEMENT_FIELDS`,
the request batch size) are left out. ``fit.json`` holds the fitted policy, its
validation history and its spending; ``test/<dataset>-<n>-<key>.json`` each test
evaluation. A re-run only computes what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from trprompt.config import TRPromptConfig
from trprompt.experiments.compare.config import NO_TRAINING, CompareConfig
from trprompt.methods import TRPROMPT_NAMES, make_method
from trprompt.roles import ROLES
from trprompt.templates import Templates

PLACEMENT_FIELDS = ("num_actors", "num_cpus", "num_gpus", "threads", "max_batch_size", "timeout_s", "max_retries",
                    "gpu_memory_utilization")
"""Model settings that decide where and how fast an engine runs, not what it answers (left out of cache keys)."""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _models_key(run: TRPromptConfig) -> dict[str, Any]:
    """The models of each role without their placement/performance settings."""
    out: dict[str, Any] = {}
    for role in ROLES:
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


def test_key(run: TRPromptConfig, templates: Templates, dataset: str, limit: int | None) -> str:
    """What a test evaluation depends on besides the fitted policy."""
    return _digest({"models": _models_key(run), "generation": _generation_key(run),
                    "templates": dataclasses.asdict(templates), "dataset": dataset, "limit": limit})
