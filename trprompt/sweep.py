"""Hyperparameter sweeps over TRPrompt settings: everything that does not need Ray.

A sweep file names a base run config and the settings to search over; Ray Tune
(:mod:`cluster.tune_sweep`) runs one real TRPrompt training run per trial. This
module holds the parts that are plain Python, so they can be tested and reused
without a cluster:

* parsing and validating a sweep file (:func:`load_sweep_spec`,
  :func:`sweep_spec_from_dict`, :func:`check_trial_configs`), with
  :class:`~trprompt.config.ConfigError` messages that name the offending field;
* turning one trial's sampled values into a validated run config
  (:func:`resolve_trial_config`, via :func:`~trprompt.config.apply_override`);
* :class:`NamespacedEngine`, which keeps the LoRA adapter ids of trials that
  share engine actors apart;
* :class:`SweepHooks`, the loop hooks that report after every finished
  iteration, and :class:`TrialProgress`, the per-trial ledger on disk;
* :class:`TokenLedger`, the sum of tokens over all trials (the sweep's token cap);
* the outputs: the ranked trial table (parquet and Markdown), the best config as
  YAML and the accuracy-vs-tokens plot (:func:`write_sweep_outputs`).

Sweep directory layout (``sweep.run_dir``)::

    sweep.yaml                 the resolved sweep spec
    templates/<variant>.yaml   reward-template variants named in the sweep file
    trials/<trial_id>/         each trial's TRPrompt run_dir (iter_k/metrics.json, ...)
        sweep_trial.json       the trial's params, reports, tokens and wall time
        tune_status.json       Tune's final status for the trial (written by the driver)
        early_stopped.json     present when the scheduler stopped the trial early
    tune/                      Ray Tune's experiment state (resume)
    results.parquet, results.md, best_config.yaml, best.json, accuracy_vs_tokens.png
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trprompt import artifacts
from trprompt.config import ConfigError, TRPromptConfig, apply_override, config_from_dict, dump_config, load_config
from trprompt.engines.base import ChatRequest, ChatResult, Engine, Usage
from trprompt.loop import LoopHooks

ROLES = ("prompt_model", "target_model", "reward_model", "optimizer_model")
DISCRETE_KINDS = ("grid", "choice")
RANGE_KINDS = ("uniform", "loguniform", "randint", "lograndint")
SEARCH_KINDS = DISCRETE_KINDS + RANGE_KINDS
METRICS = ("val_accuracy", "best_val_accuracy", "val_after_sft", "synthetic_accuracy")
"""What a trial reports after each iteration and a sweep may optimise:

* ``val_accuracy``: validation accuracy at the end of the iteration (after the reward search);
* ``val_after_sft``: validation accuracy right after the iteration's SFT;
* ``best_val_accuracy``: the best validation accuracy so far (initial policy included), i.e.
  what the run would select if it ended now;
* ``synthetic_accuracy``: the target's accuracy on the iteration's synthetic set.
"""
SCHEDULERS = ("asha", "fifo")
PROGRESS_FILE = "sweep_trial.json"
STATUS_FILE = "tune_status.json"
"""Written by the driver after ``fit()``: ``{"status": "TERMINATED"|"ERROR", "error": ...}``."""
EARLY_STOP_FILE = "early_stopped.json"
_TOP_KEYS = ("name", "base", "overrides", "templates", "sweep")
_SWEEP_KEYS = ("metric", "mode", "search", "num_samples", "scheduler", "max_concurrent_trials", "budget",
               "resources_per_trial", "run_dir", "seed")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class SearchDim:
    """One searched setting: a dotted config key and how its values are drawn."""

    key: str
    kind: str
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    @property
    def discrete(self) -> bool:
        """True for ``grid`` and ``choice`` (a finite list of values)."""
        return self.kind in DISCRETE_KINDS

    def checkpoints(self) -> list[Any]:
        """Values that validation tries: every listed value, or both ends of a range."""
        if self.discrete:
            return list(self.values)
        if self.kind in ("randint", "lograndint"):
            # Tune's randint excludes the upper bound.
            return [int(self.low), int(self.high) - 1]  # type: ignore[arg-type]
        return [float(self.low), float(self.high)]  # type: ignore[arg-type]  # Tune samples floats here

    def describe(self) -> str:
        """Short text form, e.g. ``grid[8, 16]`` or ``uniform(0.5, 1.0)``."""
        if self.discrete:
            return f"{self.kind}{list(self.values)}"
        return f"{self.kind}({self.low}, {self.high})"


@dataclass(frozen=True)
class SchedulerSpec:
    """Early stopping: ``asha`` (asynchronous successive halving) or ``fifo`` (none)."""

    type: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None


@dataclass(frozen=True)
class SweepBudget:
    """Caps on the whole sweep (None: no cap)."""

    max_trials: int | None = None
    time_budget_s: float | None = None
    max_total_tokens: int | None = None


@dataclass
class SweepSpec:
    """A parsed, validated sweep file. Paths are absolute."""

    name: str
    base: dict[str, Any]
    search: list[SearchDim]
    run_dir: str
    metric: str = "val_accuracy"
    mode: str = "max"
    num_samples: int = 1
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    max_concurrent_trials: int | None = None
    budget: SweepBudget = field(default_factory=SweepBudget)
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    templates: dict[str, dict[str, str]] = field(default_factory=dict)
    seed: int = 0
    source: str | None = None

    @property
    def sweep_dir(self) -> Path:
        """The sweep's output folder."""
        return Path(self.run_dir)

    @property
    def trials_dir(self) -> Path:
        """Where each trial's run directory lives."""
        return self.sweep_dir / "trials"

    @property
    def tune_dir(self) -> Path:
        """Ray Tune's experiment folder (resume state)."""
        return self.sweep_dir / "tune"

    @property
    def templates_dir(self) -> Path:
        """Where the reward-template variants are written."""
        return self.sweep_dir / "templates"

    def grid_size(self) -> int:
        """Number of combinations of the ``grid`` dimensions (1 without any)."""
        return math.prod(len(d.values) for d in self.search if d.kind == "grid")

    def trial_count(self) -> int:
        """Trials the search defines: grid combinations times ``num_samples`` (how Tune counts)."""
        return self.grid_size() * self.num_samples

    def max_iterations(self) -> int:
        """The largest K any trial can run (``loop.iterations`` of the base or of the search)."""
        ks = [int(self.base.get("loop", {}).get("iterations", TRPromptConfig().loop.iterations))]
        for d in self.search:
            if d.key == "loop.iterations":
                ks.extend(int(v) for v in d.checkpoints() if isinstance(v, (int, float)))
        return max(ks)

    def to_dict(self) -> dict[str, Any]:
        """Plain form (what ``sweep.yaml`` in the sweep folder holds)."""
        d = dataclasses.asdict(self)
        d["search"] = {s.key: s.describe() for s in self.search}
        return d


def _err(path: str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {msg}" if path else msg)


def _pos_int(v: Any, path: str, allow_none: bool = False) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _err(path, f"must be a positive integer, got {v!r}")
    return v


def _pos_num(v: Any, path: str, allow_none: bool = False) -> float | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise _err(path, f"must be a positive number, got {v!r}")
    return float(v)


def _resolve_path(p: str, base_dir: Path | None) -> str:
    """Absolute form of ``p``: as given, else relative to the working directory, else to ``base_dir``."""
    path = Path(p).expanduser()
    if path.is_absolute():
        return str(path)
    if path.exists() or base_dir is None:
        return str(path.resolve())
    alt = base_dir / path
    return str(alt.resolve()) if alt.exists() else str(path.resolve())


def check_config_key(key: str, path: str) -> None:
    """Raise ConfigError unless ``key`` (dotted) names a field of :class:`~trprompt.config.TRPromptConfig`."""
    import types
    import typing

    if not key or any(not part for part in key.split(".")):
        raise _err(path, f"{key!r} is not a dotted config key like sft.lora_r")
    cls: Any = TRPromptConfig
    walked: list[str] = []
    for part in key.split("."):
        if cls is None or not dataclasses.is_dataclass(cls):
            raise _err(path, f"{'.'.join(walked)} has no sub-fields, so {key!r} names nothing")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(walked) or "the run config"
            raise _err(path, f"unknown config field {part!r} in {where} (known: {', '.join(sorted(hints))})")
        tp = hints[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
        cls = tp if dataclasses.is_dataclass(tp) else None
        walked.append(part)


def parse_search(search: Any, path: str = "sweep.search") -> list[SearchDim]:
    """Parse ``{dotted.key: {grid|choice: [...]} | {uniform|loguniform|randint|lograndint: [lo, hi]}}``."""
    if not isinstance(search, dict) or not search:
        raise _err(path, "must be a non-empty mapping of dotted config keys to {grid|choice: [...]} or "
                         "{uniform|loguniform|randint|lograndint: [lo, hi]}")
    dims: list[SearchDim] = []
    for key, spec in _flatten_search(search).items():
        where = f"{path}.{key}"
        if not isinstance(key, str):
            raise _err(path, f"keys must be dotted config keys, got {key!r}")
        if key == "run_dir":
            raise _err(where, "run_dir cannot be searched (each trial gets its own under the sweep's run_dir)")
        check_config_key(key, where)
        if not isinstance(spec, dict) or len(spec) != 1:
            raise _err(where, f"must be a mapping with exactly one of {', '.join(SEARCH_KINDS)}, got {spec!r}")
        kind, arg = next(iter(spec.items()))
        if kind not in SEARCH_KINDS:
            raise _err(where, f"unknown search kind {kind!r} (use one of {', '.join(SEARCH_KINDS)})")
        if kind in DISCRETE_KINDS:
            if not isinstance(arg, list) or not arg:
                raise _err(f"{where}.{kind}", f"must be a non-empty list of values, got {arg!r}")
            dims.append(SearchDim(key, kind, values=tuple(arg)))
            continue
        if (not isinstance(arg, list) or len(arg) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in arg)):
            raise _err(f"{where}.{kind}", f"must be [low, high] (two numbers), got {arg!r}")
        lo, hi = arg
        if not lo < hi:
            raise _err(f"{where}.{kind}", f"needs low < high, got [{lo}, {hi}]")
        if kind.startswith("log") and lo <= 0:
            raise _err(f"{where}.{kind}", f"needs low > 0 for a log scale, got {lo}")
        if kind.endswith("randint"):
            if not (isinstance(lo, int) and isinstance(hi, int)):
                raise _err(f"{where}.{kind}", f"needs integer bounds, got [{lo}, {hi}]")
            if hi - lo < 1:
                raise _err(f"{where}.{kind}", "needs high > low (the upper bound is excluded)")
        dims.append(SearchDim(key, kind, low=lo, high=hi))
    return dims


def _flatten_search(search: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Allow nested keys (``{sft: {lora_r: {grid: [...]}}}``) next to dotted ones (``sft.lora_r``)."""
    out: dict[str, Any] = {}
    for k, v in search.items():
        key = f"{prefix}{k}"
        leaf = not isinstance(v, dict) or not v or any(kind in v for kind in SEARCH_KINDS)
        if not leaf and all(isinstance(x, dict) for x in v.values()):
            out.update(_flatten_search(v, f"{key}."))
        else:
            out[key] = v
    return out


def _parse_templates(data: Any, base_dir: Path | None) -> dict[str, dict[str, str]]:
    from trprompt.templates import load_templates

    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _err("templates", "must map variant names to template overrides ({name: {template_field: text}})")
    out: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in data.items():
            where = f"templates.{name}"
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise _err("templates", f"variant names must be simple words (letters, digits, _ . -), got {name!r}")
            if not isinstance(overrides, dict):
                raise _err(where, "must be a mapping of template names to texts")
            probe = Path(tmp) / f"{name}.yaml"
            probe.write_text(yaml.safe_dump(overrides, sort_keys=False))
            try:
                load_templates(probe)
            except ValueError as e:
                raise _err(where, str(e).replace(str(probe), "this variant")) from e
            out[name] = {str(k): str(v) for k, v in overrides.items()}
    return out


def _absolutize_base(base: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """Make the path-valued fields of a run config absolute (Tune trials run in their own folders)."""
    base = copy.deepcopy(base)
    tf = base.get("templates_file")
    if isinstance(tf, str):
        base["templates_file"] = _resolve_path(tf, base_dir)
    models = base.get("models")
    if isinstance(models, dict):
        for role_cfg in models.values():
            if isinstance(role_cfg, dict) and isinstance(role_cfg.get("model"), str):
                m = role_cfg["model"]
                local = Path(m).expanduser()
                near = base_dir is not None and (base_dir / local).exists()
                if not local.is_absolute() and (local.exists() or near):
                    role_cfg["model"] = _resolve_path(m, base_dir)
    return base


def sweep_spec_from_dict(data: Any, base_dir: str | Path | None = None, name: str | None = None,
                         source: str | None = None) -> SweepSpec:
    """Parse and validate a sweep mapping (see ``docs/sweeps.md``); relative paths resolve against the
    working directory, then ``base_dir`` (usually the sweep file's folder).

    Checks the structure only; :func:`check_trial_configs` then validates every trial's run config.
    """
    bdir = Path(base_dir).resolve() if base_dir is not None else None
    if not isinstance(data, dict):
        raise ConfigError(f"a sweep file must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"unknown top-level field {unknown[0]!r} (known: {', '.join(_TOP_KEYS)})")
    # -- base run config
    if "base" not in data:
        raise _err("base", "is required: a path to a run config YAML or an inline run config mapping")
    raw_base = data["base"]
    if isinstance(raw_base, str):
        bpath = Path(_resolve_path(raw_base, bdir))
        if not bpath.is_file():
            raise _err("base", f"run config file not found: {raw_base!r}")
        try:
            base = yaml.safe_load(bpath.read_text()) or {}
        except yaml.YAMLError as e:
            raise _err("base", f"{bpath} is not valid YAML: {e}") from e
        base_files_dir: Path | None = bpath.parent
    elif isinstance(raw_base, dict):
        base, base_files_dir = copy.deepcopy(raw_base), bdir
    else:
        raise _err("base", f"must be a path or a mapping, got {type(raw_base).__name__}")
    if not isinstance(base, dict):
        raise _err("base", "the run config must be a mapping")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise _err("overrides", "must map dotted config keys to values")
    for key, value in _flatten(overrides).items():
        check_config_key(key, f"overrides.{key}")
        _set_dotted(base, key, value, f"overrides.{key}")
    base = _absolutize_base(base, base_files_dir)
    templates = _parse_templates(data.get("templates"), bdir)
    # -- sweep section
    sw = data.get("sweep")
    if not isinstance(sw, dict):
        raise _err("sweep", "is required: a mapping with metric, mode, search, ...")
    unknown = sorted(set(sw) - set(_SWEEP_KEYS))
    if unknown:
        raise _err("sweep", f"unknown field {unknown[0]!r} (known: {', '.join(_SWEEP_KEYS)})")
    metric = sw.get("metric", "val_accuracy")
    if metric not in METRICS:
        raise _err("sweep.metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
    mode = sw.get("mode", "max")
    if mode not in ("max", "min"):
        raise _err("sweep.mode", f"must be 'max' or 'min', got {mode!r}")
    search = parse_search(sw.get("search"))
    for d in search:
        if d.key == "templates_file":
            vals = []
            for v in d.values:
                if v is None or (isinstance(v, str) and v in templates):
                    vals.append(v)
                elif isinstance(v, str):
                    vals.append(_resolve_path(v, bdir))
                else:
                    raise _err(f"sweep.search.templates_file.{d.kind}",
                               f"values must be null, a templates variant name or a file path, got {v!r}")
            search[search.index(d)] = dataclasses.replace(d, values=tuple(vals))
            if not d.discrete:
                raise _err("sweep.search.templates_file", "can only be searched with grid or choice")
    num_samples = _pos_int(sw.get("num_samples", 1), "sweep.num_samples")
    sched = _parse_scheduler(sw.get("scheduler"))
    mct = _pos_int(sw.get("max_concurrent_trials"), "sweep.max_concurrent_trials", allow_none=True)
    budget = _parse_budget(sw.get("budget"))
    resources = _parse_resources(sw.get("resources_per_trial"))
    seed = sw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _err("sweep.seed", f"must be an integer, got {seed!r}")
    sweep_name = data.get("name") or name or "sweep"
    if not isinstance(sweep_name, str) or not _NAME_RE.match(sweep_name):
        raise _err("name", f"must be a simple word (letters, digits, _ . -), got {sweep_name!r}")
    run_dir = sw.get("run_dir") or f"runs/{sweep_name}"
    if not isinstance(run_dir, str):
        raise _err("sweep.run_dir", f"must be a path, got {run_dir!r}")
    spec = SweepSpec(
        name=sweep_name, base=base, search=search, run_dir=str(Path(run_dir).expanduser().resolve()),
        metric=metric, mode=mode, num_samples=num_samples, scheduler=sched,  # type: ignore[arg-type]
        max_concurrent_trials=mct, budget=budget, resources_per_trial=resources, templates=templates,
        seed=seed, source=source,
    )
    if budget.max_trials is not None and spec.trial_count() > budget.max_trials:
        raise _err("sweep.budget.max_trials",
                   f"the search defines {spec.trial_count()} trials (grid {spec.grid_size()} x num_samples "
                   f"{spec.num_samples}), more than max_trials={budget.max_trials}; lower num_samples or the grid")
    if sched.type == "asha":
        max_t = sched.max_t or spec.max_iterations()
        if sched.grace_period > max_t:
            raise _err("sweep.scheduler.grace_period",
                       f"{sched.grace_period} exceeds the most iterations a trial runs ({max_t})")
    return spec


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loop": {"iterations": 1}, "sft.lora_r": 8}`` -> ``{"loop.iterations": 1, "sft.lora_r": 8}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _parse_scheduler(data: Any) -> SchedulerSpec:
    if data is None:
        return SchedulerSpec()
    if isinstance(data, str):
        data = {"type": data}
    if not isinstance(data, dict):
        raise _err("sweep.scheduler", "must be a mapping like {type: asha, grace_period: 1, reduction_factor: 2}")
    known = ("type", "grace_period", "reduction_factor", "max_t")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise _err("sweep.scheduler", f"unknown field {unknown[0]!r} (known: {', '.join(known)})")
    typ = data.get("type", "asha")
    if typ not in SCHEDULERS:
        raise _err("sweep.scheduler.type", f"must be one of {', '.join(SCHEDULERS)}, got {typ!r}")
    grace = _pos_int(data.get("grace_period", 1), "sweep.scheduler.grace_period")
    rf = _pos_num(data.get("reduction_factor", 2.0), "sweep.scheduler.reduction_factor")
    if rf is not None and rf <= 1:
        raise _err("sweep.scheduler.reduction_factor", f"must be > 1, got {rf}")
    max_t = _pos_int(data.get("max_t"), "sweep.scheduler.max_t", allow_none=True)
    return SchedulerSpec(typ, grace, rf, max_t)  # type: ignore[arg-type]


def _parse_budget(data: Any) -> SweepBudget:
    if data is None:
        return SweepBudget()
    if not isinstance(data, dict):
        raise _err("sweep.budget", "must be a mapping with max_trials, time_budget_s, max_total_tokens")
    known = ("max_trials", "time_budget_s", "max_total_tokens")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise _err("sweep.budget", f"unknown field {unknown[0]!r} (known: {', '.join(known)})")
    return SweepBudget(
        _pos_int(data.get("max_trials"), "sweep.budget.max_trials", allow_none=True),
        _pos_num(data.get("time_budget_s"), "sweep.budget.time_budget_s", allow_none=True),
        _pos_int(data.get("max_total_tokens"), "sweep.budget.max_total_tokens", allow_none=True),
    )


def _parse_resources(data: Any) -> dict[str, float]:
    if data is None:
        return {"CPU": 1.0}
    if not isinstance(data, dict) or not data:
        raise _err("sweep.resources_per_trial", "must be a mapping like {CPU: 0.25} or {CPU: 1, GPU: 1}")
    out: dict[str, float] = {}
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise _err(f"sweep.resources_per_trial.{k}", f"must be a number >= 0, got {v!r}")
        out[str(k)] = float(v)
    if sum(out.values()) <= 0:
        raise _err("sweep.resources_per_trial", "must reserve something (e.g. CPU: 0.25)")
    return out


def load_sweep_spec(path: str | Path, overrides: Sequence[str] | None = None) -> SweepSpec:
    """Read a sweep YAML, apply ``a.b=value`` overrides to it (e.g. ``sweep.num_samples=2``), parse it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a sweep file must be a mapping")
    for ov in overrides or []:
        apply_override(data, ov)
    return sweep_spec_from_dict(data, base_dir=p.parent, name=p.stem.removeprefix("sweep-"), source=str(p.resolve()))


# ------------------------------------------------------------------------- trial configs


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _set_dotted(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """``apply_override`` with a Python value (serialised as YAML and checked to survive the round trip)."""
    text = _yaml_value(value)
    if yaml.safe_load(text) != value:
        raise _err(where, f"value {value!r} does not survive YAML round-tripping")
    apply_override(data, f"{key}={text}")


def templates_path(spec: SweepSpec, variant: str, templates_dir: Path | None = None) -> str:
    """The file holding templates variant ``variant``."""
    return str((templates_dir or spec.templates_dir) / f"{variant}.yaml")


def write_template_variants(spec: SweepSpec, templates_dir: Path | None = None) -> list[str]:
    """Write every templates variant of the sweep file to its YAML (returns the paths)."""
    out = []
    for name, overrides in spec.templates.items():
        path = Path(templates_path(spec, name, templates_dir))
        artifacts.write_text(path, yaml.safe_dump(overrides, sort_keys=False, allow_unicode=True))
        out.append(str(path))
    return out


def trial_config_dict(spec: SweepSpec, params: Mapping[str, Any], run_dir: str | Path,
                      templates_dir: Path | None = None) -> dict[str, Any]:
    """The base run config with one trial's ``params`` (dotted key -> value) applied and its own run_dir."""
    data = copy.deepcopy(spec.base)
    for key, value in params.items():
        if key == "templates_file" and isinstance(value, str) and value in spec.templates:
            value = templates_path(spec, value, templates_dir)
        _set_dotted(data, key, value, f"sweep.search.{key}")
    data["run_dir"] = str(run_dir)
    return data


def resolve_trial_config(spec: SweepSpec, params: Mapping[str, Any], run_dir: str | Path,
                         templates_dir: Path | None = None) -> TRPromptConfig:
    """The validated run config of one trial (raises :class:`ConfigError`)."""
    return config_from_dict(trial_config_dict(spec, params, run_dir, templates_dir))


def validation_points(spec: SweepSpec, limit: int = 256) -> list[dict[str, Any]]:
    """Parameter combinations to validate.

    All of them when there are at most ``limit``, else each value of each dimension with
    the other dimensions at their first value.
    """
    per_dim = [d.checkpoints() for d in spec.search]
    if math.prod(len(v) for v in per_dim) <= limit:
        return [dict(zip([d.key for d in spec.search], combo, strict=True)) for combo in itertools.product(*per_dim)]
    first = {d.key: vals[0] for d, vals in zip(spec.search, per_dim, strict=True)}
    points = [dict(first)]
    for d, vals in zip(spec.search, per_dim, strict=True):
        points.extend({**first, d.key: v} for v in vals[1:])
    return points


def check_trial_configs(spec: SweepSpec) -> int:
    """Validate the base config and every trial config the search can produce; return how many were checked.

    Ranges are checked at both ends. The first invalid one raises :class:`ConfigError` naming the field.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tdir = Path(tmp) / "templates"
        write_template_variants(spec, tdir)
        try:
            config_from_dict({**copy.deepcopy(spec.base), "run_dir": str(Path(tmp) / "base")})
        except ConfigError as e:
            raise ConfigError(f"base: {e}") from e
        points = validation_points(spec)
        for params in points:
            try:
                resolve_trial_config(spec, params, Path(tmp) / "trial", tdir)
            except ConfigError as e:
                shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
                raise ConfigError(f"sweep.search: the trial with {shown} is not a valid run config: {e}") from e
    return len(points)


# ------------------------------------------------------------------------- adapters


def adapter_prefix(trial_id: str) -> str:
    """A trial's adapter-id prefix: the trial id reduced to letters, digits and underscores."""
    return "t" + re.sub(r"[^A-Za-z0-9_]", "_", trial_id)


class NamespacedEngine:
    """An engine wrapper that prefixes every LoRA adapter id with ``prefix + "__"``.

    Trials of a sweep share engine actors, and every run names its adapters
    ``iter1``, ``iter2``, ...; through this wrapper trial A's ``iter1`` becomes
    ``tA__iter1`` on the actors, so trials never replace each other's adapters.
    Requests for the base model (``adapter=None``) pass through unchanged.
    """

    def __init__(self, inner: Engine, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix
        self.loaded: dict[str, str] = {}
        """Adapters loaded through this wrapper (namespaced id -> path)."""

    def scoped(self, adapter_id: str) -> str:
        """The id ``adapter_id`` has on the shared engine."""
        return f"{self.prefix}__{adapter_id}"

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Forward ``requests`` with their adapter ids namespaced."""
        return self.inner.generate([
            r if r.adapter is None else dataclasses.replace(r, adapter=self.scoped(r.adapter)) for r in requests
        ])

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Load ``path`` on the shared engine under the namespaced id."""
        self.inner.load_adapter(self.scoped(adapter_id), path)
        self.loaded[self.scoped(adapter_id)] = path

    def unload_adapter(self, adapter_id: str) -> None:
        """Unload the namespaced id."""
        self.inner.unload_adapter(self.scoped(adapter_id))
        self.loaded.pop(self.scoped(adapter_id), None)

    def release(self) -> None:
        """Unload every adapter this wrapper loaded (errors are ignored: the trial is ending)."""
        for scoped in list(self.loaded):
            try:
                self.inner.unload_adapter(scoped)
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
            self.loaded.pop(scoped, None)


# ------------------------------------------------------------------ per-trial progress


@dataclass
class TrialProgress:
    """What a trial has reported and spent, kept in ``<trial run_dir>/sweep_trial.json``.

    Tokens and wall time add up over attempts (a resumed trial continues the counts of
    the attempt before it).
    """

    trial_id: str
    params: dict[str, Any]
    iterations_planned: int
    reports: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    requests: int = 0
    wall_s: float = 0.0
    attempts: int = 0

    @property
    def total_tokens(self) -> int:
        """Tokens over all roles."""
        return int(sum(self.tokens.values()))

    def save(self, run_dir: str | Path) -> None:
        """Write atomically."""
        artifacts.write_json(Path(run_dir) / PROGRESS_FILE, {**dataclasses.asdict(self),
                                                              "total_tokens": self.total_tokens})

    @classmethod
    def load(cls, run_dir: str | Path) -> TrialProgress | None:
        """Read the ledger of ``run_dir`` (None when there is none)."""
        path = Path(run_dir) / PROGRESS_FILE
        if not path.is_file():
            return None
        data = artifacts.read_json(path)
        data.pop("total_tokens", None)
        return cls(**data)


def read_iteration_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """``iter_k/metrics.json`` of the finished iterations, k = 1, 2, ... up to the first missing one."""
    out = []
    for k in itertools.count(1):
        path = Path(run_dir) / f"iter_{k}" / "metrics.json"
        if not path.is_file():
            return out
        out.append(artifacts.read_json(path))
    return out  # pragma: no cover - itertools.count never ends


def _initial_accuracy(run_dir: str | Path) -> float | None:
    path = Path(run_dir) / "iter_0" / "val_initial.json"
    return float(artifacts.read_json(path)["accuracy"]) if path.is_file() else None


def iteration_record(run_dir: str | Path, k: int) -> dict[str, Any]:
    """The accuracies a trial reports for its finished iteration ``k`` (read from its run_dir)."""
    metrics = read_iteration_metrics(run_dir)[:k]
    if len(metrics) < k:
        raise FileNotFoundError(f"{run_dir}: iteration {k} has no metrics.json")
    m = metrics[-1]
    seen = [a for a in [_initial_accuracy(run_dir)] if a is not None]
    for it in metrics:
        seen.extend(float(it[p]) for p in ("val_after_sft", "val_after_reward_search") if it.get(p) is not None)
    return {
        "iteration": k,
        "val_accuracy": float(m["val_after_reward_search"]),
        "val_after_sft": float(m["val_after_sft"]),
        "synthetic_accuracy": float(m["synthetic_accuracy"]),
        "best_val_accuracy": max(seen),
    }


class SweepHooks(LoopHooks):
    """Loop hooks that report every finished iteration (and the tokens spent so far) to ``report``.

    An iteration counts as finished once its ``iter_k/metrics.json`` exists. The
    loop writes that file just after the iteration's last hook call, so each hook
    call (and :meth:`finish`, after ``trainer.run()``) checks for newly finished
    iterations and reports them in order. The last iteration is only reported by
    :meth:`finish`, so a scheduler that stops the trial at its last report does
    not cut off the run's final stages.

    ``report`` is ``ray.tune.report`` in a Tune trial; it may never return (a
    stopped trial exits inside it), so the ledger is saved before each call.
    """

    def __init__(self, run_dir: str | Path, progress: TrialProgress,
                 report: Callable[[dict[str, Any]], None]) -> None:
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.report = report
        self.trainer: Any = None
        self._base_tokens = dict(progress.tokens)
        self._base_requests = progress.requests
        self._base_wall = progress.wall_s
        self._t0 = time.monotonic()
        self._next = 1

    def attach(self, trainer: Any) -> None:
        """Read usage from ``trainer.engines[role].usage`` (metered per role) from now on."""
        self.trainer = trainer

    def replay(self) -> int:
        """Report the iterations an earlier attempt already finished (a resumed trial); returns how many.

        Tune restarts a resumed trial's report count, so the scheduler sees the
        same iteration numbers again; earlier reports are re-sent as recorded.
        """
        done = len(read_iteration_metrics(self.run_dir))
        by_k = {r["iteration"]: r for r in self.progress.reports}
        n = 0
        while self._next <= min(done, self.progress.iterations_planned - 1):
            k = self._next
            row = by_k.get(k) or {**iteration_record(self.run_dir, k), **self._spent()}
            self._send(row, replay=k in by_k)
            n += 1
        return n

    def _spent(self) -> dict[str, Any]:
        tokens = dict(self._base_tokens)
        requests = self._base_requests
        if self.trainer is not None:
            for role in ROLES:
                usage: Usage = self.trainer.engines[role].usage
                tokens[role] = tokens.get(role, 0) + usage.total_tokens
                requests += usage.requests
        wall = self._base_wall + time.monotonic() - self._t0
        self.progress.tokens, self.progress.requests, self.progress.wall_s = tokens, requests, wall
        return {
            "total_tokens": int(sum(tokens.values())),
            **{f"tokens_{r}": int(tokens.get(r, 0)) for r in ROLES},
            "requests": int(requests),
            "wall_s": round(wall, 3),
        }

    def _send(self, row: dict[str, Any], replay: bool = False) -> None:
        row = {**row, "iterations_planned": self.progress.iterations_planned}
        if not replay:
            self.progress.reports = [r for r in self.progress.reports if r["iteration"] != row["iteration"]]
            self.progress.reports.append(row)
        self.progress.save(self.run_dir)
        self._next = row["iteration"] + 1
        self.report(dict(row))

    def poll(self, final: bool = False) -> None:
        """Report newly finished iterations (the last one only when ``final``); save the ledger."""
        last = self.progress.iterations_planned if final else self.progress.iterations_planned - 1
        while self._next <= last and (self.run_dir / f"iter_{self._next}" / "metrics.json").is_file():
            self._send({**iteration_record(self.run_dir, self._next), **self._spent()})
        self._spent()
        self.progress.save(self.run_dir)

    def finish(self) -> None:
        """After ``trainer.run()``: report whatever is left, including the last iteration."""
        self.poll(final=True)

    # -- LoopHooks -------------------------------------------------------------------------
    def stage(self, iteration: int, name: str) -> None:
        """A stage starts: report iterations finished since the last call."""
        self.poll()

    def validation_accuracy(self, iteration: int, accuracy: float, phase: str) -> None:
        """Validation finished: report iterations finished since the last call."""
        self.poll()

    def usage(self, role: str, delta: Usage) -> None:
        """Tokens were spent: keep the ledger current."""
        self.poll()


# ----------------------------------------------------------------------- token budget


class TokenLedger:
    """Tokens spent by all trials of a sweep: the latest total each trial reported.

    Lazily seeded from the trials' ledgers on disk, so a sweep restored from its
    saved state still counts the tokens of trials that will not report again.
    """

    def __init__(self, trials_dir: str | Path, max_total_tokens: int | None) -> None:
        self.trials_dir = str(trials_dir)
        self.max_total_tokens = max_total_tokens
        self._totals: dict[str, int] = {}
        self._seeded = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_totals": {}, "_seeded": False}

    def _seed(self) -> None:
        if self._seeded:
            return
        self._seeded = True
        root = Path(self.trials_dir)
        if root.is_dir():
            for d in root.iterdir():
                prog = TrialProgress.load(d) if d.is_dir() else None
                if prog is not None:
                    self._totals.setdefault(prog.trial_id, prog.total_tokens)

    def record(self, trial_id: str, total_tokens: int) -> None:
        """A trial reported ``total_tokens`` spent so far."""
        self._seed()
        self._totals[trial_id] = int(total_tokens)

    def total(self) -> int:
        """Tokens spent over all trials."""
        self._seed()
        return sum(self._totals.values())

    def exhausted(self) -> bool:
        """True once the total reaches the cap."""
        return self.max_total_tokens is not None and self.total() >= self.max_total_tokens


# ---------------------------------------------------------------------- results


def _best(values: list[float], mode: str) -> float | None:
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def collect_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial folder, read from its run_dir (accuracies) and ledgers (cost, status), ranked.

    Columns: ``rank``, ``trial_id``, the searched keys, ``score`` (the sweep metric, best
    over the trial's finished iterations), ``val_accuracy`` (best end-of-iteration
    validation accuracy), ``val_accuracy_last``, ``best_val_accuracy``,
    ``iterations_completed``, ``iterations_planned``, ``stopped_early`` (by the scheduler),
    ``stop_reason`` (completed, early_stopped, budget, error, unfinished), ``status``,
    ``total_tokens``, ``tokens_<role>``, ``requests``, ``wall_s``, ``config_hash``,
    ``run_dir``, ``error``.
    """
    rows: list[dict[str, Any]] = []
    if not spec.trials_dir.is_dir():
        return rows
    keys = [d.key for d in spec.search]
    for d in sorted(spec.trials_dir.iterdir()):
        prog = TrialProgress.load(d) if d.is_dir() else None
        if prog is None:
            continue
        status = artifacts.read_json(d / STATUS_FILE) if (d / STATUS_FILE).is_file() else {}
        iters = read_iteration_metrics(d)
        records = [iteration_record(d, k) for k in range(1, len(iters) + 1)]
        per_metric = [r[spec.metric] for r in records]
        early = (d / EARLY_STOP_FILE).is_file()
        done = len(iters) >= prog.iterations_planned
        state = status.get("status", "UNKNOWN")
        if state == "ERROR":
            reason = "error"
        elif done:
            reason = "completed"
        elif early:
            reason = "early_stopped"
        elif state == "TERMINATED":
            reason = "budget"
        else:
            reason = "unfinished"
        cfg_hash = None
        if (d / "config.yaml").is_file():
            try:
                cfg_hash = load_config(d / "config.yaml").hash()
            except ConfigError:
                cfg_hash = None
        rows.append({
            "rank": 0,
            "trial_id": prog.trial_id,
            **{k: prog.params.get(k) for k in keys},
            "score": _best(per_metric, spec.mode),
            "val_accuracy": _best([r["val_accuracy"] for r in records], "max"),
            "val_accuracy_last": records[-1]["val_accuracy"] if records else None,
            "best_val_accuracy": records[-1]["best_val_accuracy"] if records else _initial_accuracy(d),
            "iterations_completed": len(iters),
            "iterations_planned": prog.iterations_planned,
            "stopped_early": reason == "early_stopped",
            "stop_reason": reason,
            "status": state,
            "total_tokens": prog.total_tokens,
            **{f"tokens_{r}": int(prog.tokens.get(r, 0)) for r in ROLES},
            "requests": prog.requests,
            "wall_s": round(prog.wall_s, 2),
            "attempts": prog.attempts,
            "config_hash": cfg_hash,
            "run_dir": str(d),
            "error": status.get("error"),
        })
    sign = -1.0 if spec.mode == "max" else 1.0
    rows.sort(key=lambda r: (r["score"] is None, sign * (r["score"] or 0.0), r["total_tokens"], r["trial_id"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _table_safe(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Searched columns whose values mix types (e.g. null and a number) become strings for parquet."""
    out = [dict(r) for r in rows]
    for k in keys:
        kinds = {type(r.get(k)) for r in out if r.get(k) is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            for r in out:
                r[k] = None if r.get(k) is None else str(r[k])
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str) and "/" in v:
        return Path(v).name
    return str(v)


def results_markdown(spec: SweepSpec, rows: list[dict[str, Any]], summary: Mapping[str, Any]) -> str:
    """The trial table as Markdown, best first, with a short header."""
    keys = [d.key for d in spec.search]
    lines = [
        f"# Sweep `{spec.name}`",
        "",
        f"- metric: `{spec.metric}` ({spec.mode}); score = best value over a trial's finished iterations",
        f"- trials: {len(rows)}; tokens spent: {summary.get('total_tokens', 0):,}; "
        f"token cap: {spec.budget.max_total_tokens or 'none'}; time budget: "
        f"{f'{spec.budget.time_budget_s:g} s' if spec.budget.time_budget_s else 'none'}",
        f"- best trial: `{summary.get('best_trial') or '-'}`; best config: `best_config.yaml`",
        "",
    ]
    cols = ["rank", "trial_id", *keys, "score", "val_accuracy", "iterations_completed", "iterations_planned",
            "stopped_early", "stop_reason", "total_tokens", "wall_s"]
    heads = ["rank", "trial", *keys, "score", "val acc", "iters", "K", "stopped early", "stop reason", "tokens",
             "wall s"]
    lines.append("| " + " | ".join(heads) + " |")
    lines.append("|" + "|".join("---" for _ in heads) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_tokens(spec: SweepSpec, rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Per trial, the sweep metric after each iteration against the tokens spent so far (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        prog = TrialProgress.load(r["run_dir"])
        reports = sorted(prog.reports, key=lambda x: x["iteration"]) if prog else []
        if not reports:
            continue
        xs = [x["total_tokens"] for x in reports]
        ys = [x.get(spec.metric) for x in reports]
        style = "--" if r["stop_reason"] != "completed" else "-"
        width = 2.5 if r["rank"] == 1 else 1.2
        ax.plot(xs, ys, style, marker="o", linewidth=width, label=f"#{r['rank']} {r['trial_id']}")
    ax.set_xlabel("tokens spent (all roles)")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"sweep {spec.name}: {spec.metric} vs tokens (dashed: stopped before K)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def best_trial_config(spec: SweepSpec, row: Mapping[str, Any]) -> TRPromptConfig:
    """The run config of a table row, rebuilt from its params (the trial's run_dir kept)."""
    prog = TrialProgress.load(row["run_dir"])
    params = prog.params if prog is not None else {d.key: row[d.key] for d in spec.search}
    return resolve_trial_config(spec, params, row["run_dir"])


def write_sweep_outputs(spec: SweepSpec, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the sweep's outputs and return its summary (also saved as ``best.json``).

    Outputs: ``results.parquet``, ``results.md``, ``best_config.yaml``, ``best.json`` and
    ``accuracy_vs_tokens.png`` in the sweep folder.
    """
    rows = collect_trials(spec)
    sd = spec.sweep_dir
    best = next((r for r in rows if r["score"] is not None), None)
    summary: dict[str, Any] = {
        "name": spec.name,
        "metric": spec.metric,
        "mode": spec.mode,
        "trials": len(rows),
        "total_tokens": sum(r["total_tokens"] for r in rows),
        "best_trial": best["trial_id"] if best else None,
        "best_score": best["score"] if best else None,
        "best_run_dir": best["run_dir"] if best else None,
        "best_params": {d.key: best[d.key] for d in spec.search} if best else None,
        "stop_reasons": {k: sum(r["stop_reason"] == k for r in rows) for k in sorted({r["stop_reason"] for r in rows})},
        **(extra or {}),
    }
    keys = [d.key for d in spec.search]
    artifacts.write_parquet(sd / "results.parquet", _table_safe(rows, keys))
    artifacts.write_text(sd / "results.md", results_markdown(spec, rows, summary))
    if best is not None:
        cfg = best_trial_config(spec, best)
        header = (f"# Best config of sweep {spec.name}: trial {best['trial_id']}, {spec.metric} = {best['score']}\n"
                  f"# run_dir is the trial's own: running it again resumes that run (e.g. with\n"
                  f"# --set eval.run_test=true to add the test evaluation); change run_dir for a fresh run.\n")
        artifacts.write_text(sd / "best_config.yaml", header + dump_config(cfg))
        summary["best_config"] = str(sd / "best_config.yaml")
    plot_accuracy_vs_tokens(spec, rows, sd / "accuracy_vs_tokens.png")
    artifacts.write_json(sd / "best.json", summary)
    summary["rows"] = rows
    return summary


def write_spec(spec: SweepSpec) -> Path:
    """Save the resolved spec as ``sweep.yaml`` in the sweep folder."""
    return artifacts.write_text(spec.sweep_dir / "sweep.yaml",
                                yaml.safe_dump(json.loads(json.dumps(spec.to_dict(), default=str)), sort_keys=False))
