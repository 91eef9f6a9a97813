"""Reading a run directory into a servable version (cluster/serve/run_spec.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_fixtures import REWARD_A


def test_run_spec_reads_the_run_dir(serve_runs: dict[str, Path]) -> None:
    from cluster.serve.run_spec import RunDirError, RunSpec, reward_hash

    a, b = RunSpec.from_run_dir(serve_runs["a"]), RunSpec.from_run_dir(serve_runs["b"])
    assert a.adapter_name == "iter2" and Path(a.adapter_path or "").name == "adapter"
    assert a.optimal_reward == REWARD_A and a.reward_version == reward_hash(REWARD_A)
    assert a.val_accuracy == 0.5 and b.val_accuracy == 0.625
    assert a.adapter_version != b.adapter_version  # different weights, different content hash
    with pytest.raises(RunDirError):
        RunSpec.from_run_dir(serve_runs["a"] / "iter_2")
