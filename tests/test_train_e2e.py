"""The whole loop on the tiny random model: real HF engines, real LoRA SFT, real TextGrad.

* in-process through real Ray actors and a real Ray Train run (K=2);
* ``jobs/train.py --local`` killed (SIGKILL) during iteration 2 and started again: it finishes without redoing
  iteration 1 and with the same row counts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trprompt import artifacts
from trprompt.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(tmp_path: Path, model: Path, run_dir: Path, **extra) -> Path:
    role = {"model": str(model), "engine": "hf", "num_actors": 1, "num_cpus": 0.25, "threads": 1,
            "max_batch_size": 16}
    data = {
        "run_dir": str(run_dir),
        "dataset": {"name": "gsm8k", "train_limit": 24, "val_limit": 4, "test_limit": 4},
        "models": {"share_engines": True, "prompt_model": role, "target_model": role, "reward_model": role},
        "generation": {"prompt_max_tokens": 12, "target_max_tokens": 12, "reward_max_tokens": 12, "batch_size": 16},
        "loop": {"iterations": 2, "synthetic_size": 6},
        "sft": {"lora_r": 4, "lora_alpha": 8, "epochs": 1, "batch_size": 3, "learning_rate": 1e-3,
                "max_length": 256, "num_workers": 1, "cpus_per_worker": 0.25},
        "reward_search": {"steps": 1, "candidates_per_step": 2, "val_questions": 3, "optimizer_max_tokens": 16,
                          "max_tag_retries": 1},
    }
    data.update(extra)
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def check_run(run_dir: Path, k_max: int = 2) -> None:
    for k in range(1, k_max + 1):
        d = run_dir / f"iter_{k}"
        assert len(artifacts.read_parquet(d / "synthetic_set.parquet")) == 6
        assert (d / "adapter" / "adapter_config.json").is_file()
        assert (d / "reward_search.json").is_file()
        trace = artifacts.read_json(d / "reward_search.json")["trace"]
        assert all("accuracy" in t for t in trace)
    best = artifacts.read_json(run_dir / "best.json")
    assert best["history"][0]["phase"] == "initial"
    assert (run_dir / "report.md").read_text().startswith("# TRPrompt run report")
    summ = artifacts.read_json(run_dir / "test" / "trprompt.json")
    assert summ["n"] == 4


@pytest.mark.ray
@pytest.mark.slow
def test_loop_on_ray_actors_and_ray_train(tmp_path, tiny_model_dir, ray_session):
    from cluster.resources import build_role_engines
    from cluster.sft_trainer import RayTrainSFT
    from trprompt.loop import TRPromptTrainer

    cfg = load_config(tiny_config(tmp_path, tiny_model_dir, tmp_path / "run"))
    engines = build_role_engines(cfg.models, local=False)
    try:
        assert len(engines.unique()) == 1  # one shared pool of actors serves every role
        summary = TRPromptTrainer(cfg, engines, RayTrainSFT(), str(tiny_model_dir), progress=False).run()
        pool = engines.unique()[0]
        assert set(pool.adapters()) >= {"iter1", "iter2"}  # adapters hot-loaded into the running actors
    finally:
        engines.close()
    check_run(Path(cfg.run_dir))
    assert artifacts.read_json(Path(cfg.run_dir) / "iter_2" / "sft_metrics.json")["ray_train"] is True
    assert summary.usage["prompt_model"]["requests"] > 0


@pytest.mark.slow
def test_kill_during_iteration_2_and_resume(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    cfg = tiny_config(tmp_path, tiny_model_dir, run_dir)
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(cfg), "--local", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    marker = run_dir / "iter_2" / "synthetic_set.parquet"
    deadline = time.time() + 400
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "the run never reached iteration 2"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "best.json").exists()
    it1 = run_dir / "iter_1" / "synthetic_set.parquet"
    stamp = it1.stat().st_mtime_ns
    adapter_stamp = (run_dir / "iter_1" / "sft_metrics.json").stat().st_mtime_ns
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert it1.stat().st_mtime_ns == stamp  # iteration 1 was not redone
    assert (run_dir / "iter_1" / "sft_metrics.json").stat().st_mtime_ns == adapter_stamp
    assert "iteration 1: SFT on" not in out.stdout
    check_run(run_dir)


def test_bad_config_fails_before_loading_models(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("loop:\n  iterations: -1\n")
    t0 = time.time()
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(p), "--local"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "loop.iterations" in out.stderr
    assert time.time() - t0 < 60
