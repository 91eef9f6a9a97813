"""The comparison config: a run config plus the ``compare:`` section (:class:`CompareConfig`).

A comparison config is a YAML file with two sections::

    run:      # an ordinary TRPrompt run config (models, dataset, generation, loop, sft, ...)
      ...
    compare:  # what to compare and how much each method may spend
      methods: [plain, cot, textgrad, opro, gepa, trprompt]
      ...

so :func:`trprompt.config.load_config` keeps working on plain run configs. Every
method optimises on the training/validation split of ``run.dataset`` (SVAMP has
no training split: optimise on GSM8K and set ``compare.test_dataset: svamp``) and
is then evaluated on the test split of ``compare.test_dataset``.

Budgets: ``compare.budget`` caps each task-level optimiser (textgrad, opro, gepa)
in metric calls (target requests) and LLM requests; ``compare.budgets.<method>``
overrides it per method. The TRPrompt variants spend what their loop config asks
for (``run.loop``, ``run.reward_search``), capped only by ``compare.budgets`` if
given; the report shows what every method really spent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trprompt.config import (
    DATASETS,
    ConfigError,
    TRPromptConfig,
    _build,
    apply_override,
    config_from_dict,
    read_yaml,
)
from trprompt.methods import METHOD_NAMES, TRPROMPT_NAMES
from trprompt.methods.base import MethodBudget
from trprompt.methods.gepa_method import GEPASettings
from trprompt.methods.opro import OPROSettings
from trprompt.methods.textgrad_task import TextGradSettings

NO_TRAINING = ("plain", "cot")
"""Methods that need no training data."""


@dataclass
class BudgetSettings:
    """A method's spending cap while it optimises (``None``: no cap)."""

    max_metric_calls: int | None = None
    max_llm_requests: int | None = None

    def validate(self, path: str) -> None:
        """Raise ConfigError for values out of range."""
        for k in ("max_metric_calls", "max_llm_requests"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"{path}.{k} must be >= 1 or null, got {v}")

    def as_budget(self) -> MethodBudget:
        """The :class:`MethodBudget` the meters enforce."""
        return MethodBudget(self.max_metric_calls, self.max_llm_requests)


BUDGET_MATCH_UNITS = ("target_calls", "tokens")
"""What a budget-matched comparison equalises: target-model calls (metric calls) or tokens (all roles)."""


@dataclass
class BudgetMatch:
    """Budget-matched mode: every optimising method gets the same cap and spends it (set exactly one field).

    ``target_calls``: target-model requests while optimising (each answers and grades one problem);
    ``tokens``: prompt + completion tokens over all roles while optimising. TextGrad, OPRO and GEPA
    run until the next step no longer fits (their step counts become unlimited); the TRPrompt
    variants spend what their loop config asks for under the same cap (a loop config that needs more
    fails with a budget error in the report: lower ``run.loop`` or ``run.reward_search`` sizes).
    """

    target_calls: int | None = None
    tokens: int | None = None

    def validate(self, path: str) -> None:
        """Raise ConfigError unless exactly one positive cap is set."""
        set_ = [k for k in BUDGET_MATCH_UNITS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ConfigError(f"{path}: set exactly one of {', '.join(BUDGET_MATCH_UNITS)}, got {set_ or 'none'}")
        v = getattr(self, set_[0])
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{path}.{set_[0]} must be a positive integer, got {v!r}")

    @property
    def unit(self) -> str:
        """``target_calls`` or ``tokens``."""
        return "target_calls" if self.target_calls is not None else "tokens"

    @property
    def amount(self) -> int:
        """The cap every optimising method gets."""
        return int(self.target_calls if self.target_calls is not None else self.tokens)  # type: ignore[arg-type]

    def describe(self) -> str:
        """E.g. ``400 target calls`` or ``200000 tokens``."""
        return f"{self.amount} {'target calls' if self.unit == 'target_calls' else 'tokens'}"


def parse_budget_flag(text: str) -> list[str]:
    """``--budget target_calls=N`` (or ``tokens=N``) as config overrides of ``compare.budget_match``."""
    unit, sep, value = text.partition("=")
    unit = unit.strip()
    if not sep or unit not in BUDGET_MATCH_UNITS:
        raise ConfigError(f"--budget {text!r}: use target_calls=N or tokens=N")
    other = next(u for u in BUDGET_MATCH_UNITS if u != unit)
    return [f"compare.budget_match.{unit}={value.strip()}", f"compare.budget_match.{other}=null"]


@dataclass
class CompareConfig:
    """The ``compare:`` section of a comparison config."""

    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    """Methods to run, in report order."""
    test_dataset: str | None = None
    """Data set whose test split every method is evaluated on (``None``: ``run.dataset.name``)."""
    test_limit: int | None = None
    """Test questions (``None``: ``run.dataset.test_limit``)."""
    transfer_datasets: list[str] | None = None
    """``--transfer``: other test sets each trained policy is evaluated on (``None``: all the others)."""
    transfer_limit: int | None = None
    """Questions per transfer test set (``None``: ``test_limit``)."""
    budget: BudgetSettings = field(default_factory=lambda: BudgetSettings(max_metric_calls=400))
    """Default cap of textgrad, opro and gepa."""
    budgets: dict[str, BudgetSettings] = field(default_factory=dict)
    """Per-method caps (any method, TRPrompt variants included)."""
    budget_match: BudgetMatch | None = None
    """Budget-matched mode (:class:`BudgetMatch`): replaces ``budget`` and ``budgets``."""
    textgrad: TextGradSettings = field(default_factory=TextGradSettings)
    opro: OPROSettings = field(default_factory=OPROSettings)
    gepa: GEPASettings = field(default_factory=GEPASettings)
    test_chunk: int = 16
    """Test questions evaluated per chunk; finished chunks are checkpointed (an interrupted test resumes)."""
    plots: bool = True
    """Write the PNG plots."""

    def validate(self, run: TRPromptConfig) -> CompareConfig:
        """Check every field against the run config; raise ConfigError naming the first bad one."""
        if not self.methods:
            raise ConfigError("compare.methods must not be empty")
        for i, m in enumerate(self.methods):
            if m not in METHOD_NAMES:
                raise ConfigError(f"compare.methods[{i}]: unknown method {m!r}; choose from {', '.join(METHOD_NAMES)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("compare.methods lists a method twice")
        for k in ("test_dataset",):
            v = getattr(self, k)
            if v is not None and v not in DATASETS and not Path(v).exists():
                raise ConfigError(f"compare.{k} must be one of {DATASETS} or an existing file or folder, got {v!r}")
        for i, d in enumerate(self.transfer_datasets or []):
            if d not in DATASETS and not Path(d).exists():
                raise ConfigError(f"compare.transfer_datasets[{i}] must be one of {DATASETS} or an existing file "
                                  f"or folder, got {d!r}")
        for k in ("test_limit", "transfer_limit", "test_chunk"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"compare.{k} must be >= 1 or null, got {v}")
        self.budget.validate("compare.budget")
        if self.budget_match is not None:
            self.budget_match.validate("compare.budget_match")
            if self.budgets:
                raise ConfigError("compare.budgets cannot be combined with compare.budget_match (every method gets "
                                  "the matched budget)")
        for name, b in self.budgets.items():
            if name not in METHOD_NAMES:
                raise ConfigError(f"compare.budgets: unknown method {name!r}")
            b.validate(f"compare.budgets.{name}")
        self.textgrad.validate("compare.textgrad")
        self.opro.validate("compare.opro")
        self.gepa.validate("compare.gepa")
        if run.dataset.name == "svamp" and any(m not in NO_TRAINING for m in self.methods):
            raise ConfigError("run.dataset.name is svamp, which has no training split: optimise on another data set "
                              "(e.g. gsm8k) and set compare.test_dataset: svamp")
        gepa_budget = self.budget_for("gepa")
        if "gepa" in self.methods and gepa_budget.max_metric_calls is None and gepa_budget.max_tokens is None:
            raise ConfigError("gepa needs a metric-call budget: set compare.budget.max_metric_calls "
                              "or compare.budgets.gepa.max_metric_calls")
        return self

    def budget_for(self, method: str) -> MethodBudget:
        """The cap ``method`` optimises under (see the module docstring and :class:`BudgetMatch`)."""
        if self.budget_match is not None:
            if method in NO_TRAINING:
                return MethodBudget()
            m = self.budget_match
            return MethodBudget(max_metric_calls=m.target_calls, max_tokens=m.tokens,
                                exhaust=method not in TRPROMPT_NAMES)
        if method in self.budgets:
            return self.budgets[method].as_budget()
        if method in TRPROMPT_NAMES or method in NO_TRAINING:
            return MethodBudget()
        return self.budget.as_budget()

    def settings_for(self, method: str) -> Any:
        """The settings object of ``method`` (``None`` for methods without one)."""
        return {"textgrad": self.textgrad, "opro": self.opro, "gepa": self.gepa}.get(method)

    def test_set(self, run: TRPromptConfig) -> tuple[str, int | None]:
        """(data set, limit) of the main test evaluation."""
        limit = self.test_limit if self.test_limit is not None else run.dataset.test_limit
        return self.test_dataset or run.dataset.name, limit

    def transfer_sets(self, run: TRPromptConfig) -> list[tuple[str, int | None]]:
        """(data set, limit) of each transfer evaluation."""
        main, limit = self.test_set(run)
        names = self.transfer_datasets if self.transfer_datasets is not None else [d for d in DATASETS if d != main]
        t_limit = self.transfer_limit if self.transfer_limit is not None else limit
        return [(d, t_limit) for d in names if d != main]


def compare_config_from_dict(data: Mapping[str, Any], run: TRPromptConfig) -> CompareConfig:
    """Build and validate the ``compare:`` section."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"compare must be a mapping, got {type(data).__name__}")
    data = dict(data)
    raw_budgets = data.pop("budgets", None) or {}
    if not isinstance(raw_budgets, Mapping):
        raise ConfigError("compare.budgets must be a mapping of method name to budget")
    cmp = _build(CompareConfig, data, "compare")
    cmp.budgets = {str(k): _build(BudgetSettings, v or {}, f"compare.budgets.{k}") for k, v in raw_budgets.items()}
    return cmp.validate(run)


def load_compare_config(path: str | Path, overrides: Sequence[str] | None = None
                        ) -> tuple[TRPromptConfig, CompareConfig]:
    """Load a comparison YAML (``run:`` + ``compare:``), apply ``run.a.b=v`` / ``compare.a.b=v`` overrides, validate."""
    p = Path(path)
    data = read_yaml(p, mapping_error="a comparison config must be a mapping with 'run' and 'compare'")
    unknown = sorted(set(data) - {"run", "compare"})
    if unknown:
        raise ConfigError(f"unknown top-level key {unknown[0]!r} (a comparison config has 'run' and 'compare')")
    for ov in overrides or []:
        if not (ov.startswith("run.") or ov.startswith("compare.")):
            raise ConfigError(f"override {ov!r} must start with run. or compare.")
        apply_override(data, ov)
    try:
        run = config_from_dict(data.get("run") or {})
    except ConfigError as e:
        raise ConfigError(f"run: {e}") from e
    return run, compare_config_from_dict(data.get("compare") or {}, run)
