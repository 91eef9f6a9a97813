"""An in-process transformers engine with real batched decoding and LoRA adapters.

The decoding loop is written here rather than delegated to ``model.generate`` so
that every row of a batch can carry its own sampling settings (temperature, top-p,
``max_tokens``, seed, stop strings) and so that rows that are done leave the batch
(their KV cache entries are dropped) while the others keep going.

Batching: prompts are rendered with the tokenizer's chat template, grouped by
adapter, sorted by length, cut into chunks of ``max_batch_size`` rows, decoded, and
put back in request order. Within a chunk, a prompt prefix shared by every row is
prefilled once, each row's own tokens are prefilled without padding, and the decoding
steps run over the whole chunk with the KV cache written in place.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from trprompt.engines import native_attention, native_step
from trprompt.engines.base import AdapterNotFoundError, ChatRequest, ChatResult, Message, SamplingParams
from trprompt.engines.cpu_speed import PACKABLE, float32_packing, pack_linears, pack_mode, tune_allocator
from trprompt.engines.dtype import DTYPES, resolve_dtype, torch_dtype
from trprompt.engines.model_store import resolve_model
from trprompt.engines.native_step import DecodeStepper

_SDPA_MASKED = ("sdpa", native_attention.ATTENTION_NAME)
"""Attention implementations that take SDPA's boolean 4D masks."""


@dataclass
class _Row:
    """One completion to produce: a request copy (``n`` copies per request)."""

    request: int
    copy: int
    prompt_ids: list[int]
    sampling: SamplingParams
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None


def _preallocated_cache(config: Any, capacity: int) -> Any:
    """A ``DynamicCache`` whose layers write into buffers of ``capacity`` positions.

    The stock layer concatenates the whole key/value history on every decoding step
    (a copy that grows with the context); these layers write the new positions in place
    and hand attention a view. Models with other layer kinds (sliding windows) keep the
    stock cache.
    """
    cache = DynamicCache(config=config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


class _PreallocatedLayer(DynamicLayer):
    """A cache layer writing into a fixed-capacity buffer (doubled if it must grow)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = max(1, capacity)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions in place; return views of everything cached so far."""
        if self._k is None or self._v is None:
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty((b, h, self.capacity, d))
            self._v = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
            self._n = 0
            self.is_initialized = True
        end = self._n + key_states.shape[-2]
        if end > self._k.shape[-2]:
            self._k, self._v = _grown(self._k, end), _grown(self._v, end)
        self._k[:, :, self._n : end] = key_states
        self._v[:, :, self._n : end] = value_states
        self._n = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def reserve(self, count: int) -> int:
        """Make room for ``count`` more positions (a step that writes the buffers itself); where they start.

        -1 when nothing is cached yet (no buffers to write into).
        """
        if self._k is None or self._v is None:
            return -1
        if self._n + count > self._k.shape[-2]:
            self._k, self._v = _grown(self._k, self._n + count), _grown(self._v, self._n + count)
        return self._n

    def advance(self, count: int) -> None:
        """Count ``count`` positions written into the buffers after :meth:`reserve` as cached."""
        self._n += count
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    def place(self, row: int, rows: int, keys: torch.Tensor | Sequence[torch.Tensor],
              values: torch.Tensor | Sequence[torch.Tensor], start: int) -> None:
        """Put one row's prefilled KV (``[heads, length, dim]``, or pieces of it in order) into a batch of ``rows``.

        The row's positions begin at ``start``: the rows are right-aligned, so shorter ones begin
        later; the positions before ``start`` are zero-filled padding that the attention mask hides.
        """
        keys = [keys] if isinstance(keys, torch.Tensor) else list(keys)
        values = [values] if isinstance(values, torch.Tensor) else list(values)
        if self._k is None or self._v is None:
            h, _, d = keys[0].shape
            self._k = keys[0].new_zeros((rows, h, self.capacity, d))
            self._v = values[0].new_zeros((rows, h, self.capacity, values[0].shape[-1]))
            self.dtype, self.device = keys[0].dtype, keys[0].device
            self.is_initialized = True
        end = start + sum(k.shape[-2] for k in keys)
        if end > self._k.shape[-2]:
            self._k, self._v = _grown(self._k, end), _grown(self._v, end)
        # Padding must hold finite numbers: the mask gives it zero weight, but 0 * NaN is NaN.
        self._k[row, :, :start], self._v[row, :, :start] = 0, 0
        for k, v in zip(keys, values, strict=True):
            n = k.shape[-2]
            self._k[row, :, start : start + n], self._v[row, :, start : start + n] = k, v
            start += n
        self._n = max(self._n, end)
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Copy every row ``repeats`` times (a prefix prefilled once, shared by a batch)."""
        if self._n and self._k is not None and self._v is not None:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows in ``indices`` (rows that finished leave the batch)."""
        if self._n and self._k is not None and self._v is not None:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]


def _grown(buf: torch.Tensor, needed: int) -> torch.Tensor:
    extra = max(needed, 2 * buf.shape[-2]) - buf.shape[-2]
    # Zeros, not new_empty: a row placed later may leave part of the new region as masked padding.
    return torch.cat([buf, buf.new_zeros((*buf.shape[:2], extra, buf.shape[-1]))], dim=-2)


def _common_len(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """How many leading tokens ``a`` and ``b`` share (at most ``limit``)."""
    n, end = 0, min(len(a), len(b), limit if limit is not None else len(a))
    while n < end and a[n] == b[n]:
        n += 1
    return n


def _shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all ``prompts`` share, leaving every prompt at least one token of its own."""
    n = max(min(len(p) for p in prompts) - 1, 0)
    for other in prompts[1:]:
        n = _common_len(prompts[0], other, n)
        if n == 0:
            break
    return n


def _prefix_heads(prompts: Sequence[Sequence[int]], minimum: int) -> list[int]:
    """Per prompt, the length of the longest prefix it shares with another prompt of the batch.

    Rows whose prompts start alike (one template and one optimal reward followed by
    different questions) get the same head, which is prefilled once for all of them.
    Heads shorter than ``minimum`` count as 0; every prompt keeps at least one token
    of its own. Sorting the prompts puts each one next to its best match, so comparing
    neighbours finds every head.
    """
    heads = [0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    for a, b in zip(order, order[1:], strict=False):
        n = _common_len(prompts[a], prompts[b])
        heads[a], heads[b] = max(heads[a], n), max(heads[b], n)
    capped = [min(h, len(p) - 1) for h, p in zip(heads, prompts, strict=True)]
    return [h if h >= minimum else 0 for h in capped]


def _merge_heads(prompts: Sequence[Sequence[int]], heads: Sequence[int], minimum: int) -> list[int]:
    """Shorten the heads of :func:`_prefix_heads` where one shorter shared head prefills fewer positions.

    Pairwise heads overlap: three candidates' rows under one question share the template
    and the question, but two of them also share the first words of their instructions,
    so they get a longer head than the third, and both heads (prefilled separately)
    repeat the template and the question. Groups of rows (one per distinct head) are
    merged, neighbours in sorted order first, into one group headed by their common
    prefix whenever that lowers the positions to prefill: the heads' lengths once each,
    plus every row's own tokens. A head left to a single row is dropped (the row is
    prefilled whole, one forward fewer). Returns the new head length per prompt (0: none).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, (h, prompt) in enumerate(zip(heads, prompts, strict=True)):
        if h:
            groups.setdefault(tuple(prompt[:h]), []).append(b)
    order = sorted(groups.items())
    while len(order) > 1:
        best, best_saving = -1, 0
        for i in range(len(order) - 1):
            (h1, rows1), (h2, rows2) = order[i], order[i + 1]
            common = _common_len(h1, h2)
            if common < max(minimum, 1):
                continue
            saving = len(h1) + len(h2) - common - len(rows1) * (len(h1) - common) - len(rows2) * (len(h2) - common)
            if saving > best_saving:
                best, best_saving = i, saving
        if best < 0:
            break
        (h1, rows1), (h2, rows2) = order[best], order[best + 1]
        merged = (h1[: _common_len(h1, h2)], rows1 + rows2)
        order = sorted([*order[:best], merged, *order[best + 2 :]])
    out = [0] * len(prompts)
    for head, rows in order:
        if len(rows) > 1:
            for b in rows:
                out[b] = len(head)
    return out


def _copy_seed(seed: int, copy: int) -> int:
    """Distinct, reproducible seed for copy ``copy`` of a request seeded with ``seed``."""
    return (seed * 1_000_003 + copy) % (2**63 - 1)


class HFEngine:
    """The :class:`~trprompt.engines.base.Engine` protocol on a transformers causal LM.

    ``model`` is anything :func:`~trprompt.engines.model_store.resolve_model` accepts (a
    registry name, a local folder, or an HF id already in the local cache).
    ``threads`` sets ``torch.set_num_threads`` (process-wide). ``dtype`` is one of
    ``auto``/``float32``/``bfloat16``/``float16``; ``auto`` is resolved by
    :func:`trprompt.engines.dtype.resolve_dtype` (bfloat16 on CPUs with native
    bfloat16, else float32) and the result kept in :attr:`dtype_name`. Rows of a
    batch whose prompts begin with the same ``min_shared_prefix`` or more tokens (one template and one optimal
    reward before different questions) prefill that prefix once. All public
    methods are thread-safe: one lock serializes generation and adapter changes.
    """

    prefill_padding: float = 0.1
    """With :attr:`batch_prefill`, the most extra (padding) positions a batched prefill may compute, per real one.

    0.1 since the native kernels made each forward cheaper to start: on the bench's fan-out 742 instead of 2,427
    padding positions, prefill 8.0 / 6.1 s against 8.2 / 7.6 s at 0.3 (alternating runs on the AMX VM)."""

    compact_fraction: float = 0.25
    """Finished rows leave a decoding batch (a copy of its KV cache) once they are this fraction of it (0: at once)."""

    def __init__(
        self,
        model: str,
        threads: int | None = None,
        dtype: str = "auto",
        max_batch_size: int = 32,
        device: str = "cpu",
        min_shared_prefix: int = 16,
        cache_dir: str | Path | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if threads is not None:
            torch.set_num_threads(threads)
        self.model_name = model
        self.path = resolve_model(model, cache_dir)
        self.max_batch_size = max_batch_size
        self.min_shared_prefix = min_shared_prefix
        self.device = torch.device(device)
        self.dtype_name = resolve_dtype(dtype, self.device, who=f"HFEngine({model})")
        """The dtype the weights were loaded in (``auto`` resolved; ``"auto"`` only off-CPU: the checkpoint's)."""

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token

        weights = torch_dtype(self.dtype_name)
        if self.device.type == "cpu":
            tune_allocator()
        self._base = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=weights).to(self.device)
        self._base.eval()
        self.packed_linears: int = 0
        """Linear layers holding a oneDNN-packed copy of their weight (CPU only; bfloat16 always, float32
        where it is faster on this machine; ``TRPROMPT_CPU_PACK``, see :mod:`~.cpu_speed`)."""
        mode = pack_mode()
        if self.device.type == "cpu" and weights in PACKABLE and mode != "0":
            self.packed_linears = pack_linears(self._base, float32=float32_packing(mode))
        self.native_attention: bool = self.device.type == "cpu" and native_attention.install(self._base)
        """Decoding steps run the native bfloat16 attention kernel (:mod:`~.native_attention`; CPUs with
        AVX512-BF16 and a C compiler; ``TRPROMPT_CPU_ATTENTION=sdpa`` keeps transformers' SDPA)."""
        self.batch_prefill: bool = self.device.type != "cpu" or weights != torch.float32 or self.packed_linears > 0
        """Prefill the rows' own tokens (after their heads) as left-padded batches instead of one row at a time.

        On by default in bfloat16/float16, off-CPU, and in float32 with packed weights: there a
        single row's prefill gets a fraction of the matmul speed a batch gets (bfloat16: a 60-token
        row a third; float32 through oneDNN's packed kernel on an AVX2 VM: the bench's prefill
        60 -> 51 s despite 16 % padding), so batching wins. In float32 through MKL's sgemm (where
        packing does not pay) padded batches measured no faster on the AVX512 VM, so rows go one
        at a time.
        """
        self.fused_layers: int = native_step.install_layers(self._base) if self.native_attention else 0
        """Decoder layers whose PyTorch forward does its norms, rotary embedding and SiLU natively (same bits)."""
        self._stepper: DecodeStepper | None = DecodeStepper.create(self._base) if self.native_attention else None
        """Runs whole decoding steps natively (:mod:`~.native_step`: bfloat16 Llama models on CPUs with AMX;
        ``TRPROMPT_CPU_STEP=0`` keeps PyTorch's forward); ``None`` where it cannot."""
        # transformers 5.2x renamed forward's ``past_key_values`` to ``cache`` (the old name goes in 5.40).
        params = inspect.signature(type(self._base).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._peft: Any = None  # a peft.PeftModel wrapping self._base once an adapter is loaded
        self._adapters: dict[str, str] = {}
        self._lock = threading.Lock()
        self.stats: dict[str, float] = {"forward_calls": 0, "forward_tokens": 0, "padding_tokens": 0, "logit_rows": 0,
                                        "prefill_calls": 0, "prefill_s": 0.0, "decode_steps": 0, "decode_rows": 0,
                                        "decode_kv_positions": 0, "decode_s": 0.0, "native_steps": 0}
        """Work done so far (benchmarks): model forward calls, token positions computed and how many of them were
        padding (padded prefill batches, finished rows carried by decoding steps), rows that got logits; prefill
        forwards and their seconds; decoding steps, the rows they carried, the KV-cache positions their attention read
        (rows x cached positions, padding included) and their seconds, and how many of those steps ran natively."""

        eos: set[int] = set()
        for source in (self._base.generation_config.eos_token_id, self._base.config.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(t) for t in source)
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        """Tokens that end a completion (included in its token count, not in its text)."""
        self.pad_token_id: int = int(self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------ prompts

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt text the model sees: chat template with the assistant turn opened.

        Tokenizers without a chat template get a plain ``role: content`` layout.
        """
        msgs = [dict(m) for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"

    def render_prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The exact prompt token ids fed to the model for ``messages``."""
        return list(self.tokenizer(self.render_prompt(messages), add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> list[str]:
        """Ids of the loaded LoRA adapters."""
        return list(self._adapters)

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Load the peft LoRA adapter saved at ``path`` as ``adapter_id`` (replacing one of that id)."""
        from peft import PeftModel

        with self._lock:
            if adapter_id in self._adapters:
                self._delete_adapter(adapter_id)
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._base, str(path), adapter_name=adapter_id)
            else:
                self._peft.load_adapter(str(path), adapter_name=adapter_id)
            self._peft.eval()
            self._adapters[adapter_id] = str(path)

    def unload_adapter(self, adapter_id: str) -> None:
        """Delete ``adapter_id``; raises :class:`AdapterNotFoundError` if it is not loaded."""
        with self._lock:
            if adapter_id not in self._adapters:
                raise AdapterNotFoundError(adapter_id)
            self._delete_adapter(adapter_id)

    def _delete_adapter(self, adapter_id: str) -> None:
        del self._adapters[adapter_id]
        if self._adapters:
            self._peft.delete_adapter(adapter_id)
        else:
            # Last one gone: strip the LoRA layers and go back to the plain model.
            self._base = self._peft.unload()
            self._peft = None

    @contextlib.contextmanager
    def _adapter_active(self, adapter: str | None) -> Iterator[None]:
        if self._peft is None:
            yield
        elif adapter is None:
            with self._peft.disable_adapter():
                yield
        else:
            self._peft.set_adapter(adapter, inference_mode=True)
            yield

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Complete every request (batched); results come back in request order."""
        requests = list(requests)
        if not requests:
            return []
        with self._lock:
            for r in requests:
                if r.adapter is not None and r.adapter not in self._adapters:
                    raise AdapterNotFoundError(r.adapter)
            prompts = [self.render_prompt_ids(r.messages) for r in requests]
            rows: list[_Row] = []
            for i, (req, ids) in enumerate(zip(requests, prompts, strict=True)):
                for c in range(req.sampling.n):
                    gen = None
                    if req.sampling.seed is not None and req.sampling.temperature > 0:
                        gen = torch.Generator(device=self.device).manual_seed(_copy_seed(req.sampling.seed, c))
                    rows.append(_Row(i, c, ids, req.sampling, gen))

            by_adapter: dict[str | None, list[_Row]] = {}
            for row in rows:
                by_adapter.setdefault(requests[row.request].adapter, []).append(row)
            with torch.inference_mode():
                for adapter, group in by_adapter.items():
                    group.sort(key=lambda r: -len(r.prompt_ids))  # stable: equal lengths keep their order
                    with self._adapter_active(adapter):
                        for start in range(0, len(group), self.max_batch_size):
                            self._decode(group[start : start + self.max_batch_size])

        per_request: list[list[_Row]] = [[] for _ in requests]
        for row in rows:  # rows were built request by request, copy by copy
            per_request[row.request].append(row)
        results = []
        for ids, mine in zip(prompts, per_request, strict=True):
            results.append(
                ChatResult(
                    texts=[self._final_text(r) for r in mine],
                    prompt_tokens=len(ids),
                    completion_tokens=sum(len(r.tokens) for r in mine),
                    finish_reasons=[r.finish or "length" for r in mine],
                )
            )
        return results

    def _final_text(self, row: _Row) -> str:
        tokens = row.tokens[:-1] if row.tokens and row.tokens[-1] in self.eos_token_ids else row.tokens
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return _cut_at_stop(text, row.sampling.stop)

    def _forward(self, cache: Any, hidden_only: bool = False, **inputs: Any) -> Any:
        """One forward pass of the model over ``inputs``, reading and extending the KV ``cache``.

        ``hidden_only`` runs the decoder without the LM head (a prefill whose logits nobody reads).
        """
        ids = inputs["input_ids"]
        stats = self.stats
        stats["forward_calls"] += 1
        stats["forward_tokens"] += int(ids.numel())
        started = time.perf_counter()
        if hidden_only:
            out = self._base.get_decoder()(**inputs, **{self._cache_kw: cache})
        else:
            stats["logit_rows"] += int(ids.shape[0]) if inputs.get("logits_to_keep") == 1 else int(ids.numel())
            out = self._base(**inputs, **{self._cache_kw: cache})
        if ids.shape[1] == 1 and not hidden_only and "logits_to_keep" not in inputs:  # a decoding step
            stats["decode_steps"] += 1
            stats["decode_rows"] += int(ids.shape[0])
            mask = inputs.get("attention_mask")
            positions = int(mask.shape[-1]) if mask is not None else int(cache.get_seq_length())
            stats["decode_kv_positions"] += int(ids.shape[0]) * positions
            stats["decode_s"] += time.perf_counter() - started
        else:
            stats["prefill_calls"] += 1
            stats["prefill_s"] += time.perf_counter() - started
        return out

    def _decode(self, rows: list[_Row]) -> None:
        """Decode one chunk of rows as one left-padded batch, filling ``row.tokens``/``finish``.

        Prefill is compute-bound on a CPU, so it avoids work that batching cannot
        amortise: a prefix that several rows share (a template head, or a template and
        one optimal reward; at least ``min_shared_prefix`` tokens) is prefilled once per
        distinct prefix, and each row's own tokens are prefilled without padding. The
        rows' KV caches are then laid out left-padded in one batch cache,
        and decoding steps run over the whole batch.
        """
        prompts = [r.prompt_ids for r in rows]
        width = max(len(p) for p in prompts)
        cache = _preallocated_cache(self._base.config, width + max(r.sampling.max_tokens for r in rows))
        full_attention = all(isinstance(layer, _PreallocatedLayer) for layer in cache.layers)
        if full_attention:
            heads = _merge_heads(prompts, _prefix_heads(prompts, self.min_shared_prefix), self.min_shared_prefix)
            logits, mask = self._prefill_rows(prompts, heads, cache)
        else:
            shared = _shared_prefix_len(prompts) if len(rows) > 1 else 0
            shared = shared if shared >= self.min_shared_prefix else 0
            logits, mask = self._prefill_padded(prompts, shared, width - shared, cache)
        next_pos = torch.tensor([[len(p)] for p in prompts], dtype=torch.long, device=self.device)
        native = self._stepper is not None and full_attention and self._stepper.prepare()
        cache_rows = torch.arange(len(rows)) if native else None  # the cache row of each active row
        active = list(rows)
        while True:
            tokens = self._pick(logits, active)
            keep: list[int] = []
            for b, (row, tok) in enumerate(zip(active, tokens.tolist(), strict=True)):
                if row.finish is not None:  # finished earlier, still in the batch until the next compaction
                    continue
                row.tokens.append(tok)
                if tok in self.eos_token_ids or self._hit_stop(row):
                    row.finish = "stop"
                elif len(row.tokens) >= row.sampling.max_tokens:
                    row.finish = "length"
                else:
                    keep.append(b)
            if not keep:
                return
            if cache_rows is not None:
                # The native step reads each row's cache through cache_rows: finished rows leave at once, no copy.
                if len(keep) < len(active):
                    idx = torch.tensor(keep, device=self.device)
                    mask, next_pos, tokens, cache_rows = mask[idx], next_pos[idx], tokens[idx], cache_rows[idx]
                    active = [active[b] for b in keep]
            # Dropping rows copies every layer's KV buffers, so finished rows ride along (their
            # tokens are ignored) until they are a ``compact_fraction`` of the batch.
            elif len(active) - len(keep) >= max(1, math.ceil(self.compact_fraction * len(active))):
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                mask, next_pos, tokens = mask[idx], next_pos[idx], tokens[idx]
                active = [active[b] for b in keep]
            self.stats["padding_tokens"] += len(active) - len(keep)  # finished rows riding along
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            logits = None if cache_rows is None else self._native_step(tokens, next_pos, mask, cache, cache_rows)
            if logits is None:
                if cache_rows is not None:  # the native step cannot go on: PyTorch's from here, on a compacted cache
                    cache.batch_select_indices(cache_rows)
                    cache_rows = None
                logits = self._forward_step(tokens, next_pos, mask, cache, full_attention)
            next_pos = next_pos + 1

    def _native_step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any,
                     cache_rows: torch.Tensor) -> torch.Tensor | None:
        """One decoding step through the native step (:mod:`~.native_step`); bfloat16 logits, or ``None``."""
        if self._stepper is None:
            return None
        started = time.perf_counter()
        logits = self._stepper.step(tokens, positions, mask, cache, cache_rows)
        if logits is not None:
            stats, rows = self.stats, int(tokens.shape[0])
            for key, value in (("forward_calls", 1), ("forward_tokens", rows), ("logit_rows", rows),
                               ("decode_steps", 1), ("decode_rows", rows),
                               ("decode_kv_positions", rows * int(mask.shape[-1])), ("native_steps", 1)):
                stats[key] += value
            stats["decode_s"] += time.perf_counter() - started
        return logits

    def _forward_step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any,
                      full_attention: bool) -> torch.Tensor:
        """One decoding step (one new token per row) through the model's forward; float32 logits ``[rows, vocab]``."""
        out = self._forward(
            input_ids=tokens[:, None],
            attention_mask=self._step_mask(mask, full_attention),
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        return out.logits[:, -1, :].float()

    def _step_mask(self, mask: torch.Tensor, full_attention: bool) -> torch.Tensor:
        """The attention mask of a decoding step: the 2D padding mask, or its 4D boolean form under SDPA.

        transformers drops a 2D mask with no padding (one row, or rows of equal length) and
        then asks SDPA for grouped-query attention (``enable_gqa``), which on a CPU runs 4-6x
        slower than the grouped layout it uses when a mask is present (one request's
        decoding step at 300 cached positions: 0.24 vs 0.06 ms of attention per layer). A
        4D mask (``[rows, 1, 1, positions]``, true where a row attends) is passed through
        as is, so every step takes the fast layout. Only for full-attention layers (a 4D
        mask would bypass a sliding window) under SDPA (eager attention wants additive masks).
        """
        if not full_attention or getattr(self._base.config, "_attn_implementation", None) not in _SDPA_MASKED:
            return mask
        return mask[:, None, None, :].bool()

    def _prefill_rows(
        self, prompts: list[list[int]], heads: list[int], cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill each distinct head once and every row's own tokens on top; lay the KV out left-padded.

        ``heads[b]`` is how many leading tokens row ``b`` takes from a head prefilled
        once for every row that shares it (0: none). Each row's own tokens are
        prefilled on their own, without padding (float32 on a CPU, where prefill is
        compute-bound and padded batches measured no faster), or, with
        :attr:`batch_prefill`, in left-padded batches of rows with similar tail lengths,
        whatever their heads (see :meth:`_prefill_groups`). Returns the last-position
        logits per row and the batch attention mask.
        """
        dev = self.device
        width = max(len(p) for p in prompts)
        prefilled = self._prefill_heads([tuple(p[:h]) for h, p in zip(heads, prompts, strict=True) if h])
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=dev)
        last: list[torch.Tensor | None] = [None] * len(prompts)
        for group in self._prefill_groups(prompts, heads):
            under = [prefilled[tuple(prompts[b][: heads[b]])] if heads[b] else None for b in group]
            for b, keys, values, logits in self._prefill_tails(
                [prompts[b] for b in group], [heads[b] for b in group], under
            ):
                row = group[b]
                last[row] = logits
                start = width - len(prompts[row])
                for dst, k, v in zip(cache.layers, keys, values, strict=True):
                    dst.place(row, len(prompts), k, v, start)
                mask[row, start:] = 1
        return torch.stack([t for t in last if t is not None]), mask

    def _prefill_heads(self, heads: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], Any]:
        """Prefill each distinct head once; returns per head an object whose ``layers`` carry ``keys``/``values``.

        Without :attr:`batch_prefill` each head gets its own forward. With it, heads of
        similar length share a right-padded forward: attention is causal, so the padding
        after a head never reaches the head's own positions, and each head keeps only its
        own positions of the batch cache (no attention mask needed). Only the KV cache is
        kept, so the LM head is left out of these forwards.
        """
        config, dev = self._base.config, self.device
        distinct = sorted(set(heads), key=len, reverse=True)
        groups: list[list[tuple[int, ...]]] = []
        for head in distinct:
            if (groups and self.batch_prefill
                    and len(groups[-1][0]) * (len(groups[-1]) + 1)
                    <= (1 + self.prefill_padding) * (sum(map(len, groups[-1])) + len(head))):
                groups[-1].append(head)
            else:
                groups.append([head])
        done: dict[tuple[int, ...], Any] = {}
        for group in groups:
            wide = len(group[0])
            cache = _preallocated_cache(config, wide)
            ids = torch.full((len(group), wide), self.pad_token_id, dtype=torch.long, device=dev)
            for b, head in enumerate(group):
                ids[b, : len(head)] = torch.tensor(head, dtype=torch.long, device=dev)
            self._forward(input_ids=ids, cache=cache, use_cache=True, hidden_only=True)
            self.stats["padding_tokens"] += wide * len(group) - sum(map(len, group))
            for b, head in enumerate(group):
                n = len(head)
                done[head] = SimpleNamespace(layers=[
                    SimpleNamespace(keys=layer.keys[b : b + 1, :, :n], values=layer.values[b : b + 1, :, :n])
                    for layer in cache.layers
                ])
        return done

    def _prefill_groups(self, prompts: list[list[int]], heads: list[int]) -> list[list[int]]:
        """Rows whose own tokens are prefilled in one forward: similar tail lengths, any heads.

        Without :attr:`batch_prefill` every row is its own group. Otherwise the rows are
        sorted by tail length (their tokens after their head) and cut where a left-padded
        batch would compute more than :attr:`prefill_padding` extra positions. Rows under
        different heads share a forward: each row attends to its own head's cache (see
        :meth:`_prefill_tails`), so three candidates' rows under one question and the rows
        of the next question are prefilled together.
        """
        if not self.batch_prefill:
            return [[b] for b in range(len(prompts))]
        rows = sorted(range(len(prompts)), key=lambda b: -(len(prompts[b]) - heads[b]))
        groups: list[list[int]] = []
        group: list[int] = []
        real = 0
        for b in rows:
            tail = len(prompts[b]) - heads[b]
            widest = len(prompts[group[0]]) - heads[group[0]] if group else tail
            if group and widest * (len(group) + 1) > (1 + self.prefill_padding) * (real + tail):
                groups.append(group)
                group, real = [], 0
            group.append(b)
            real += tail
        groups.append(group)
        return groups

    def _prefill_tails(
        self, prompts: list[list[int]], hs: list[int], heads: list[Any]
    ) -> Iterator[tuple[int, list[torch.Tensor], list[torch.Tensor], torch.Tensor]]:
        """Prefill the own tokens of ``prompts`` in one forward, each on top of its head's cache.

        Row ``b`` continues the ``hs[b]``-token cache ``heads[b]`` (none when 0). The heads
        are right-aligned in a region as wide as the longest (left-padded), the tails
        left-padded after it; the mask hides both paddings and positions continue from each
        row's head. Yields per row its index, its KV per layer (pieces ``[heads, length, dim]`` that
        leave the padding out, in order) and its last-position logits.
        """
        config, dev, n = self._base.config, self.device, len(prompts)
        tails = [len(p) - h for p, h in zip(prompts, hs, strict=True)]
        wide, lead = max(tails), max(hs)
        own = _preallocated_cache(config, lead + wide)
        if lead:
            one_head = len({id(head) for head in heads}) == 1  # every row under the same head: expand, no copy
            some = next(head for head in heads if head is not None)
            for i, layer in enumerate(own.layers):
                if one_head:
                    keys = some.layers[i].keys.expand(n, -1, -1, -1)
                    values = some.layers[i].values.expand(n, -1, -1, -1)
                else:
                    k0, v0 = some.layers[i].keys, some.layers[i].values
                    keys = k0.new_zeros((n, k0.shape[1], lead, k0.shape[-1]))
                    values = v0.new_zeros((n, v0.shape[1], lead, v0.shape[-1]))
                    for b, (h, head) in enumerate(zip(hs, heads, strict=True)):
                        if h:
                            keys[b, :, lead - h :] = head.layers[i].keys[0]
                            values[b, :, lead - h :] = head.layers[i].values[0]
                layer.update(keys, values)
        ids = torch.full((n, wide), self.pad_token_id, dtype=torch.long, device=dev)
        mask = torch.zeros((n, lead + wide), dtype=torch.long, device=dev)
        positions = torch.zeros((n, wide), dtype=torch.long, device=dev)
        for b, (prompt, h, t) in enumerate(zip(prompts, hs, tails, strict=True)):
            ids[b, wide - t :] = torch.tensor(prompt[h:], dtype=torch.long, device=dev)
            mask[b, lead - h : lead] = 1
            mask[b, lead + wide - t :] = 1
            positions[b, wide - t :] = torch.arange(h, h + t, device=dev)
        extra: dict[str, Any] = {} if n == 1 and wide == tails[0] and lead == hs[0] else {"attention_mask": mask}
        out = self._forward(input_ids=ids, position_ids=positions, cache=own, use_cache=True, logits_to_keep=1,
                            **extra)
        self.stats["padding_tokens"] += n * wide - sum(tails)
        for b, (h, t) in enumerate(zip(hs, tails, strict=True)):
            keys, values = [], []
            for layer in own.layers:
                k, v = layer.keys[b], layer.values[b]
                if h < lead or t < wide:  # leave out the padding before the head and between head and tail
                    keys.append([k[:, lead - h : lead], k[:, lead + wide - t :]])
                    values.append([v[:, lead - h : lead], v[:, lead + wide - t :]])
                else:
                    keys.append([k])
                    values.append([v])
            yield b, keys, values, out.logits[b, -1].float()

    def _prefill_padded(
        self, prompts: list[list[int]], shared: int, width: int, cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill for caches without in-place layers: the shared head once, then all tails left-padded."""
        n = len(prompts)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for b, ids in enumerate(prompts):
            tail = ids[shared:]
            input_ids[b, width - len(tail) :] = torch.tensor(tail, dtype=torch.long)
            mask[b, width - len(tail) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        if shared:
            head = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=self.device)
            self._forward(input_ids=head, cache=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(n)
            mask = torch.cat([mask.new_ones((n, shared)), mask], dim=1)
        out = self._forward(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1)
        self.stats["padding_tokens"] += n * width - sum(len(ids) - shared for ids in prompts)
        return out.logits[:, -1, :].float(), mask

    def _pick(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Next token per row: argmax for temperature 0, else top-p sampling with the row's generator.

        ``logits`` may be bfloat16 (the native step's): the argmax is then taken natively (the same
        index as over their float32 values) and only sampled rows are converted.
        """
        chosen = native_step.argmax_rows(logits) if logits.dtype == torch.bfloat16 else None
        if chosen is None:
            chosen = logits.float().argmax(dim=-1)
        sampled = [b for b, r in enumerate(rows) if r.sampling.temperature > 0]
        if not sampled:
            return chosen
        idx = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([rows[b].sampling.temperature for b in sampled], device=logits.device)
        probs = torch.softmax(logits[idx].float() / temps[:, None], dim=-1)
        top_ps = torch.tensor([rows[b].sampling.top_p for b in sampled], device=logits.device)
        if bool((top_ps < 1.0).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly before each token
            sorted_p = sorted_p.masked_fill(before >= top_ps[:, None], 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        for k, b in enumerate(sampled):
            chosen[b] = torch.multinomial(probs[k], 1, generator=rows[b].generator)[0]
        return chosen

    def _hit_stop(self, row: _Row) -> bool:
        stops = row.sampling.stop
        if not stops:
            return False
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        return any(s and s in text for s in stops)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            at = text.find(s)
            if 0 <= at < cut:
                cut = at
    return text[:cut]
