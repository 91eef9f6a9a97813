"""The sweep file: its typed form (:class:`SweepSpec`) and the parser that validates it.

A sweep file names a base run config and the settings to search over; Ray Tune
(:mod:`cluster.tune_sweep`) runs one real TRPrompt training run per trial. Parsing
(:func:`load_sweep_spec`, :func:`sweep_spec_from_dict`) raises
:class:`~trprompt.config.ConfigError` messages that name the offending field;
:func:`trprompt.experiments.sweep.trials.check_trial_configs` then validates every
trial config the search can produce.

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
import json
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trprompt import artifacts
from trprompt.config import DATASETS, ConfigError, TRPromptConfig, apply_override, read_yaml

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
    ds = base.get("dataset")
    if isinstance(ds, str):
        ds = base["dataset"] = {"name": ds}
    if isinstance(ds, dict):  # a task's data file/folder (a built-in name is not a path)
        for key in ("name", "test_file"):
            v = ds.get(key)
            if isinstance(v, str) and v not in DATASETS and not Path(v).is_absolute():
                near = base_dir is not None and (base_dir / v).exists()
                if Path(v).exists() or near:
                    ds[key] = _resolve_path(v, base_dir)
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
        set_dotted(base, key, value, f"overrides.{key}")
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
    data = read_yaml(p, kind="sweep file", mapping_error="a sweep file must be a mapping")
    for ov in overrides or []:
        apply_override(data, ov)
    return sweep_spec_from_dict(data, base_dir=p.parent, name=p.stem.removeprefix("sweep-"), source=str(p.resolve()))


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def set_dotted(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """``apply_override`` with a Python value (serialised as YAML and checked to survive the round trip)."""
    text = _yaml_value(value)
    if yaml.safe_load(text) != value:
        raise _err(where, f"value {value!r} does not survive YAML round-tripping")
    apply_override(data, f"{key}={text}")


def write_spec(spec: SweepSpec) -> Path:
    """Save the resolved spec as ``sweep.yaml`` in the sweep folder."""
    return artifacts.write_text(spec.sweep_dir / "sweep.yaml",
                                yaml.safe_dump(json.loads(json.dumps(spec.to_dict(), default=str)), sort_keys=False))


# ------------------------------------------------------------------------- resume fingerprint

FINGERPRINT_FILE = "fingerprint.json"
"""``{"fingerprint": ..., "inputs": {...}}`` of the settings the sweep's results depend on."""
SUPERSEDED_DIR = "superseded"
"""Where the trials and Tune state of a sweep run under other settings are moved (nothing is deleted)."""


def sweep_inputs(spec: SweepSpec) -> dict[str, Any]:
    """What the sweep's trials and results depend on, as fingerprint inputs.

    The base run config (without run_dir and speed-only knobs), the grader and templates
    versions and texts, the searched dimensions, the template variants, the metric, mode,
    sample count, seed and scheduler. Left out: ``resources_per_trial``,
    ``max_concurrent_trials``, the budget caps (they decide when to stop, not what a
    trial computes) and the names of files and folders.
    """
    from trprompt.config import config_from_dict
    from trprompt.experiments.fingerprints import run_inputs
    from trprompt.fingerprint import fingerprint
    from trprompt.templates import load_templates

    base = config_from_dict({**copy.deepcopy(spec.base), "run_dir": "unused"})
    search = []
    for d in spec.search:
        values = list(d.values)
        if d.key == "templates_file":  # a file path stands for its text, a variant name for the variant's text
            values = [v if v is None or v in spec.templates else fingerprint(dataclasses.asdict(load_templates(v)))
                      for v in values]
        search.append({"key": d.key, "kind": d.kind, "values": values, "low": d.low, "high": d.high})
    return {
        **{f"base.{k}": v for k, v in run_inputs(base, load_templates(base.templates_file)).items()},
        "search": search,
        "templates.variants": spec.templates,
        "metric": spec.metric,
        "mode": spec.mode,
        "num_samples": spec.num_samples,
        "seed": spec.seed,
        "scheduler": dataclasses.asdict(spec.scheduler),
    }


def prepare_sweep_dir(spec: SweepSpec) -> list[str] | None:
    """Make the sweep folder safe to resume: its saved trials must come from the same settings.

    When the folder holds trials or Tune state recorded under a different fingerprint,
    they are moved to ``superseded/<old fingerprint>/`` (so the sweep starts afresh and no
    stale number reaches the table) and the changed setting names are returned. Returns
    None when there is nothing to supersede. A sweep folder from before fingerprints
    (no ``fingerprint.json``) is resumed as it is. Writes the current fingerprint.
    """
    from trprompt.fingerprint import changed_fields, fingerprint

    inputs = sweep_inputs(spec)
    fp = fingerprint(inputs)
    path = spec.sweep_dir / FINGERPRINT_FILE
    old = artifacts.read_json(path) if path.is_file() else None
    changed: list[str] | None = None
    if old is not None and old.get("fingerprint") != fp:
        changed = changed_fields(old.get("inputs"), inputs)
        dest = spec.sweep_dir / SUPERSEDED_DIR / str(old.get("fingerprint"))
        n = 1
        while dest.exists():  # the same old settings superseded before: keep both
            n += 1
            dest = dest.with_name(f"{old.get('fingerprint')}-{n}")
        dest.mkdir(parents=True)
        for name in ("trials", "tune", "templates", "results.parquet", "results.md", "best_config.yaml", "best.json",
                     "accuracy_vs_tokens.png", "sweep.yaml", FINGERPRINT_FILE):
            src = spec.sweep_dir / name
            if src.exists():
                src.rename(dest / name)
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(path, {"fingerprint": fp, "inputs": inputs})
    return changed
