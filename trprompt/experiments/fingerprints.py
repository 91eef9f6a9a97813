"""What a harness's cached result depends on, as fingerprint inputs (``{dotted name: value}``).

The comparison's caches (:mod:`trprompt.experiments.compare.cache`) and the sweep's
resume check (:mod:`trprompt.experiments.sweep.spec`) build their inputs from these
pieces and hash them with :func:`trprompt.fingerprint.fingerprint`. Settings that only
decide where and how fast things run (actors, CPUs, GPUs, threads, batch sizes,
timeouts, ``run_dir``) are left out, so changing them reuses every cached result.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trprompt.config import TRPromptConfig
from trprompt.fingerprint import effective_dtype, fingerprint, grader_version, model_identity
from trprompt.roles import ROLES
from trprompt.templates import TEMPLATES_VERSION, Templates

SPEED_ONLY_GENERATION = ("batch_size",)
"""Generation settings that change how fast requests run, not what they answer."""
SPEED_ONLY_SFT = ("threads", "cpus_per_worker", "resolved_dtype")
"""SFT settings that change where and how fast training runs, not the adapter it trains (``dtype`` is
fingerprinted as the effective dtype instead, see :func:`sft_inputs`)."""


def templates_inputs(templates: Templates) -> dict[str, Any]:
    """The templates' version and a fingerprint of their text."""
    return {"templates.version": TEMPLATES_VERSION, "templates.text": fingerprint(dataclasses.asdict(templates))}


def data_inputs(run: TRPromptConfig, dataset: str | None = None) -> dict[str, Any]:
    """The task's data, grader and description (:func:`trprompt.data.tasks.fingerprint_inputs`).

    ``dataset``: another task than the run's (a transfer test set), a built-in name or a path.
    """
    from trprompt.data import BUILTIN_TASKS, load_task
    from trprompt.data.tasks import fingerprint_inputs

    if dataset is not None and dataset != run.dataset.name:
        return {} if dataset in BUILTIN_TASKS else {"data": load_task(dataset).fingerprint()}
    return fingerprint_inputs(run)


def generation_inputs(run: TRPromptConfig) -> dict[str, Any]:
    """Every generation setting except the speed-only ones."""
    g = dataclasses.asdict(run.generation)
    return {f"generation.{k}": v for k, v in sorted(g.items()) if k not in SPEED_ONLY_GENERATION}


def models_inputs(run: TRPromptConfig, roles: tuple[str, ...] = ROLES) -> dict[str, Any]:
    """Each role's model identity (an unset optimizer model is the reward model)."""
    out: dict[str, Any] = {}
    for role in roles:
        m = getattr(run.models, role) or run.models.reward_model
        out.update(model_identity(m, f"models.{role}"))
    return out


def sft_inputs(run: TRPromptConfig) -> dict[str, Any]:
    """The SFT settings that decide the trained adapter."""
    sft = {k: v for k, v in dataclasses.asdict(run.sft).items() if k not in SPEED_ONLY_SFT}
    sft["dtype"] = effective_dtype({**sft, "engine": "hf", "resolved_dtype": run.sft.resolved_dtype})
    return {"sft": sft}


def run_inputs(run: TRPromptConfig, templates: Templates) -> dict[str, Any]:
    """Everything a whole TRPrompt run's results depend on (a sweep trial's base)."""
    return {
        "grader_version": grader_version(),
        "seed": run.seed,
        "dataset": dataclasses.asdict(run.dataset),
        **data_inputs(run),
        **models_inputs(run),
        **generation_inputs(run),
        **{k: dataclasses.asdict(getattr(run, k)) for k in ("loop", "reward_search", "budget", "eval")},
        **sft_inputs(run),
        **templates_inputs(templates),
    }
