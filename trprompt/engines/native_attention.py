"""A native CPU kernel for the attention of a decoding step (bfloat16, AVX512-BF16).

At decoding shapes (one query per row against a few hundred cached positions) PyTorch's CPU
flash-attention kernel spends most of its time in per-head GEMM calls and reads the KV cache at
a third of the memory bandwidth: on the 2-core development VM with AMX, 30 layers of attention
for 29 rows x 300 cached positions took 50-58 ms, about 40 % of a decoding step.
``csrc/decode_attention.c`` reads each head's keys once for all the query heads that share it
(bfloat16 dot products summed in float32), takes a float32 softmax and reads the values once,
with software prefetching ahead of both passes: 25-32 ms for the same step.

The kernel is compiled on first use with the system C compiler (:mod:`trprompt.engines.native`).
Without a compiler, on a CPU without AVX512-BF16, or with ``TRPROMPT_CPU_ATTENTION=sdpa``,
nothing changes: the model keeps transformers' SDPA attention. :func:`install` registers an attention function with
transformers that runs the kernel for bfloat16 decoding steps, masked prefills of grouped-query
heads through SDPA's own grouping (``enable_gqa``, no copies of the keys and values), and hands
everything else (other dtypes, sliding windows, soft-capping) to transformers' own SDPA function.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import native

log = logging.getLogger(__name__)

ENV = "TRPROMPT_CPU_ATTENTION"
"""``sdpa`` keeps transformers' SDPA everywhere; unset, ``auto`` or ``native`` uses the kernel where it can run."""

MODES = ("auto", "native", "sdpa")

ATTENTION_NAME = "trprompt_cpu"
"""The name the attention function is registered under with transformers."""

REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
"""/proc/cpuinfo flags the kernel's instructions need."""

SOURCE = native.CSRC / "decode_attention.c"
COMPILE_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp", "-shared",
                 "-fPIC")
MAX_GROUP = 8
"""Query heads per key/value head the kernel handles (the C source's ``MAX_GROUP``)."""

MAX_HEAD_DIM = 256

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()


def mode() -> str:
    """The ``TRPROMPT_CPU_ATTENTION`` setting (``auto`` when unset); a bad value raises ``ValueError``."""
    return native.setting(ENV, MODES)


def cpu_supported(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU reports every instruction-set flag the kernel uses."""
    return native.cpu_has(REQUIRED_FLAGS, cpuinfo)


def _compiler() -> str | None:
    return native.find_compiler()


def build(out_dir: Path | None = None, compiler: str | None = None) -> Path:
    """Compile the kernel (once per source, compiler and flags) and return the shared library's path.

    Raises ``RuntimeError`` with the compiler's message when it cannot be built.
    """
    return native.build(SOURCE, COMPILE_FLAGS, compiler or _compiler(), out_dir)


def load() -> ctypes.CDLL | None:
    """The compiled kernel, built on first call; ``None`` (reason in :func:`unavailable_reason`) when it cannot run."""
    global _lib, _lib_error
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        if not cpu_supported():
            _lib_error = f"the CPU lacks one of {', '.join(REQUIRED_FLAGS)}"
            return None
        _lib, _lib_error = native.build_and_open(SOURCE, COMPILE_FLAGS, _compiler(), "trp_decode_attention_abi",
                                                 _declare)
        if _lib_error is not None:
            log.warning("native decode attention unavailable, keeping SDPA: %s", _lib_error)
        return _lib


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.trp_decode_attention_bf16
    fn.restype = ctypes.c_int
    ptr, strides = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    fn.argtypes = [ptr, strides, ptr, strides, ptr, strides, ptr, ctypes.c_int64, ptr, ctypes.c_int, ctypes.c_int,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int]


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` when it loaded or was not tried)."""
    return _lib_error


def _strides3(t: torch.Tensor) -> Any:
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor | None:
    """Attention of one query per row, grouped by key/value head; ``None`` when the kernel cannot take these inputs.

    ``query`` is ``[rows, heads, 1, dim]``, ``key``/``value`` ``[rows, kv_heads, positions, dim]`` (views of a
    cache are fine: only the last dimension must be contiguous), ``mask`` ``[rows, 1, 1, positions]`` boolean
    (true: attend) or ``None`` (attend to all). All bfloat16 on the CPU. Returns ``[rows, 1, heads, dim]``
    (the layout transformers' attention functions return).
    """
    lib = load()
    if lib is None:
        return None
    rows, heads, q_len, dim = query.shape
    kv_heads, positions = key.shape[1], key.shape[2]
    if (q_len != 1 or query.dtype != torch.bfloat16 or key.dtype != torch.bfloat16 or value.dtype != torch.bfloat16
            or query.device.type != "cpu" or heads % kv_heads or heads // kv_heads > MAX_GROUP or dim % 32
            or dim > MAX_HEAD_DIM or value.shape != key.shape or key.shape[0] != rows or positions < 1
            or query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1):
        return None
    if mask is None:
        flat = torch.ones((rows, positions), dtype=torch.uint8)
    else:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            return None
        if mask.shape[-1] != positions:
            return None
        flat = mask[:, 0, 0, :].expand(rows, positions)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        flat = flat.view(torch.uint8)
    group = heads // kv_heads
    q = query.view(rows, kv_heads, group, dim) if query.is_contiguous() else query.reshape(rows, kv_heads, group, dim)
    out = torch.empty((rows, 1, heads, dim), dtype=torch.bfloat16)
    status = lib.trp_decode_attention_bf16(
        q.data_ptr(), _strides3(q), key.data_ptr(), _strides3(key), value.data_ptr(), _strides3(value),
        flat.data_ptr(), flat.stride(0), out.data_ptr(), rows, kv_heads, group, positions, dim, float(scale),
        torch.get_num_threads())
    if status == -2:
        raise MemoryError("native decode attention could not allocate its score buffer")
    return out if status == 0 else None


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention in transformers' attention-function form: the kernel for plain decoding steps, else SDPA."""
    plain = (dropout == 0.0 and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
             and kwargs.get("sliding_window") is None and not kwargs.get("output_attentions", False))
    if plain and query.shape[2] == 1:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = decode_attention(query, key, value, attention_mask, scale)
        if out is not None:
            return out, None
    elif (plain and attention_mask is None and query.shape[2] == key.shape[2] and query.device.type == "cpu"
          and kwargs.get("is_causal", getattr(module, "is_causal", True)) and key.shape[1] != query.shape[1]):
        # A causal prefill with no padding (the engine's shared heads): the same kernel with a causal mask.
        from . import native_step

        length = query.shape[2]
        causal = torch.ones((1, 1, length, length), dtype=torch.bool).tril_()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = native_step.prefill_attention(query, key, value, causal, scale)
        if out is not None:
            return out, None
    elif (plain and isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool
          and key.shape[1] != query.shape[1] and query.device.type == "cpu"):
        # A masked prefill of grouped-query heads: on AMX tiles where the native step's library runs
        # (2-2.8x SDPA's flash kernel at the engine's prefill shapes on the AMX VM), else SDPA's own
        # grouping, which skips repeat_kv's copies of the keys and values (1.15-1.3x).
        from . import native_step

        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = native_step.prefill_attention(query, key, value, attention_mask, scale)
        if out is not None:
            return out, None
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> None:
    """Register :func:`attention_forward` (and SDPA's mask format) with transformers under :data:`ATTENTION_NAME`."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def install(model: Any) -> bool:
    """Switch a bfloat16 CPU model that uses SDPA to the native decoding kernel, where it can run.

    Returns True when installed. Leaves the model alone (False) under ``TRPROMPT_CPU_ATTENTION=sdpa``,
    for another attention implementation or dtype, or when the kernel cannot be built or loaded here.
    """
    if mode() == "sdpa":
        return False
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(model, "dtype", None) != torch.bfloat16:
        return False
    if getattr(model, "device", torch.device("cpu")).type != "cpu":
        return False
    if load() is None:
        if mode() == "native":
            log.warning("%s=native but the kernel cannot run here (%s); keeping SDPA", ENV, _lib_error)
        return False
    register()
    model.set_attn_implementation(ATTENTION_NAME)
    return True
