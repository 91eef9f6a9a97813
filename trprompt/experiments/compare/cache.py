"""Cache fingerprints of a comparison: exactly what each method's fit and each test evaluation depend on.

Each method's results live in ``<run_dir>/methods/<method>/<key>/`` where ``key`` is the
:func:`~trprompt.fingerprint.fingerprint` of :func:`fit_inputs`: the method and its
settings, its budget, the seed, the optimisation data set and split sizes, every role's
model identity, the generation settings, the templates (version and text), the grader
version and, for TRPrompt, the loop/SFT/reward-search/budget config. Placement and speed
knobs (actors, CPUs, GPUs, threads, request and engine batch sizes, timeouts, SFT
``cpus_per_worker``/``threads``) are left out, and so is ``test_limit``: a fit never sees
the test split. ``fit.json`` holds the fitted policy, its validation history, its spending
and its inputs; ``test/<dataset>-<n>-<key>.json`` each test evaluation, keyed by
:func:`test_inputs` (data set, limit, seed, target and prompt models, generation,
templates, grader version). A re-run only computes what is missing, and a changed
setting never returns a result computed under the old one (:func:`why_recomputed` names
what changed).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from trprompt import artifacts
from trprompt.config import TRPromptConfig
from trprompt.experiments.compare.config import NO_TRAINING, CompareConfig
from trprompt.experiments.fingerprints import (
    data_inputs,
    generation_inputs,
    models_inputs,
    sft_inputs,
    templates_inputs,
)
from trprompt.fingerprint import changed_fields, config_fields, fingerprint, grader_version
from trprompt.methods import TRPROMPT_NAMES, make_method
from trprompt.templates import Templates


def fit_inputs(name: str, run: TRPromptConfig, cmp: CompareConfig, templates: Templates) -> dict[str, Any]:
    """The settings ``name``'s fit depends on, as ``{dotted name: value}`` (its cache key hashes them)."""
    method = make_method(name, templates, cmp.settings_for(name))
    inputs: dict[str, Any] = {"method": name, "method.settings": method.settings()}
    if name in NO_TRAINING:
        return inputs
    inputs.update({
        "budget": dataclasses.asdict(cmp.budget_for(name)),
        "grader_version": grader_version(),
        **config_fields(run, "seed", "dataset.name", "dataset.val_fraction", "dataset.train_limit",
                        "dataset.val_limit"),
        **data_inputs(run),
        **models_inputs(run),
        **generation_inputs(run),
        **templates_inputs(templates),
    })
    if name in TRPROMPT_NAMES:
        inputs.update(config_fields(run, "loop", "reward_search", "budget"))
        inputs.update(sft_inputs(run))
    return inputs


def method_key(name: str, run: TRPromptConfig, cmp: CompareConfig, templates: Templates) -> str:
    """Fingerprint of everything ``name``'s fit depends on (its results are cached under it)."""
    return fingerprint(fit_inputs(name, run, cmp, templates))


def test_inputs(run: TRPromptConfig, templates: Templates, dataset: str, limit: int | None) -> dict[str, Any]:
    """What a test evaluation depends on besides the fitted policy (the method's key covers that)."""
    return {
        "test.dataset": dataset,
        "test.limit": limit,
        **{f"test.{k}": v for k, v in data_inputs(run, dataset).items()},
        "seed": run.seed,  # which questions a limited test split samples
        "grader_version": grader_version(),
        **models_inputs(run, ("prompt_model", "target_model")),
        **generation_inputs(run),
        **templates_inputs(templates),
    }


def test_key(run: TRPromptConfig, templates: Templates, dataset: str, limit: int | None) -> str:
    """Fingerprint of :func:`test_inputs`."""
    return fingerprint(test_inputs(run, templates, dataset, limit))


def why_recomputed(method_root: Path, inputs: dict[str, Any], filename: str = "fit.json") -> list[str] | None:
    """The settings that differ from the newest earlier cached fit of this method (None: there is none).

    ``method_root`` is ``<run_dir>/methods/<method>``; each key folder's ``fit.json`` keeps its inputs.
    """
    if not method_root.is_dir():
        return None
    earlier = sorted((p for p in method_root.glob(f"*/{filename}") if p.is_file()), key=lambda p: p.stat().st_mtime)
    for path in reversed(earlier):
        old = artifacts.read_json(path).get("inputs")
        if isinstance(old, dict):
            return changed_fields(old, inputs)
    return None
