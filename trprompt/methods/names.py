"""Names of the prompting methods (kept import-light so the config can validate against them)."""

BASELINE_NAMES: tuple[str, ...] = ("plain", "cot")
"""Baselines that need no training: no instruction, and "Let's think step by step."."""
