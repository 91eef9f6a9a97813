"""Baselines, ablations and TRPrompt side by side: same engines, splits, grader and cost accounting.

* :mod:`.config`: the ``compare:`` section and loading a comparison YAML;
* :mod:`.cache`: what each cached fit and test evaluation depends on (its key);
* :mod:`.runner`: :class:`Comparison`, which fits and tests every method;
* :mod:`.report`: the results and ``comparison.md`` / ``comparison.json`` / plots.
"""

from trprompt.experiments.compare.cache import fit_inputs, method_key, test_inputs, test_key
from trprompt.experiments.compare.config import (
    NO_TRAINING,
    BudgetSettings,
    CompareConfig,
    compare_config_from_dict,
    load_compare_config,
)
from trprompt.experiments.compare.report import ComparisonResult, MethodResult, write_report
from trprompt.experiments.compare.runner import Comparison

__all__ = [
    "NO_TRAINING",
    "BudgetSettings",
    "CompareConfig",
    "Comparison",
    "ComparisonResult",
    "MethodResult",
    "compare_config_from_dict",
    "fit_inputs",
    "load_compare_config",
    "method_key",
    "test_inputs",
    "test_key",
    "write_report",
]
