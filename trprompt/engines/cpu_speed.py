"""CPU inference speed-ups for the transformers engine (measured on the 2-core development VM).

Two changes that leave the model's arithmetic alone:

- :func:`tune_allocator`: glibc returns every large freed block to the operating system
  (``munmap``) and maps fresh, zero-filled pages for the next one, so each layer's
  activation tensors page-fault again on every forward pass. Raising glibc's mmap and
  trim thresholds keeps freed memory in the process for reuse: a 48 x 300-token bfloat16
  prefill of SmolLM2-135M went from 5.7-7.1 s to 4.5-4.9 s and a 48-row decoding step
  from 141-143 ms to 128-134 ms. The cost is that the process keeps its peak heap.
  ``TRPROMPT_CPU_MALLOC=0`` turns it off.
- :class:`PackedLinear`: with few rows (decoding), a bfloat16 ``F.linear`` on a CPU spends
  much of its time re-laying out the weight for the oneDNN kernel on every call. The
  packed layer keeps a copy of the weight in oneDNN's own layout (made once) and uses it
  for inputs of up to :attr:`PackedLinear.max_rows` rows and plain ``F.linear`` for larger
  inputs (prefill), where it measured faster. For a single row (decoding one request) the
  faster of a matrix-vector product and the packed kernel is picked per process by
  timing both over the model's own layers (:func:`choose_one_row_path`): the matrix-vector
  product won on the Intel development VM (AMX), the packed kernel on an AMD EPYC one
  (AVX512-BF16; a pass over SmolLM2's weights 35-37 ms vs 18-23 ms). Each path accumulates
  in float32 like ``F.linear``; outputs agree within bfloat16 rounding.
- On CPUs with AMX, bfloat16 layers keep their weight laid out for the native AMX kernel
  (:mod:`~trprompt.engines.amx_linear`) instead, for inputs of up to
  :data:`~trprompt.engines.amx_linear.MAX_ROWS` rows (prefills included); oneDNN's copy is made only
  when a larger input comes.
- Float32 weights are packed too where that is faster on this machine
  (:func:`float32_packing_pays`, timed once per process over the model's own layers).
  Float32 ``F.linear`` runs MKL's sgemm, which on an AVX2-only AMD EPYC VM reached 25
  GFLOP/s at decoding's 29 rows x SmolLM2's shapes where oneDNN's packed kernel reached
  41 (60 vs 36 at 60 rows, 59 vs 23 for the LM head): the reward-search bench's fan-out
  went from 154 to 124 s there. Both accumulate in float32; outputs differ from
  ``F.linear`` only by float32 rounding.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import amx_linear

log = logging.getLogger(__name__)

MALLOC_ENV = "TRPROMPT_CPU_MALLOC"
"""Set to ``0`` to leave glibc's allocator settings alone."""

ONE_ROW_ENV = "TRPROMPT_CPU_ONE_ROW"
"""``mv`` or ``packed`` fixes the single-row path of packed layers; unset or ``auto`` times both once."""

ONE_ROW_PATHS = ("mv", "packed")

PACK_ENV = "TRPROMPT_CPU_PACK"
"""``0``: no packing; ``1``: pack bfloat16 and float32 weights without timing; ``bfloat16``: bfloat16
weights only; unset or ``auto``: bfloat16 weights, and float32 ones where :func:`float32_packing_pays`."""

PACK_MODES = ("0", "1", "bfloat16", "auto")

_FLOAT32_BY_MODE = {"1": "always", "bfloat16": "never", "auto": "auto"}

PACKABLE = (torch.bfloat16, torch.float32)
"""Weight dtypes :class:`PackedLinear` computes through the packed kernel."""

_float32_choice: dict[tuple, bool] = {}

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = 2**31 - 1
_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep freed memory for reuse instead of unmapping it (glibc on Linux; once per process).

    Returns whether the settings are in effect. A no-op (``False``) off Linux, on
    other C libraries, or when ``TRPROMPT_CPU_MALLOC=0``.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get(MALLOC_ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    if _tuned:
        log.info("glibc malloc: mmap and trim thresholds raised (set %s=0 to keep the defaults)", MALLOC_ENV)
    return _tuned


_packing_works: dict[torch.dtype, bool] = {}


def packing_supported(dtype: torch.dtype | None = None) -> bool:
    """Whether this torch build and CPU can prepack linear weights of ``dtype`` for oneDNN (any: either).

    oneDNN packs bfloat16 weights only on CPUs with AVX512 (BW, VL, DQ) or AVX-NE-CONVERT
    and raises elsewhere (an AVX2-only AMD EPYC VM, say), so each dtype is tried once per
    process on a small weight.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if dtype is None:
        return any(packing_supported(d) for d in PACKABLE)
    if dtype not in _packing_works:
        try:
            with torch.inference_mode():
                weight = torch.ones(8, 16, dtype=dtype)
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
                out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=dtype), packed, None, "none", [], "")
            _packing_works[dtype] = bool(torch.all(out == 16))
        except (RuntimeError, NotImplementedError) as err:
            log.info("oneDNN cannot prepack %s weights on this CPU: %s", str(dtype).removeprefix("torch."), err)
            _packing_works[dtype] = False
    return _packing_works[dtype]


class PackedLinear(torch.nn.Linear):
    """An ``nn.Linear`` that also holds its weight prepacked for oneDNN (inference only).

    It shares the original weight parameter (state dicts, peft's LoRA wrappers and
    anything else that reads ``weight`` see an ordinary ``nn.Linear``) and repacks
    if that weight is changed in place. Inputs that need gradients, whose dtype is
    not the weight's (bfloat16 or float32), or with more rows than :attr:`max_rows`
    take plain ``F.linear``.
    """

    max_rows: int = 256
    """Largest bfloat16 input (rows = tokens) using oneDNN's packed weight; measured slower than ``F.linear`` above
    it. (Inputs of up to :attr:`amx_rows` rows take the AMX kernel first.)"""

    max_rows_float32: int = 2048
    """The same for float32 inputs: the packed kernel measured at least as fast as MKL's sgemm up to here
    (AVX2 AMD EPYC VM: 67 vs 54-66 GFLOP/s at 256-2048 rows of SmolLM2's largest shapes)."""

    one_row: str = "mv"
    """How a single row is computed: ``"mv"`` (matrix-vector product) or ``"packed"`` (the packed kernel).
    :func:`pack_linears` sets it on every layer it packs to whichever :func:`choose_one_row_path` measured faster."""

    amx_rows: int = 0
    """Inputs of up to this many rows use the native AMX kernel (:mod:`~trprompt.engines.amx_linear`) and its own
    copy of the weight instead of oneDNN's; 0: never. :func:`pack_linears` sets it where that kernel runs."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed: torch.Tensor | None = None
        self._packed_for: tuple[int, int] | None = None
        self._amx: torch.Tensor | None = None
        self._amx_for: tuple[int, int] | None = None

    def _weight_key(self) -> tuple[int, int]:
        """What a copy of the weight was made from: its storage and version (an in-place change or a new tensor)."""
        return self.weight.data_ptr(), self.weight._version

    def _amx_pack(self) -> torch.Tensor:
        key = self._weight_key()
        if self._amx is None or key != self._amx_for:
            with torch.no_grad():
                self._amx = amx_linear.pack(self.weight)
            self._amx_for = key
        return self._amx

    def _pack(self) -> torch.Tensor:
        key = self._weight_key()
        if self._packed is None or key != self._packed_for:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
            self._packed_for = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight, bias)``, through the packed weight for inputs of the weight's dtype and size."""
        rows = x.numel() // self.in_features if self.in_features else 0
        dtype = self.weight.dtype
        limit = self.max_rows if dtype == torch.bfloat16 else self.max_rows_float32
        if (x.dtype != dtype or dtype not in PACKABLE or rows == 0
                or torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        if rows == 1 and self.one_row == "mv":
            flat = x.reshape(-1)
            out = torch.mv(self.weight, flat) if self.bias is None else torch.addmv(self.bias, self.weight, flat)
            return out.reshape(*x.shape[:-1], self.out_features)
        if rows <= self.amx_rows and amx_linear.takes(self.weight):  # still bfloat16 (not cast since)
            out = amx_linear.linear(x.reshape(rows, self.in_features), self._amx_pack(), self.out_features, self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        if rows > limit:
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, self.in_features), self._pack(), self.bias, "none",
                                                 [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


def packed_layer(linear: torch.nn.Linear) -> PackedLinear:
    """``linear`` as a :class:`PackedLinear` with its copy made now: AMX tiles where the native AMX kernel runs
    and takes the weight (oneDNN's copy then only if an input of more rows comes), else oneDNN's layout.
    """
    packed = PackedLinear(linear)
    if amx_linear.takes(linear.weight) and amx_linear.load() is not None:
        packed.amx_rows = amx_linear.MAX_ROWS
        packed._amx_pack()
    else:
        packed._pack()
    return packed


def available_memory_bytes() -> int | None:
    """Physical memory the OS reports as available (``MemAvailable``), or None where unknown."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pack_mode() -> str:
    """The packing mode :data:`PACK_ENV` asks for (one of :data:`PACK_MODES`; unset: ``"auto"``)."""
    mode = os.environ.get(PACK_ENV, "auto").strip().lower() or "auto"
    if mode not in PACK_MODES:
        raise ValueError(f"{PACK_ENV} must be one of {list(PACK_MODES)}, got {mode!r}")
    return mode


def float32_packing(mode: str) -> str:
    """``pack_linears``' ``float32`` argument for a :data:`PACK_ENV` mode other than ``"0"``."""
    return _FLOAT32_BY_MODE[mode]


def pack_linears(model: torch.nn.Module, max_bytes: int | None = None, float32: str = "auto") -> int:
    """Replace the plain ``nn.Linear`` layers of ``model`` (on the CPU) by :class:`PackedLinear` ones.

    bfloat16 layers are always packed. float32 layers are packed when ``float32`` is
    ``"always"``, or when it is ``"auto"`` and :func:`float32_packing_pays` on this
    machine (``"never"``: left alone; the answer is remembered per process, so a later
    model of the same shapes is neither timed nor copied again). The packed copies cost as much memory again as
    the weights they pack; when that is more than ``max_bytes`` (default: half the
    memory available now) nothing is packed. Returns how many layers were replaced (0
    when packing is not supported for the weights' dtype on this CPU, does not pay or
    does not fit). Tied weights stay tied: the packed layer shares the parameter. Call
    it before adding LoRA adapters (peft wraps the packed layers like any ``nn.Linear``).
    """
    if float32 not in ("auto", "always", "never"):
        raise ValueError(f"float32 must be 'auto', 'always' or 'never', got {float32!r}")
    targets = [(parent, name, child) for parent in list(model.modules())
               for name, child in list(parent.named_children())
               if type(child) is torch.nn.Linear and child.weight.dtype in PACKABLE
               and child.weight.device.type == "cpu" and packing_supported(child.weight.dtype)]
    if float32 == "never" or float32 == "auto" and _float32_choice.get(
            _float32_key([c for _, _, c in targets if c.weight.dtype == torch.float32])) is False:
        # Never, or timed already in this process and not faster: no copies to make and drop again.
        targets = [t for t in targets if t[2].weight.dtype != torch.float32]
    need = sum({id(c.weight): c.weight.numel() * c.weight.element_size() for _, _, c in targets}.values())
    if max_bytes is None:
        available = available_memory_bytes()
        max_bytes = available // 2 if available is not None else need
    if need > max_bytes:
        log.warning("not prepacking %d linear layers: the packed copies need %.1f GiB, more than the %.1f GiB allowed",
                    len(targets), need / 2**30, max_bytes / 2**30)
        return 0
    layers: list[PackedLinear] = []
    for parent, name, child in targets:
        packed = packed_layer(child)
        setattr(parent, name, packed)
        layers.append(packed)
    f32 = [layer for layer in layers if layer.weight.dtype == torch.float32]
    if f32 and float32 == "auto" and not float32_packing_pays(f32):
        for parent, name, child in targets:  # put the plain layers back: sgemm is as fast here
            if child.weight.dtype == torch.float32:
                setattr(parent, name, child)
        layers = [layer for layer in layers if layer.weight.dtype != torch.float32]
    for group in (torch.bfloat16, torch.float32):
        of_dtype = [layer for layer in layers if layer.weight.dtype == group]
        path = choose_one_row_path(of_dtype)
        for layer in of_dtype:
            layer.one_row = path
        if of_dtype:
            on_amx = sum(layer.amx_rows > 0 for layer in of_dtype)
            log.info("prepacked %d %s linear layers (%d for the AMX kernel up to %d rows); single-row inputs use "
                     "the %s path", len(of_dtype), str(group).removeprefix("torch."), on_amx, amx_linear.MAX_ROWS,
                     path)
    return len(layers)


def _time_pass(layers: list[PackedLinear], inputs: dict[int, torch.Tensor], packed: bool) -> float:
    """Wall time of one pass over ``layers`` (packed kernel, or plain ``F.linear`` on the same weights)."""
    started = time.perf_counter()
    for layer in layers:
        x = inputs[layer.in_features]
        if packed:
            layer(x)
        else:
            F.linear(x, layer.weight, layer.bias)
    return time.perf_counter() - started


def _float32_key(layers: Sequence[torch.nn.Module], rows: int = 16) -> tuple:
    """What a float32 timing depends on: the layers' shapes, the thread count and the rows timed."""
    return tuple((layer.in_features, layer.out_features) for layer in layers), torch.get_num_threads(), rows


def float32_packing_pays(layers: list[PackedLinear], rows: int = 16, passes: int = 2) -> bool:
    """Whether the packed float32 kernel beats plain ``F.linear`` over ``layers`` at ``rows`` rows here.

    Timed as the best of ``passes`` passes over every layer each (a decoding step reads
    every weight once, as here), after a warm-up pass, the two kernels taking turns; the
    packed kernel must be at least 5 % faster (it costs a second copy of the weights).
    The answer is kept per process for the same layer shapes, thread count and rows,
    so every engine of a model in one process computes alike.
    """
    key = _float32_key(layers, rows)
    if key in _float32_choice:
        return _float32_choice[key]
    inputs = {layer.in_features: torch.randn(rows, layer.in_features) for layer in layers}
    plain = packed = float("inf")
    with torch.inference_mode():
        _time_pass(layers, inputs, packed=True)
        _time_pass(layers, inputs, packed=False)
        for _ in range(passes):
            plain = min(plain, _time_pass(layers, inputs, packed=False))
            packed = min(packed, _time_pass(layers, inputs, packed=True))
    pays = packed < 0.95 * plain
    log.info("float32 pass over %d linear layers at %d rows: F.linear %.1f ms, packed %.1f ms: %s", len(layers), rows,
             plain * 1e3, packed * 1e3, "packing" if pays else "not packing")
    _float32_choice[key] = pays
    return pays


def _time_one_row(layers: list[PackedLinear], path: str, inputs: dict[int, torch.Tensor], passes: int) -> float:
    """Best wall time of ``passes`` single-row passes over ``layers`` with the given path."""
    saved = [layer.one_row for layer in layers]
    best = float("inf")
    try:
        for layer in layers:
            layer.one_row = path
        with torch.inference_mode():
            for _ in range(passes + 1):  # one extra pass: the first one also warms caches and kernels
                started = time.perf_counter()
                for layer in layers:
                    layer(inputs[layer.in_features])
                best = min(best, time.perf_counter() - started)
    finally:
        for layer, old in zip(layers, saved, strict=True):
            layer.one_row = old
    return best


def choose_one_row_path(layers: list[PackedLinear], passes: int = 3) -> str:
    """The faster single-row path (``"mv"`` or ``"packed"``) over ``layers``, timed on this machine.

    ``TRPROMPT_CPU_ONE_ROW=mv|packed`` skips the timing. Both paths are exact up to
    the rounding of the layers' dtype, so the choice changes speed only. Each is timed as the best of
    ``passes`` passes over every layer with a one-row input (a decoding step of one
    request reads every weight once, as here), the two paths taking turns; ties go to ``"mv"``.
    """
    forced = os.environ.get(ONE_ROW_ENV, "auto").strip().lower()
    if forced in ONE_ROW_PATHS:
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"{ONE_ROW_ENV} must be one of {[*ONE_ROW_PATHS, 'auto']}, got {forced!r}")
    if not layers:
        return "mv"
    dtype = layers[0].weight.dtype
    inputs = {layer.in_features: torch.randn(1, layer.in_features, dtype=dtype) for layer in layers}
    mv = packed = float("inf")
    for _ in range(passes):  # alternate, so that a burst of load on a shared machine hits both paths alike
        mv = min(mv, _time_one_row(layers, "mv", inputs, 1))
        packed = min(packed, _time_one_row(layers, "packed", inputs, 1))
    log.info("single-row pass over %d packed layers: mv %.1f ms, packed %.1f ms", len(layers), mv * 1e3, packed * 1e3)
    return "packed" if packed < mv else "mv"
