"""What is being served: a run directory resolved into a :class:`RunSpec` (config, templates, adapter, t*).

Reading the run directory is :func:`trprompt.run_dir.load_run`'s job; this module adds
the serving versions (adapter content hash, t* hash) on top.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.serve.security import has_visible_text
from trprompt.config import ModelConfig, TRPromptConfig, config_from_dict
from trprompt.engines.base import SamplingParams
from trprompt.policies import prompt_model_request
from trprompt.run_dir import BestRecord, HistoryEntry, RunDirError, RunPaths, load_run, write_templates
from trprompt.templates import Templates

__all__ = ["RunDirError", "RunSpec", "adapter_fingerprint", "reward_hash", "write_base_run"]

log = logging.getLogger("trprompt.serve")


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def reward_hash(text: str) -> str:
    """The version tag of an optimal reward text (first 12 hex digits of its SHA-256)."""
    return _short_hash(text.encode("utf-8"))


def adapter_fingerprint(path: Path) -> str:
    """A content hash of a peft adapter folder (its config and weight files)."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in path.iterdir() if p.is_file()):
        if name.startswith("adapter_") or name.endswith((".safetensors", ".bin")):
            h.update(name.encode())
            h.update((path / name).read_bytes())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class RunSpec:
    """A servable version: the run's config and templates, plus the adapter and t* to use.

    ``adapter_path`` is ``None`` for the base model. ``adapter_version`` is
    ``<adapter name>@<content hash>`` (or ``base``); ``reward_version`` is the hash of t*.
    """

    run_dir: str
    run_id: str
    config: TRPromptConfig
    templates: Templates
    optimal_reward: str
    adapter_name: str | None
    adapter_path: str | None
    adapter_version: str
    reward_version: str
    iteration: int | None = None
    phase: str | None = None
    val_accuracy: float | None = None

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> RunSpec:
        """Read a finished run through :func:`trprompt.run_dir.load_run` (paths resolved where the run lives now)."""
        run = load_run(run_dir)
        reward = run.optimal_reward
        adapter_path = run.adapter_path
        return cls(
            run_dir=str(run.root),
            run_id=f"{run.root.name}@{run.config.hash()}",
            config=run.config,
            templates=run.templates,
            optimal_reward=reward,
            adapter_name=run.adapter_id,
            adapter_path=str(adapter_path) if adapter_path else None,
            adapter_version=f"{run.adapter_id}@{adapter_fingerprint(adapter_path)}" if adapter_path else "base",
            reward_version=reward_hash(reward),
            iteration=run.iteration,
            phase=run.phase,
            val_accuracy=run.val_accuracy,
        )

    def with_overrides(self, adapter_path: str | None = None, optimal_reward: str | None = None) -> RunSpec:
        """A copy with another adapter folder and/or another t* (for a reload without a run dir)."""
        spec = self
        if adapter_path is not None:
            p = Path(adapter_path).expanduser().resolve()
            _check_adapter_dir(p)
            spec = dataclasses.replace(spec, adapter_name=p.name if p.name != "adapter" else p.parent.name,
                                       adapter_path=str(p), adapter_version=f"{p.parent.name}/{p.name}@"
                                       f"{adapter_fingerprint(p)}")
        if optimal_reward is not None:
            spec = dataclasses.replace(spec, optimal_reward=optimal_reward, reward_version=reward_hash(optimal_reward))
        return spec

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (what /v1/info reports)."""
        return {
            "run_id": self.run_id,
            "run_dir": self.run_dir,
            "adapter": self.adapter_name,
            "adapter_path": self.adapter_path,
            "adapter_version": self.adapter_version,
            "optimal_reward": self.optimal_reward,
            "optimal_reward_version": self.reward_version,
            "best_iteration": self.iteration,
            "best_phase": self.phase,
            "validation_accuracy": self.val_accuracy,
            "dataset": self.config.dataset.name,
        }


def _check_adapter_dir(p: Path) -> None:
    if not (p / "adapter_config.json").is_file():
        raise RunDirError(f"{p}: not a peft adapter folder (no adapter_config.json)")


def write_base_run(
    run_dir: str | Path,
    prompt_model: ModelConfig | dict[str, Any],
    target_model: ModelConfig | dict[str, Any] | None = None,
    optimal_reward: str | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Fabricate a servable run directory with no adapter (the base prompt model and default t*).

    Useful to serve an untrained prompt model (a baseline) or for benchmarks. The
    directory gets ``config.yaml``, ``templates.json`` and a ``best.json`` at iteration 0.
    """
    from trprompt.config import dump_config

    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    pm = dataclasses.asdict(prompt_model) if isinstance(prompt_model, ModelConfig) else dict(prompt_model)
    tm = target_model if target_model is not None else pm
    tm = dataclasses.asdict(tm) if isinstance(tm, ModelConfig) else dict(tm)
    data: dict[str, Any] = {"run_dir": str(root), "models": {"prompt_model": pm, "target_model": tm,
                                                             "reward_model": tm}}
    for k, v in (extra_config or {}).items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    cfg = config_from_dict(data)
    templates = Templates()
    reward = optimal_reward if optimal_reward is not None else templates.initial_optimal_reward
    paths = RunPaths(root)
    paths.config.write_text(dump_config(cfg))
    write_templates(paths, templates)
    entry = HistoryEntry(iteration=0, phase="initial", accuracy=None, adapter=None, adapter_path=None,
                         optimal_reward=reward)
    BestRecord(best=entry, history=[entry]).write(paths)
    return root


SAMPLE_QUESTION = "A shop sells 3 pens at 2 dollars each. How much do the pens cost?"
"""The question every version is tried with before it is served."""


def check_servable(spec: RunSpec, max_reward_chars: int) -> None:
    """Raise :class:`RunDirError` unless ``spec`` can serve: t* within limits, templates render.

    Renders Π's request and the target's request for :data:`SAMPLE_QUESTION`, so a
    template with an unknown placeholder is refused here rather than failing every request.
    """

    reward = spec.optimal_reward
    if not isinstance(reward, str) or not has_visible_text(reward):
        raise RunDirError("optimal_reward is empty")
    if len(reward) > max_reward_chars:
        raise RunDirError(f"optimal_reward has {len(reward)} characters; the limit is {max_reward_chars}")
    try:
        reward.encode("utf-8")
        prompt_model_request(spec.templates, SAMPLE_QUESTION, reward, SamplingParams())
        spec.templates.target_messages(SAMPLE_QUESTION, "Add the prices.")
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise RunDirError(f"templates.json does not render ({type(e).__name__}: {e})") from e
