"""One sweep trial: its run config, its progress ledger, the hooks that report it, the sweep's token ledger.

* :func:`resolve_trial_config` turns one trial's sampled values into a validated run
  config (via :func:`~trprompt.config.apply_override`); :func:`check_trial_configs`
  validates every config the search can produce before anything starts;
* :class:`SweepHooks` are the loop hooks that report after every finished iteration,
  :class:`TrialProgress` the per-trial ledger on disk (``sweep_trial.json``);
* :class:`TokenLedger` sums the tokens of all trials (the sweep's token cap);
* :func:`adapter_prefix` names a trial's adapter namespace on shared engines.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trprompt import artifacts
from trprompt import run_dir as run_dir_format
from trprompt.config import ConfigError, TRPromptConfig, config_from_dict
from trprompt.engines.base import Usage
from trprompt.experiments.sweep.spec import SweepSpec, set_dotted
from trprompt.loop import LoopHooks
from trprompt.roles import ROLES
from trprompt.run_dir import RunPaths

PROGRESS_FILE = "sweep_trial.json"
STATUS_FILE = "tune_status.json"
"""Written by the driver after ``fit()``: ``{"status": "TERMINATED"|"ERROR", "error": ...}``."""
EARLY_STOP_FILE = "early_stopped.json"


# ------------------------------------------------------------------------- trial configs


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
        set_dotted(data, key, value, f"sweep.search.{key}")
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
    return [dataclasses.asdict(m) for m in run_dir_format.read_iteration_metrics(run_dir)]


def initial_accuracy(run_dir: str | Path) -> float | None:
    """Validation accuracy of the initial policy (``iter_0/val_initial.json``), None before it exists."""
    path = RunPaths(Path(run_dir)).val_summary(0, "initial")
    return float(artifacts.read_json(path)["accuracy"]) if path.is_file() else None


def iteration_record(run_dir: str | Path, k: int) -> dict[str, Any]:
    """The accuracies a trial reports for its finished iteration ``k`` (read from its run_dir)."""
    metrics = read_iteration_metrics(run_dir)[:k]
    if len(metrics) < k:
        raise FileNotFoundError(f"{run_dir}: iteration {k} has no metrics.json")
    m = metrics[-1]
    seen = [a for a in [initial_accuracy(run_dir)] if a is not None]
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
        while self._next <= last and RunPaths(self.run_dir).iteration_metrics(self._next).is_file():
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
