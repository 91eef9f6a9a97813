"""Hyperparameter sweeps over TRPrompt settings: everything that does not need Ray.

Ray Tune (:mod:`cluster.tune_sweep`) runs one real TRPrompt training run per trial;
the plain-Python parts live here, one idea per module:

* :mod:`.spec`: the sweep file, parsed and validated (:func:`load_sweep_spec`);
* :mod:`.trials`: one trial's config, progress ledger and reporting hooks, and the
  sweep-wide token ledger;
* :mod:`.results`: the ranked table, the best config and the accuracy-vs-tokens plot.
"""

from trprompt.experiments.sweep.results import collect_trials, write_sweep_outputs
from trprompt.experiments.sweep.spec import SweepSpec, load_sweep_spec, sweep_spec_from_dict, write_spec
from trprompt.experiments.sweep.trials import (
    EARLY_STOP_FILE,
    STATUS_FILE,
    SweepHooks,
    TokenLedger,
    TrialProgress,
    adapter_prefix,
    check_trial_configs,
    resolve_trial_config,
)

__all__ = [
    "EARLY_STOP_FILE",
    "STATUS_FILE",
    "SweepHooks",
    "SweepSpec",
    "TokenLedger",
    "TrialProgress",
    "adapter_prefix",
    "check_trial_configs",
    "collect_trials",
    "load_sweep_spec",
    "resolve_trial_config",
    "sweep_spec_from_dict",
    "write_spec",
    "write_sweep_outputs",
]
