"""Shared fixtures: the tiny random Llama, one Ray instance per test session, test env."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["serve_fixtures"]  # the serving tests' shared Serve app (tests/test_serve_*.py)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TEXTGRAD_LOG_DIR", os.path.join(tempfile.gettempdir(), "trprompt-textgrad-logs"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dtype auto -> float32 on every machine, so exact-output tests do not depend on the CPU's bfloat16 support
# (tests/test_dtype.py covers the detection itself).
os.environ.setdefault("TRPROMPT_CPU_BF16", "0")
# Likewise float32 weights stay unpacked (MKL's sgemm, rows prefilled one at a time) unless a test asks:
# whether packing pays is timed per machine (tests/test_cpu_speed.py covers it). bfloat16 ones are packed.
os.environ.setdefault("TRPROMPT_CPU_PACK", "bfloat16")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, saved once per session."""
    from trprompt.testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting Ray takes ~15 s)."""
    import ray

    if not ray.is_initialized():
        # address="local": never attach to some other Ray cluster running on this machine.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    yield ray
