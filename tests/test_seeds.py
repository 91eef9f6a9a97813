"""Seeds: two runs with the same seed leave identical artifacts on the HF engine; another seed differs.

Tiny random Llama for every role, in-process engines and in-process LoRA SFT, K=1, N=4.
Π samples the synthetic set at temperature 0.9 (per-request seeds), the reward search
proposes at temperature 0.9 (seeded), SFT shuffles and initialises LoRA from the seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.sft_trainer import LocalSFT
from trprompt.config import config_from_dict
from trprompt.engines.factory import build_engine
from trprompt.loop import TRPromptTrainer
from trprompt.run_dir import compare_runs

ROLES = ("prompt_model", "target_model", "reward_model", "optimizer_model")


def tiny_run(model: Path, run_dir: Path, seed: int) -> None:
    role = {"model": str(model), "engine": "hf", "threads": 1, "max_batch_size": 16}
    cfg = config_from_dict({
        "run_dir": str(run_dir),
        "seed": seed,
        "dataset": {"name": "gsm8k", "train_limit": 16, "val_limit": 3, "test_limit": 3},
        "models": {"prompt_model": role, "target_model": role, "reward_model": role},
        "generation": {"prompt_max_tokens": 10, "target_max_tokens": 8, "reward_max_tokens": 8, "batch_size": 8},
        "loop": {"iterations": 1, "synthetic_size": 4},
        "sft": {"lora_r": 4, "lora_alpha": 8, "epochs": 1, "batch_size": 2, "learning_rate": 1e-3,
                "max_length": 256},
        "reward_search": {"steps": 1, "candidates_per_step": 2, "val_questions": 3, "optimizer_max_tokens": 24,
                          "max_tag_retries": 0},
        "eval": {"baselines": ["plain"]},
    })
    engine = build_engine(cfg.models.prompt_model)
    TRPromptTrainer(cfg, {r: engine for r in ROLES}, LocalSFT(), str(model), progress=False).run()


@pytest.mark.slow
def test_same_seed_same_artifacts_other_seed_differs(tmp_path, tiny_model_dir):
    tiny_run(tiny_model_dir, tmp_path / "a", seed=3)
    tiny_run(tiny_model_dir, tmp_path / "b", seed=3)
    tiny_run(tiny_model_dir, tmp_path / "c", seed=4)
    same = compare_runs(tmp_path / "a", tmp_path / "b")
    assert same.same, "\n".join(same.lines())
    assert {"iter_1/synthetic_set.parquet", "iter_1/adapter/adapter_model.safetensors", "best.json",
            "iter_1/reward_search.json", "test/trprompt.json"} <= set(same.identical)
    other = compare_runs(tmp_path / "a", tmp_path / "c")
    # Another seed samples other training questions and other instructions, and trains another adapter.
    assert "iter_1/synthetic_set.parquet" in other.different
    assert "iter_1/adapter/adapter_model.safetensors" in other.different
