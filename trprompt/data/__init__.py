"""Benchmark data: vendored files, :class:`Problem` records and seeded splits."""

from trprompt.data.datasets import DATASETS, SPLITS, Problem, load_split, split_sizes

__all__ = ["DATASETS", "SPLITS", "Problem", "load_split", "split_sizes"]
