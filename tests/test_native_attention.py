"""The native bfloat16 decoding-attention kernel: agreement with SDPA, fallbacks, build and engine wiring."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

from trprompt.engines import native_attention as na

runs_here = na.mode() != "sdpa" and na.cpu_supported() and na._compiler() is not None
needs_kernel = pytest.mark.skipif(not runs_here, reason="needs AVX512-BF16 and a C compiler")


def _inputs(rows: int, kv_heads: int, group: int, positions: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    capacity = positions + 13  # views of a larger cache, as the engine's preallocated layers hand out
    q = torch.randn(rows, 1, heads, dim, generator=g).bfloat16().transpose(1, 2)  # [rows, heads, 1, dim], strided
    k = torch.randn(rows, kv_heads, capacity, dim, generator=g).bfloat16()[:, :, :positions]
    v = torch.randn(rows, kv_heads, capacity, dim, generator=g).bfloat16()[:, :, :positions]
    mask = torch.ones(rows, positions, dtype=torch.bool)
    for r in range(rows):
        mask[r, : (r * 7) % max(positions - 1, 1)] = False  # left padding of different widths
    if positions > 4 and rows > 1:
        mask[1, positions // 2] = False  # a hole
    return q, k, v, mask[:, None, None, :]


def _reference(q, k, v, mask, dtype=torch.float32):
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype).repeat_interleave(group, 1),
                                         v.to(dtype).repeat_interleave(group, 1), attn_mask=mask)
    return out.transpose(1, 2).float()  # [rows, 1, heads, dim]


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 32), (3, 3, 3, 17, 64), (5, 2, 4, 100, 128), (2, 1, 8, 33, 64),
                                   (4, 3, 3, 300, 64), (2, 2, 2, 16, 256), (6, 3, 3, 47, 96)])
def test_kernel_matches_float32_within_bfloat16_noise(shape):
    q, k, v, mask = _inputs(*shape)
    out = na.decode_attention(q, k, v, mask, shape[-1] ** -0.5)
    assert out is not None and out.shape == (shape[0], 1, shape[1] * shape[2], shape[-1])
    assert out.dtype == torch.bfloat16
    exact = _reference(q, k, v, mask)
    sdpa_error = (_reference(q, k, v, mask, torch.bfloat16) - exact).abs().max().item()
    error = (out.float() - exact).abs().max().item()
    assert error <= 1.5 * sdpa_error + 2e-3, (error, sdpa_error)


@needs_kernel
def test_kernel_uses_the_mask_and_the_scale():
    q, k, v, mask = _inputs(3, 3, 3, 40, 64)
    full = na.decode_attention(q, k, v, None, 0.125)
    masked = na.decode_attention(q, k, v, mask, 0.125)
    other_scale = na.decode_attention(q, k, v, mask, 0.5)
    assert not torch.equal(full[1:], masked[1:])  # rows 1 and 2 have padding and a hole
    assert torch.equal(full[0], masked[0])  # row 0 attends everywhere
    assert (other_scale.float() - _reference(q, k, v, mask).float()).abs().max() > 0.01
    # a row that attends to one position returns that position's values
    one = torch.zeros_like(mask)
    one[..., 5] = True
    out = na.decode_attention(q, k, v, one, 0.125)
    expected = v[:, :, 5].repeat_interleave(3, 1)[:, None]  # [rows, 1, heads, dim]
    assert torch.equal(out, expected)


@needs_kernel
def test_a_row_that_attends_nowhere_gets_zeros_not_nan():
    q, k, v, mask = _inputs(2, 1, 2, 20, 64)
    mask[0] = False
    out = na.decode_attention(q, k, v, mask, 0.125)
    assert torch.isfinite(out.float()).all()
    assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[1]) > 0


@needs_kernel
@pytest.mark.parametrize("change", ["float32", "two_queries", "dim_48", "group_9", "float_mask", "short_mask"])
def test_inputs_outside_the_kernel_return_none(change):
    shape = {"dim_48": (2, 1, 2, 10, 48), "group_9": (2, 1, 9, 10, 64)}.get(change, (2, 1, 2, 10, 64))
    q, k, v, mask = _inputs(*shape)
    if change == "float32":
        q, k, v = q.float(), k.float(), v.float()
    elif change == "two_queries":
        q = torch.cat([q, q], dim=2)
    elif change == "float_mask":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    elif change == "short_mask":
        mask = mask[..., :-1]
    assert na.decode_attention(q, k, v, mask, 0.125) is None


@needs_kernel
def test_attention_forward_uses_the_kernel_only_for_decoding(monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups = 3
    module.is_causal = True
    calls = []
    real = na.decode_attention
    monkeypatch.setattr(na, "decode_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v, mask = _inputs(3, 3, 3, 30, 64)
    out, _ = na.attention_forward(module, q, k, v, mask, scaling=0.125)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)
    assert calls == [1] and out.shape == ref.shape
    assert (out.float() - ref.float()).abs().max() < 0.05
    # a masked prefill (several queries) runs SDPA with grouped heads: same result as repeating them
    qp = torch.randn(3, 9, 4, 64).bfloat16()
    maskp = torch.ones(3, 1, 4, 30, dtype=torch.bool).tril(26)
    maskp[1, ..., :5] = False
    out, _ = na.attention_forward(module, qp, k, v, maskp, scaling=0.125)
    ref, _ = sdpa_attention_forward(module, qp, k, v, maskp, scaling=0.125)
    assert calls == [1] and out.shape == ref.shape == (3, 4, 9, 64)
    assert (out.float() - ref.float()).abs().max() < 0.02
    # unmasked prefill and sliding windows go to SDPA unchanged
    out, _ = na.attention_forward(module, qp, k[:, :, :4], v[:, :, :4], None, scaling=0.125)
    ref, _ = sdpa_attention_forward(module, qp, k[:, :, :4], v[:, :, :4], None, scaling=0.125)
    assert torch.equal(out, ref)
    na.attention_forward(module, q, k, v, mask, scaling=0.125, sliding_window=8)
    assert calls == [1]


def test_mode_reads_the_environment(monkeypatch):
    monkeypatch.setenv(na.ENV, "SDPA")
    assert na.mode() == "sdpa"
    monkeypatch.delenv(na.ENV)
    assert na.mode() == "auto"
    monkeypatch.setenv(na.ENV, "fast")
    with pytest.raises(ValueError, match=na.ENV):
        na.mode()


def test_cpu_support_needs_every_flag(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor: 0\nflags: fpu avx512f avx512bw avx512vl avx512_bf16 amx_bf16\n")
    assert na.cpu_supported(info)
    info.write_text("processor: 0\nflags: fpu avx512f avx512bw avx512vl amx_tile\n")
    assert not na.cpu_supported(info)
    assert not na.cpu_supported(tmp_path / "missing")


def test_a_missing_or_failing_compiler_keeps_sdpa(monkeypatch, tmp_path):
    monkeypatch.setattr(na, "_lib", None)
    monkeypatch.setattr(na, "_lib_error", None)
    monkeypatch.setattr(na, "cpu_supported", lambda: True)
    monkeypatch.setenv("TRPROMPT_CACHE", str(tmp_path))
    monkeypatch.setattr(na, "_compiler", lambda: "false")  # exits 1 for --version and the build alike
    assert na.load() is None
    assert "false failed" in na.unavailable_reason()
    assert not list((tmp_path / "native").glob("*.so*"))  # no half-written library left behind

    class Model:
        config = type("C", (), {"_attn_implementation": "sdpa"})()
        dtype = torch.bfloat16
        device = torch.device("cpu")

        def set_attn_implementation(self, name):  # pragma: no cover - must not be reached
            raise AssertionError("installed without a kernel")

    assert na.install(Model()) is False


@needs_kernel
def test_build_is_cached_per_source_and_compiler(tmp_path):
    first = na.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert na.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files


@pytest.fixture(scope="module")
def head64_model_dir(tmp_path_factory):
    from trprompt.testing import make_tiny_llama

    # 4 query heads of 64 (hidden 256), 2 key/value heads: a shape the kernel takes
    return make_tiny_llama(tmp_path_factory.mktemp("tiny64") / "tiny-llama-256", hidden_size=256)


@needs_kernel
def test_a_decoding_step_agrees_with_sdpa(head64_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(head64_model_dir), dtype=torch.bfloat16).eval()
    cache_kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    ids = torch.randint(5, 1000, (3, 12), generator=torch.Generator().manual_seed(1))
    mask2d = torch.ones(3, 12, dtype=torch.long)
    mask2d[1, :4] = 0
    mask2d[2, :9] = 0
    positions = (mask2d.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        prefill = model(input_ids=ids, attention_mask=mask2d, position_ids=positions, use_cache=True)
        step_ids = prefill.logits[:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat([mask2d, mask2d.new_ones(3, 1)], 1)[:, None, None, :].bool()
        step_pos = positions[:, -1:] + 1
        caches = [prefill.past_key_values, copy.deepcopy(prefill.past_key_values)]
        ref = model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, **{cache_kw: caches[0]})
        calls = []
        real = na.decode_attention
        monkeypatch.setattr(na, "decode_attention", lambda *a: calls.append(1) or real(*a))
        assert na.install(model)
        out = model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, **{cache_kw: caches[1]})
    assert len(calls) == model.config.num_hidden_layers  # every layer's decoding attention ran the kernel
    diff = (out.logits.float() - ref.logits.float()).abs().max().item()
    scale = ref.logits.float().abs().max().item()
    assert diff <= 0.02 * scale, (diff, scale)
    assert torch.equal(out.logits[:, -1].argmax(-1), ref.logits[:, -1].argmax(-1))


@needs_kernel
def test_the_engine_installs_it_for_bfloat16_only(head64_model_dir, monkeypatch):
    from trprompt.engines import native_step
    from trprompt.engines.base import ChatRequest, SamplingParams
    from trprompt.engines.hf import HFEngine

    monkeypatch.setenv(native_step.ENV, "0")  # PyTorch's decoding step, whose attention this kernel serves
    engine = HFEngine(str(head64_model_dir), dtype="bfloat16")
    assert engine.native_attention and engine._base.config._attn_implementation == na.ATTENTION_NAME
    calls = []
    real = na.decode_attention
    monkeypatch.setattr(na, "decode_attention", lambda *a: calls.append(1) or real(*a))
    reqs = [ChatRequest([{"role": "user", "content": f"Count to {n}."}], SamplingParams(max_tokens=5)) for n in (3, 9)]
    results = engine.generate(reqs)
    assert len(results) == 2 and all(r.completion_tokens >= 1 for r in results)
    assert calls  # the decoding steps went through the kernel
    assert not HFEngine(str(head64_model_dir), dtype="float32").native_attention
    monkeypatch.setenv(na.ENV, "sdpa")
    assert not HFEngine(str(head64_model_dir), dtype="bfloat16").native_attention
