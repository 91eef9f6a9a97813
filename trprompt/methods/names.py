"""Names of the prompting methods (import-light: the comparison config validates against them).

The untrained baselines' names live in :mod:`trprompt.config` (the run config's
``eval.baselines`` is checked against them, and the config imports nothing above it).
"""

from trprompt.config import BASELINE_NAMES

OPTIMIZER_BASELINE_NAMES: tuple[str, ...] = ("textgrad", "opro", "gepa")
"""Task-level prompt optimizers: each finds ONE instruction for the whole data set."""

TRPROMPT_NAMES: tuple[str, ...] = ("trprompt", "trprompt-fixed-reward", "trprompt-numeric-reward")
"""TRPrompt and its two ablations (t* kept fixed; numeric instead of textual reward)."""

METHOD_NAMES: tuple[str, ...] = BASELINE_NAMES + OPTIMIZER_BASELINE_NAMES + TRPROMPT_NAMES
"""Every method the comparison (``jobs/compare.py``) can run, in report order."""
