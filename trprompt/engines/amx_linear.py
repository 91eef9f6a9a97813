"""A native AMX kernel for bfloat16 linear layers at decoding's row counts (``csrc/amx_linear.c``).

A decoding step multiplies a few rows (one per sequence) by every weight of the model, so its
linear layers are bound by reading the weights from memory. On the 2-core development VM (Intel
Xeon with AMX) oneDNN's packed bfloat16 kernel read SmolLM2-135M's weights at about a third of the
memory bandwidth at 29 rows. The kernel here keeps a copy of each weight laid out as AMX tiles
(16 output columns x 32 inputs each, in the order one thread streams them, prefetched 8 KiB ahead) and
multiplies up to 64 rows per pass over the weight with the AMX dot-product instruction, accumulating in
float32 and rounding once to bfloat16, like ``F.linear``.

It runs on CPUs with AMX (``amx_tile``, ``amx_bf16``) and AVX512-BF16 whose kernel grants the tile
state to the process (Linux 5.16 or later), for bfloat16 weights whose input size is a multiple of
32 and output size a multiple of 16. :class:`~trprompt.engines.cpu_speed.PackedLinear` uses it for
inputs of up to :data:`MAX_ROWS` rows. ``TRPROMPT_CPU_AMX=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

from . import native

log = logging.getLogger(__name__)

ENV = "TRPROMPT_CPU_AMX"
"""``0`` keeps oneDNN's kernels for every linear layer; unset, ``auto`` or ``1`` uses this kernel where it can run."""

MODES = ("auto", "0", "1")

REQUIRED_FLAGS = ("amx_tile", "amx_bf16", "avx512f", "avx512bw", "avx512vl", "avx512_bf16")
"""/proc/cpuinfo flags the kernel's instructions need."""

SOURCE = native.CSRC / "amx_linear.c"
COMPILE_FLAGS = ("-O3", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                 "-fopenmp", "-shared", "-fPIC")

MAX_ROWS = 1 << 16
"""Largest input (rows = tokens) the kernel takes; larger ones take oneDNN. The kernel itself has no limit (it
walks the rows 64 at a time): with weight prefetching it measured faster than oneDNN's ``F.linear`` at every row
count the engine's prefills use (the bench's prefill 7.8 / 8.1 -> 6.0 / 5.8 s, alternating runs), where it had been
slower above 256 rows without."""

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()


def mode() -> str:
    """The ``TRPROMPT_CPU_AMX`` setting (``auto`` when unset); a bad value raises ``ValueError``."""
    return native.setting(ENV, MODES)


def cpu_supported(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU reports every instruction-set flag the kernel uses."""
    return native.cpu_has(REQUIRED_FLAGS, cpuinfo)


def load() -> ctypes.CDLL | None:
    """The compiled kernel with AMX enabled for this process; ``None`` (see :func:`unavailable_reason`) if not.

    Built and loaded once per process; ``TRPROMPT_CPU_AMX=0`` returns ``None`` without building.
    """
    global _lib, _lib_error
    if mode() == "0":
        return None
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        if not cpu_supported():
            _lib_error = f"the CPU lacks one of {', '.join(REQUIRED_FLAGS)}"
            return None
        _lib, _lib_error = native.build_and_open(SOURCE, COMPILE_FLAGS, native.find_compiler(), "trp_amx_linear_abi",
                                                 _declare)
        if _lib_error is not None:
            log.warning("native AMX linear kernel unavailable, keeping oneDNN: %s", _lib_error)
        return _lib


def _declare(lib: ctypes.CDLL) -> None:
    if lib.trp_amx_enable() != 0:
        raise RuntimeError("the operating system did not grant the AMX tile state (Linux 5.16 or later)")
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.trp_amx_pack.argtypes = [ptr, i64, i64, ptr]
    lib.trp_amx_pack.restype = None
    lib.trp_amx_linear.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]
    lib.trp_amx_linear.restype = None


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` when it loaded, was turned off or was not tried)."""
    return _lib_error


def takes(weight: torch.Tensor) -> bool:
    """Whether the kernel can compute with ``weight`` (a 2-D bfloat16 CPU tensor of suitable shape)."""
    return (weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and weight.shape[0] % 16 == 0 and weight.shape[1] % 32 == 0 and weight.numel() > 0)


def _loaded() -> ctypes.CDLL | None:
    """The kernel once loaded (layers packed for it keep working if the setting changes later), else :func:`load`."""
    return _lib if _lib is not None else load()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` laid out as the kernel's tiles (a flat bfloat16 tensor of the same size)."""
    lib = _loaded()
    if lib is None or not takes(weight):
        raise ValueError("the AMX kernel cannot take this weight here")
    w = weight.detach().contiguous()
    out = torch.empty(w.numel(), dtype=torch.bfloat16)
    lib.trp_amx_pack(w.data_ptr(), w.shape[0], w.shape[1], out.data_ptr())
    return out


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` of ``x`` ``[rows, in]`` (bfloat16, up to :data:`MAX_ROWS` rows) with a :func:`pack` ed weight.

    ``bias`` (any float dtype) is added in float32 before the one rounding to bfloat16.
    """
    lib = _loaded()
    if lib is None:
        raise RuntimeError(f"the AMX kernel is not available: {_lib_error or 'turned off'}")
    rows, in_features = x.shape
    if x.dtype != torch.bfloat16 or packed.numel() != in_features * out_features or not 0 < rows <= MAX_ROWS:
        raise ValueError(f"unsupported input {tuple(x.shape)} {x.dtype} for a {out_features}x? packed weight")
    x = x.contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    out = torch.empty((rows, out_features), dtype=torch.bfloat16)
    lib.trp_amx_linear(x.data_ptr(), rows, in_features, packed.data_ptr(), out_features,
                       None if b is None else b.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out
