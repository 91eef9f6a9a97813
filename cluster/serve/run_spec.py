"""What is being served: a run directory resolved into a :class:`RunSpec` (config, templates, adapter, t*)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trprompt.config import ModelConfig, TRPromptConfig, config_from_dict
from trprompt.templates import TEMPLATES_VERSION, Templates

log = logging.getLogger("trprompt.serve")


class RunDirError(ValueError):
    """A run directory (or an adapter path) cannot be served; the message says why."""


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
        """Read ``config.yaml``, ``best.json`` and ``templates.json`` of a finished run."""
        root = Path(run_dir).expanduser().resolve()
        if not root.is_dir():
            raise RunDirError(f"run directory not found: {run_dir}")
        cfg_path, best_path = root / "config.yaml", root / "best.json"
        if not cfg_path.is_file():
            raise RunDirError(f"{root}: no config.yaml (not a TRPrompt run directory)")
        if not best_path.is_file():
            raise RunDirError(f"{root}: no best.json (the run has not finished)")
        try:
            raw = yaml.safe_load(cfg_path.read_text()) or {}
            if not isinstance(raw, dict):
                raise RunDirError(f"{cfg_path}: not a mapping")
            raw["templates_file"] = None  # the resolved texts are in templates.json
            config = config_from_dict(raw)
            best = json.loads(best_path.read_text())
        except (ValueError, yaml.YAMLError, OSError) as e:
            raise RunDirError(f"{root}: unreadable run artifacts: {e}") from e
        if not isinstance(best, dict):
            raise RunDirError(f"{best_path}: not a JSON object")
        templates = _read_templates(root / "templates.json")
        reward = best.get("optimal_reward") or templates.initial_optimal_reward
        if not isinstance(reward, str):
            raise RunDirError(f"{best_path}: optimal_reward must be a string")
        adapter_name = best.get("adapter")
        adapter_path = _locate_adapter(root, best) if adapter_name else None
        acc = best.get("accuracy")
        return cls(
            run_dir=str(root),
            run_id=f"{root.name}@{config.hash()}",
            config=config,
            templates=templates,
            optimal_reward=reward,
            adapter_name=str(adapter_name) if adapter_name else None,
            adapter_path=str(adapter_path) if adapter_path else None,
            adapter_version=f"{adapter_name}@{adapter_fingerprint(adapter_path)}" if adapter_path else "base",
            reward_version=reward_hash(reward),
            iteration=best.get("iteration"),
            phase=best.get("phase"),
            val_accuracy=float(acc) if isinstance(acc, (int, float)) else None,
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


def _read_templates(path: Path) -> Templates:
    if not path.is_file():
        return Templates()
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise RunDirError(f"{path}: unreadable: {e}") from e
    names = {f.name for f in dataclasses.fields(Templates)}
    version = data.get("version")
    if version not in (None, TEMPLATES_VERSION):
        log.warning("%s has templates version %s; this code has %s", path, version, TEMPLATES_VERSION)
    return Templates(**{k: v for k, v in data.items() if k in names and isinstance(v, str)})


def _check_adapter_dir(p: Path) -> None:
    if not (p / "adapter_config.json").is_file():
        raise RunDirError(f"{p}: not a peft adapter folder (no adapter_config.json)")


def _locate_adapter(root: Path, best: dict[str, Any]) -> Path:
    """The adapter folder of ``best.json``: inside the run dir first (runs may be moved), then as recorded."""
    candidates = []
    if isinstance(best.get("iteration"), int):
        candidates.append(root / f"iter_{best['iteration']}" / "adapter")
    recorded = best.get("adapter_path")
    if isinstance(recorded, str) and recorded:
        rp = Path(recorded).expanduser()
        candidates += [rp] if rp.is_absolute() else [root.parent / rp, root / rp, Path.cwd() / rp]
    for c in candidates:
        if (c / "adapter_config.json").is_file():
            return c.resolve()
    raise RunDirError(f"{root}: best.json names adapter {best.get('adapter')!r} but none of "
                      f"{[str(c) for c in candidates]} holds a peft adapter")


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
    (root / "config.yaml").write_text(dump_config(cfg))
    (root / "templates.json").write_text(json.dumps({"version": TEMPLATES_VERSION,
                                                     **dataclasses.asdict(templates)}, indent=2))
    entry = {"iteration": 0, "phase": "initial", "accuracy": None, "adapter": None, "adapter_path": None,
             "optimal_reward": reward}
    (root / "best.json").write_text(json.dumps({**entry, "history": [entry]}, indent=2))
    return root
