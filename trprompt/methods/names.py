"""Names of the prompting methods (kept import-light so the config can validate against them)."""

BASELINE_NAMES: tuple[str, ...] = ("plain", "cot")
"""Baselines that need no training: no instruction, and "Let's think step by step."."""

OPTIMIZER_BASELINE_NAMES: tuple[str, ...] = ("textgrad", "opro", "gepa")
"""Task-level prompt optimizers: each finds ONE instruction for the whole data set."""

TRPROMPT_NAMES: tuple[str, ...] = ("trprompt", "trprompt-fixed-reward", "trprompt-numeric-reward")
"""TRPrompt and its two ablations (t* kept fixed; numeric instead of textual reward)."""

METHOD_NAMES: tuple[str, ...] = BASELINE_NAMES + OPTIMIZER_BASELINE_NAMES + TRPROMPT_NAMES
"""Every method the comparison (``jobs/compare.py``) can run, in report order."""
