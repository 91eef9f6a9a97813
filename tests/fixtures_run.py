"""Fabricate small finished TRPrompt run directories for the serving tests.

A run directory made here looks like one :mod:`trprompt.loop` leaves behind:
``config.yaml`` (resolved config), ``templates.json``, ``best.json`` and, when an
adapter is asked for, a real peft LoRA adapter of the tiny random Llama in
``iter_<k>/adapter``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.serve.run_spec import write_base_run


@functools.lru_cache(maxsize=4)
def _tiny_base(model_dir: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def make_lora_adapter(model_dir: str | Path, out_dir: str | Path, seed: int = 0, rank: int = 4) -> Path:
    """Save a LoRA adapter of the model at ``model_dir`` with random (non-zero) weights into ``out_dir``."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(_tiny_base(str(model_dir)))
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # lora_B starts at zero; make the adapter actually change outputs
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    return out


def make_run_dir(
    root: str | Path,
    model_dir: str | Path,
    engine: str = "echo",
    optimal_reward: str = "Name the quantities, then reason step by step.",
    iteration: int | None = 2,
    accuracy: float = 0.5,
    adapter_seed: int = 0,
    separate_target: bool = False,
    generation: dict[str, Any] | None = None,
    num_cpus: float = 0.25,
) -> Path:
    """A finished run on the tiny model whose best iteration is ``iteration`` (None: no adapter).

    ``engine`` is ``echo`` (deterministic, instant) or ``hf`` (the tiny model for real).
    ``separate_target`` gives the target model different settings, so it gets its own
    deployment instead of sharing the prompt model's engine.
    """
    model_dir = str(model_dir)
    pm = {"model": model_dir, "engine": engine, "num_cpus": num_cpus, "threads": 1, "max_batch_size": 32}
    tm = {**pm, "max_batch_size": 31} if separate_target else dict(pm)
    if generation is None:
        generation = ({"prompt_max_tokens": 400, "target_max_tokens": 800} if engine == "echo"
                      else {"prompt_max_tokens": 6, "target_max_tokens": 6})
    run = write_base_run(root, pm, tm, optimal_reward=optimal_reward,
                         extra_config={"generation": generation, "dataset": {"name": "gsm8k"}})
    entry: dict[str, Any] = {"iteration": 0, "phase": "initial", "accuracy": 0.0, "adapter": None,
                             "adapter_path": None, "optimal_reward": optimal_reward}
    history = [entry]
    if iteration is not None:
        adapter = make_lora_adapter(model_dir, run / f"iter_{iteration}" / "adapter", seed=adapter_seed)
        entry = {"iteration": iteration, "phase": "reward_search", "accuracy": accuracy,
                 "adapter": f"iter{iteration}", "adapter_path": str(adapter), "optimal_reward": optimal_reward}
        history.append(entry)
        (run / f"iter_{iteration}" / "val_reward_search.json").write_text(
            json.dumps({"accuracy": accuracy, "phase": "reward_search"}))
    (run / "best.json").write_text(json.dumps({**entry, "history": history}, indent=2))
    return run


def slow_echo_engine(cfg: Any, delay_s: float = 0.3) -> Any:
    """An echo engine whose every ``generate`` call takes ``delay_s`` longer (like a real model would).

    Used as ``ServeArgs.engine_factory`` so that batching can be observed: requests that
    arrive while a call runs must be merged into the next call.
    """
    from trprompt.engines.base import ChatRequest, ChatResult
    from trprompt.engines.echo import EchoEngine

    class SlowEcho(EchoEngine):
        def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
            time.sleep(delay_s)
            return super().generate(requests)

    return SlowEcho()
