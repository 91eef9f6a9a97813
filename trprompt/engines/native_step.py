"""A whole decoding step of a bfloat16 Llama model in native code (``csrc/decode_step.c``).

Through PyTorch a decoding step of SmolLM2-135M over ~29 rows spends as long dispatching ~50 small
operators per layer (norms, rotary embedding, casts, the cache write, SiLU, residual adds) as it
spends in the matmuls and attention themselves. :class:`DecodeStepper` runs the step's every
layer in one C call instead: the matmuls on the AMX kernel (:mod:`~trprompt.engines.amx_linear`,
the layers' own packed weights, no copies), attention on the native attention kernel
(:mod:`~trprompt.engines.native_attention`), and the elementwise work in between with the
same bfloat16 roundings as transformers' Llama. Logits agree with the PyTorch path up to the order
of float32 sums in the norms (a rare last-bit difference in bfloat16).

It takes Llama-architecture models (``model_type`` ``llama``) in bfloat16 on CPUs where both kernels
run, whose linear layers all use the AMX kernel, decoding one token per row against
:class:`~trprompt.engines.hf.HFEngine`'s in-place KV cache. With a LoRA adapter active (peft layers
that change the output) it steps aside and the PyTorch path runs; a disabled adapter is no obstacle.
``TRPROMPT_CPU_STEP=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import types
from typing import Any

import torch

from . import amx_linear, native, native_attention

log = logging.getLogger(__name__)

ENV = "TRPROMPT_CPU_STEP"
"""``0`` keeps PyTorch's decoding step; unset, ``auto`` or ``1`` uses the native one where it can run."""

MODES = ("auto", "0", "1")

SOURCE = native.CSRC / "decode_step.c"
COMPILE_FLAGS = ("-O3", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                 "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-Wl,-Bsymbolic")

MODEL_TYPES = ("llama",)
"""``config.model_type`` values whose layers the C step reproduces."""

_LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
            ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
"""The seven linear layers of a decoder layer, in the C source's order (``W_Q`` .. ``W_DOWN``)."""

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lock = threading.Lock()

_ptr = ctypes.c_void_p


class _Model(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("inter", ctypes.c_int64),
                ("vocab", ctypes.c_int64), ("scale", ctypes.c_float), ("final_eps", ctypes.c_float),
                ("embed", _ptr), ("final_norm", _ptr), ("lm_head", _ptr), ("lm_bias", _ptr), ("norms", _ptr),
                ("eps", _ptr), ("weights", _ptr), ("biases", _ptr)]


def mode() -> str:
    """The ``TRPROMPT_CPU_STEP`` setting (``auto`` when unset); a bad value raises ``ValueError``."""
    return native.setting(ENV, MODES)


def load() -> ctypes.CDLL | None:
    """The compiled step, built once per process; ``None`` (see :func:`unavailable_reason`) where it cannot run.

    It needs both kernels it is made of: the AMX linear kernel (which also asks Linux for the tile
    state) and the attention kernel's CPU flags.
    """
    global _lib, _lib_error
    if mode() == "0":
        return None
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        if amx_linear.load() is None or not native_attention.cpu_supported():
            _lib_error = f"the AMX linear kernel cannot run here ({amx_linear.unavailable_reason() or 'turned off'})"
            return None
        _lib, _lib_error = native.build_and_open(SOURCE, COMPILE_FLAGS, native.find_compiler(), "trp_decode_step_abi",
                                                 _declare)
        if _lib_error is not None:
            log.warning("native decoding step unavailable, keeping PyTorch's: %s", _lib_error)
        return _lib


def _declare(lib: ctypes.CDLL) -> None:
    i64 = ctypes.c_int64
    lib.trp_decode_step.argtypes = [ctypes.POINTER(_Model), _ptr, i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
                                    i64, _ptr, i64, _ptr, ctypes.c_int]
    lib.trp_decode_step.restype = ctypes.c_int
    lib.trp_rms_norm_rows.argtypes = [_ptr, i64, _ptr, ctypes.c_float, i64, i64, _ptr, ctypes.c_int]
    lib.trp_rms_norm_rows.restype = ctypes.c_int
    lib.trp_rotary_rows.argtypes = [_ptr, i64, i64, i64, _ptr, _ptr, ctypes.c_int]
    lib.trp_rotary_rows.restype = None
    lib.trp_silu_mul_rows.argtypes = [_ptr, _ptr, i64, ctypes.c_int]
    lib.trp_silu_mul_rows.restype = None
    lib.trp_prefill_attention_bf16.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
                                               *[ctypes.c_int] * 6, ctypes.c_float, ctypes.c_int]
    lib.trp_prefill_attention_bf16.restype = ctypes.c_int
    lib.trp_argmax_rows_bf16.argtypes = [_ptr, i64, i64, _ptr, ctypes.c_int]
    lib.trp_argmax_rows_bf16.restype = None


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` when it loaded, was turned off or was not tried)."""
    return _lib_error


def _plain(module: Any) -> Any:
    """The packed layer computing ``module``'s output: itself, or under a peft LoRA layer that adds nothing now.

    ``None`` when an adapter is active on it (or it is not a packed layer on the AMX kernel).
    """
    from .cpu_speed import PackedLinear

    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        active = [a for a in getattr(module, "active_adapters", []) if a in module.lora_A]
        if active and not getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
            return None
        module = module.base_layer
    if type(module) is not PackedLinear or not module.amx_rows or not amx_linear.takes(module.weight):
        return None
    return module


def _bias(layer: Any) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach().to(torch.float32).contiguous()


class DecodeStepper:
    """Runs whole decoding steps of one model natively; build it with :meth:`create`.

    :meth:`prepare` checks the model before a batch (a LoRA adapter active, a weight no longer on the
    AMX kernel: False); :meth:`step` returns ``None`` whenever a step cannot run natively (not
    prepared, more rows than the kernel takes, a cache it cannot write), and the caller runs
    PyTorch's forward instead.
    """

    def __init__(self, model: Any, lib: ctypes.CDLL) -> None:
        self.model, self._lib = model, lib
        config = model.config
        self._decoder = model.get_decoder()
        self._layers = list(self._decoder.layers[: config.num_hidden_layers])
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._struct: _Model | None = None
        self._key: tuple | None = None
        self._keep: list[Any] = []
        self._ready: _Model | None = None

    @classmethod
    def create(cls, model: Any) -> DecodeStepper | None:
        """A stepper for ``model``, or ``None`` where the native step cannot reproduce it (the reason is logged)."""
        if mode() == "0":
            return None
        reason = cls._unsupported(model)
        if reason is None and load() is None:
            reason = unavailable_reason()
        if reason is not None:
            log.info("native decoding step not used: %s", reason)
            return None
        return cls(model, _lib)

    @staticmethod
    def _unsupported_type(model: Any) -> str | None:
        """Why the model's architecture, dtype or attention rule the native code out; ``None`` if they do not."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in MODEL_TYPES:
            return f"model type {getattr(config, 'model_type', None)!r} is not one of {list(MODEL_TYPES)}"
        if getattr(model, "dtype", None) != torch.bfloat16 or model.device.type != "cpu":
            return "the model is not bfloat16 on the CPU"
        if getattr(config, "hidden_act", None) != "silu" or getattr(config, "_attn_implementation", None) != (
                native_attention.ATTENTION_NAME):
            return "the activation is not SiLU or the native attention kernel is not installed"
        return None

    @staticmethod
    def _unsupported(model: Any) -> str | None:
        reason = DecodeStepper._unsupported_type(model)
        if reason is not None:
            return reason
        decoder = model.get_decoder()
        for layer in decoder.layers:
            if type(layer).__name__ != "LlamaDecoderLayer" or any(
                    _plain(getattr(getattr(layer, part), name)) is None for part, name in _LINEARS):
                return "a decoder layer is not a plain Llama layer on the AMX kernel"
        if _plain(model.get_output_embeddings()) is None:
            return "the LM head is not on the AMX kernel"
        return None

    def _model_struct(self) -> _Model | None:
        """The C description of the model's weights now (rebuilt when a layer or weight changed)."""
        resolved = []
        for layer in self._layers:
            for part, name in _LINEARS:
                plain = _plain(getattr(getattr(layer, part), name))
                if plain is None:
                    return None
                resolved.append(plain)
        head = _plain(self.model.get_output_embeddings())
        if head is None:
            return None
        resolved.append(head)
        key = tuple((id(m), m._weight_key(), None if m.bias is None else (m.bias.data_ptr(), m.bias._version))
                    for m in resolved)
        if key == self._key and self._struct is not None:
            return self._struct
        config, n = self.model.config, len(self._layers)
        keep: list[Any] = []
        packs = [m._amx_pack() for m in resolved]
        biases = [_bias(m) for m in resolved]
        keep += packs + [b for b in biases if b is not None]
        norms = []
        eps = []
        for layer in self._layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                w = norm.weight.detach().to(torch.bfloat16).contiguous()
                keep.append(w)
                norms.append(w.data_ptr())
                eps.append(float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))))
        final = self._decoder.norm
        final_w = self._decoder.norm.weight.detach().to(torch.bfloat16).contiguous()
        embed = self._decoder.embed_tokens.weight.detach().contiguous()
        keep += [final_w, embed]
        ptrs = lambda values: (_ptr * len(values))(*values)  # noqa: E731
        arrays = [ptrs(norms), (ctypes.c_float * len(eps))(*eps),
                  ptrs([p.data_ptr() for p in packs[:-1]]),
                  ptrs([None if b is None else b.data_ptr() for b in biases[:-1]])]
        keep += arrays
        struct = _Model(
            layers=n, hidden=config.hidden_size, heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads, head_dim=self.head_dim, inter=config.intermediate_size,
            vocab=head.out_features, scale=float(self._layers[0].self_attn.scaling),
            final_eps=float(getattr(final, "variance_epsilon", getattr(final, "eps", 1e-6))),
            embed=embed.data_ptr(), final_norm=final_w.data_ptr(), lm_head=packs[-1].data_ptr(),
            lm_bias=None if biases[-1] is None else biases[-1].data_ptr(),
            norms=ctypes.cast(arrays[0], _ptr), eps=ctypes.cast(arrays[1], _ptr),
            weights=ctypes.cast(arrays[2], _ptr), biases=ctypes.cast(arrays[3], _ptr))
        self._struct, self._key, self._keep = struct, key, keep
        return struct

    def prepare(self) -> bool:
        """Check the model's layers now (adapters, replaced weights) for the steps that follow; True if they can run.

        Call it before each batch's steps: :meth:`step` trusts what it found (checking every layer takes
        milliseconds, a tenth of a step).
        """
        self._ready = self._model_struct()
        return self._ready is not None

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any,
             cache_rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits ``[rows, vocab]`` (bfloat16) of one decoding step, the new keys and values written into ``cache``.

        ``tokens`` and ``positions`` are ``[rows]`` (or ``[rows, 1]``) integer tensors, ``mask`` is the
        ``[rows, positions]`` attention mask including the new position, and ``cache`` holds one
        in-place layer per decoder layer (``reserve``/``advance``, see :class:`~trprompt.engines.hf.HFEngine`).
        ``cache_rows`` (int64 ``[rows]``) says which row of the cache each row uses (default: the same
        one), so rows that finished leave the step without copying the cache. ``None`` (nothing
        written) when this step must run through PyTorch instead.
        """
        rows = tokens.shape[0]
        layers = getattr(cache, "layers", [])
        if (rows > amx_linear.MAX_ROWS or len(layers) != len(self._layers)
                or not all(hasattr(layer, "reserve") for layer in layers)):
            return None
        struct = self._ready
        if struct is None:
            return None
        starts = {layer.reserve(1) for layer in layers}
        pos = starts.pop() if len(starts) == 1 else -1
        if pos < 0 or tuple(mask.shape) != (rows, pos + 1):
            return None
        ks = [layer._k for layer in layers]
        vs = [layer._v for layer in layers]
        width = ks[0].shape[0]
        if cache_rows is not None:
            cache_rows = cache_rows.to(torch.int64).contiguous()
            if cache_rows.shape != (rows,) or bool((cache_rows < 0).any()) or int(cache_rows.max()) >= width:
                return None
        elif width != rows:
            return None
        if any(k.shape[0] != width or k.stride() != ks[0].stride() or v.stride() != vs[0].stride()
               for k, v in zip(ks, vs, strict=True)):
            return None
        ids = tokens.reshape(rows).to(torch.int64).contiguous()
        cos, sin = self._decoder.rotary_emb(ks[0][:0], position_ids=positions.reshape(rows, 1))
        cos = cos.reshape(rows, -1).to(torch.bfloat16).contiguous()
        sin = sin.reshape(rows, -1).to(torch.bfloat16).contiguous()
        flat = mask.to(torch.uint8).contiguous()
        logits = torch.empty((rows, struct.vocab), dtype=torch.bfloat16)
        strides_k = (ctypes.c_int64 * 3)(*ks[0].stride()[:3])
        strides_v = (ctypes.c_int64 * 3)(*vs[0].stride()[:3])
        status = self._lib.trp_decode_step(
            ctypes.byref(struct), ids.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(),
            (_ptr * len(ks))(*[k.data_ptr() for k in ks]), strides_k,
            (_ptr * len(vs))(*[v.data_ptr() for v in vs]), strides_v,
            None if cache_rows is None else cache_rows.data_ptr(), pos, flat.data_ptr(), flat.stride(0),
            logits.data_ptr(), torch.get_num_threads())
        if status == -2:
            raise MemoryError("the native decoding step could not allocate its buffers")
        if status != 0:
            return None
        for layer in layers:
            layer.advance(1)
        return logits


# ---------------------------------------------------------------- PyTorch's forward, fewer operators

def rms_norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """``norm(x)`` for a Llama RMSNorm on bfloat16 ``x`` ``[..., hidden]``, in one native call (same bits)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1 or flat.stride(0) != x.shape[-1]:
        flat = flat.contiguous()
    weight = norm.weight.detach()
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    status = _lib.trp_rms_norm_rows(flat.data_ptr(), flat.stride(0), weight.data_ptr(), float(norm.variance_epsilon),
                                    flat.shape[0], flat.shape[1], out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("the native RMSNorm could not allocate its buffers")
    return out


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """In place: the rotary embedding of every head of contiguous bfloat16 ``x`` ``[batch, tokens, heads * dim]``.

    ``cos``/``sin`` are ``[batch or 1, tokens, dim]`` (transformers' position embeddings). Same bits as
    transformers' ``apply_rotary_pos_emb``.
    """
    batch, tokens, width = x.shape
    cos = cos.expand(batch, tokens, head_dim).to(torch.bfloat16).contiguous()
    sin = sin.expand(batch, tokens, head_dim).to(torch.bfloat16).contiguous()
    _lib.trp_rotary_rows(x.data_ptr(), batch * tokens, width // head_dim, head_dim, cos.data_ptr(), sin.data_ptr(),
                         torch.get_num_threads())
    return x


def silu_mul_(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """In place: ``gate = silu(gate) * up`` for contiguous bfloat16 tensors (same bits as PyTorch's operators)."""
    _lib.trp_silu_mul_rows(gate.data_ptr(), up.data_ptr(), gate.numel(), torch.get_num_threads())
    return gate


def _can_fuse(layer: Any, hidden: torch.Tensor, position_embeddings: Any) -> bool:
    if (_lib is None or layer.training or torch.is_grad_enabled() or hidden.dtype != torch.bfloat16
            or hidden.device.type != "cpu" or position_embeddings is None):
        return False
    attn, mlp = layer.self_attn, layer.mlp
    cos = position_embeddings[0]
    return (cos.dim() == 3 and cos.shape[-1] == attn.head_dim and cos.shape[1] == hidden.shape[1]
            and cos.shape[0] in (1, hidden.shape[0]) and mlp.intermediate_size % 16 == 0
            and layer.input_layernorm.weight.dtype == torch.bfloat16
            and layer.post_attention_layernorm.weight.dtype == torch.bfloat16)


def _fused_forward(self: Any, hidden_states: torch.Tensor, attention_mask: Any = None, position_ids: Any = None,
                   cache: Any = None, use_cache: bool | None = False, position_embeddings: Any = None,
                   **kwargs: Any) -> torch.Tensor:
    """A ``LlamaDecoderLayer.forward`` doing its norms, rotary embedding and SiLU x up natively (same bits).

    Bound to each layer as a method (so a deep copy of the model binds it to the copied layer). The
    projections stay the layer's own modules (packed layers, peft's LoRA layers) and attention the
    model's attention function, so it serves prefill and steps with an adapter active alike; anything
    else (training, gradients, other dtypes) takes the class's own forward.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not _can_fuse(self, hidden_states, position_embeddings):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
    attn, mlp = self.self_attn, self.mlp
    batch, tokens, _ = hidden_states.shape
    x = rms_norm(hidden_states, self.input_layernorm)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    cos, sin = position_embeddings
    q, k = rotate_(q.contiguous(), cos, sin, attn.head_dim), rotate_(k.contiguous(), cos, sin, attn.head_dim)
    shape = (batch, tokens, -1, attn.head_dim)
    q, k, v = q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
    interface = ALL_ATTENTION_FUNCTIONS[attn.config._attn_implementation]
    out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
    hidden_states = hidden_states + attn.o_proj(out.reshape(batch, tokens, -1).contiguous())
    x = rms_norm(hidden_states, self.post_attention_layernorm)
    gate = silu_mul_(mlp.gate_proj(x).contiguous(), mlp.up_proj(x).contiguous())
    return hidden_states + mlp.down_proj(gate)


def install_layers(model: Any) -> int:
    """Give every plain Llama decoder layer of a bfloat16 CPU ``model`` the fused forward; how many got it.

    Models :class:`DecodeStepper` does not take, or where the library cannot run, are left alone (0).
    """
    if mode() == "0" or DecodeStepper._unsupported_type(model) is not None or load() is None:
        return 0
    n = 0
    for layer in model.get_decoder().layers:
        if type(layer).__name__ == "LlamaDecoderLayer" and not getattr(layer, "_trp_fused", False):
            layer.forward = types.MethodType(_fused_forward, layer)
            layer._trp_fused = True
            n += 1
    return n


def argmax_rows(logits: torch.Tensor) -> torch.Tensor | None:
    """``logits.argmax(-1)`` of bfloat16 ``[rows, vocab]`` logits natively (first index among equals; NaN the
    largest, as PyTorch's); ``None`` where the library is not loaded or the logits are not bfloat16 rows.
    """
    if _lib is None or logits.dtype != torch.bfloat16 or logits.dim() != 2 or logits.device.type != "cpu":
        return None
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    _lib.trp_argmax_rows_bf16(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr(),
                              torch.get_num_threads())
    return out


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor | None:
    """Masked grouped-query attention of many queries per row on AMX tiles; ``None`` where it does not apply.

    ``query`` is ``[rows, heads, queries, dim]``, ``key``/``value`` ``[rows, kv_heads, positions, dim]``
    (views are fine: only the last dimension must be contiguous), ``mask`` boolean
    ``[rows or 1, 1, queries, positions]`` (true: attend); all bfloat16 on the CPU. Returns
    ``[rows, queries, heads, dim]`` (transformers' layout). A query that sees no position gets zeros.
    Outputs agree with SDPA within bfloat16 rounding (the weights are rounded to bfloat16 before
    they meet the values, as in PyTorch's CPU flash attention).
    """
    if _lib is None or mask is None or mask.dtype != torch.bool or query.dim() != 4 or mask.dim() != 4:
        return None
    rows, heads, queries, dim = query.shape
    kv_heads, positions = key.shape[1], key.shape[2]
    if (query.dtype != torch.bfloat16 or key.dtype != torch.bfloat16 or value.dtype != torch.bfloat16
            or query.device.type != "cpu" or value.shape != key.shape or key.shape[0] != rows
            or heads % kv_heads or dim % 32 or dim > 256 or mask.shape[1] != 1
            or mask.shape[0] not in (1, rows) or tuple(mask.shape[2:]) != (queries, positions)
            or query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1):
        return None
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    flat = mask.view(torch.uint8)
    mask_strides = (ctypes.c_int64 * 2)(flat.stride(0) if flat.shape[0] > 1 else 0, flat.stride(2))
    out = torch.empty((rows, queries, heads, dim), dtype=torch.bfloat16)
    strides = lambda t: (ctypes.c_int64 * 3)(*t.stride()[:3])  # noqa: E731
    status = _lib.trp_prefill_attention_bf16(
        query.data_ptr(), strides(query), key.data_ptr(), strides(key), value.data_ptr(), strides(value),
        flat.data_ptr(), mask_strides, out.data_ptr(), rows, heads, kv_heads, queries, positions, dim, float(scale),
        torch.get_num_threads())
    if status == -2:
        raise MemoryError("native prefill attention could not allocate its buffers")
    return out if status == 0 else None
