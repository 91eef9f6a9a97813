"""The native decoding step: bit-exact agreement with transformers' step, the engine's use of it, fallbacks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from trprompt.engines import native, native_step
from trprompt.engines.base import ChatRequest, SamplingParams

runs_here = native_step.mode() != "0" and native.find_compiler() is not None and native_step.load() is not None
needs_step = pytest.mark.skipif(not runs_here, reason="needs AMX, AVX512-BF16, Linux 5.16+ and a C compiler")

QUESTIONS = ["What is 2 + 3?", "Name a prime number larger than ten, please.", "Why is the sky blue?",
             "Count to five.", "Spell the word 'engine' backwards and then say it twice."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trprompt.testing import make_tiny_llama

    # head_dim 64, 4 query heads over 2 key/value heads, 3 layers: shapes the kernels take
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-step") / "tiny-llama-256", hidden_size=256, num_layers=3)


def _reqs(adapter: str | None = None, max_tokens: int = 10) -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": q}], SamplingParams(temperature=0.0, max_tokens=max_tokens),
                        adapter=adapter) for q in QUESTIONS]


@needs_step
def test_a_step_is_bit_identical_to_transformers_step(model_dir: Path) -> None:
    """Rows at different positions, with left padding and a hole in the mask: same logits and cache, bit for bit."""
    from trprompt.engines.hf import HFEngine, _preallocated_cache

    engine = HFEngine(str(model_dir), dtype="bfloat16")
    assert engine._stepper is not None
    model = engine._base
    torch.manual_seed(0)
    rows, length = 4, 37
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    mask = torch.ones((rows, length + 1), dtype=torch.long)
    mask[1, :5] = 0  # left padding
    mask[2, :11] = 0
    mask[3, 20] = 0  # a hole
    with torch.inference_mode():
        cache = _preallocated_cache(model.config, length)  # full after the prefill: the step must grow it
        model(input_ids=ids, cache=cache, use_cache=True)
        theirs = copy.deepcopy(cache)
        tokens = torch.tensor([5, 17, 99, 1234])
        positions = torch.tensor([length, length - 5, length - 11, length + 40])
        want = model(input_ids=tokens[:, None], attention_mask=mask[:, None, None, :].bool(),
                     position_ids=positions[:, None], cache=theirs, use_cache=True).logits[:, -1]
        assert engine._stepper.prepare()
        got = engine._stepper.step(tokens, positions, mask, cache)
    assert got is not None and got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    for mine, ref in zip(cache.layers, theirs.layers, strict=True):
        assert mine._n == ref._n == length + 1
        assert torch.equal(mine.keys, ref.keys) and torch.equal(mine.values, ref.values)


@needs_step
def test_the_engine_decodes_the_same_tokens_with_and_without_it(model_dir: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    from trprompt.engines.hf import HFEngine

    engine = HFEngine(str(model_dir), dtype="bfloat16", max_batch_size=3)  # two chunks, rows finishing early
    monkeypatch.setenv(native_step.ENV, "0")
    plain = HFEngine(str(model_dir), dtype="bfloat16", max_batch_size=3)
    assert engine._stepper is not None and plain._stepper is None
    reqs = _reqs(max_tokens=12)
    reqs[1] = ChatRequest(reqs[1].messages, SamplingParams(temperature=0.0, max_tokens=3))
    mine, theirs = engine.generate(reqs), plain.generate(reqs)
    assert [r.texts for r in mine] == [r.texts for r in theirs]
    assert engine.stats["native_steps"] == engine.stats["decode_steps"] > 0
    assert plain.stats["native_steps"] == 0 and plain.stats["decode_steps"] == engine.stats["decode_steps"]


@needs_step
def test_an_active_adapter_takes_pytorch_and_a_disabled_one_does_not(model_dir: Path, tmp_path: Path) -> None:
    from fixtures_run import make_lora_adapter

    from trprompt.engines.hf import HFEngine

    engine = HFEngine(str(model_dir), dtype="bfloat16")
    lora = make_lora_adapter(model_dir, tmp_path / "lora", seed=3)
    engine.load_adapter("a", str(lora))
    before = dict(engine.stats)
    with_adapter = engine.generate(_reqs("a"))
    assert engine.stats["native_steps"] == before["native_steps"]  # LoRA changes q/v: PyTorch's path ran
    assert engine.stats["decode_steps"] > before["decode_steps"]
    before = dict(engine.stats)
    without = engine.generate(_reqs())
    assert engine.stats["native_steps"] - before["native_steps"] == engine.stats["decode_steps"] - before[
        "decode_steps"] > 0
    assert [r.texts for r in with_adapter] != [r.texts for r in without]  # the adapter acted
    engine.unload_adapter("a")
    assert [r.texts for r in engine.generate(_reqs())] == [r.texts for r in without]


def test_the_setting_turns_it_off_and_rejects_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native_step.ENV, "0")
    assert native_step.load() is None
    assert native_step.DecodeStepper.create(torch.nn.Linear(2, 2)) is None
    monkeypatch.setenv(native_step.ENV, "fast")
    with pytest.raises(ValueError, match=native_step.ENV):
        native_step.mode()


def test_models_it_cannot_reproduce_are_left_to_pytorch(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    assert "bfloat16" in (native_step.DecodeStepper._unsupported(model) or "")
    model.config.model_type = "gemma"
    assert "gemma" in (native_step.DecodeStepper._unsupported(model) or "")


def test_a_kernel_is_rebuilt_when_a_file_it_includes_changes(tmp_path: Path) -> None:
    if native.find_compiler() is None:
        pytest.skip("needs a C compiler")
    (tmp_path / "part.c").write_text("static int value(void) { return 1; }\n")
    main = tmp_path / "main.c"
    main.write_text('#include "part.c"\nint answer(void) { return value(); }\n')
    flags = ("-O1", "-shared", "-fPIC")
    first = native.build(main, flags, native.find_compiler(), tmp_path / "out")
    assert native.build(main, flags, native.find_compiler(), tmp_path / "out") == first
    (tmp_path / "part.c").write_text("static int value(void) { return 2; }\n")
    second = native.build(main, flags, native.find_compiler(), tmp_path / "out")
    assert second != first
    import ctypes

    assert ctypes.CDLL(str(second)).answer() == 2


@needs_step
def test_fused_layers_give_pytorch_s_exact_prefill_with_and_without_an_adapter(model_dir: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from fixtures_run import make_lora_adapter

    from trprompt.engines.hf import HFEngine

    lora = make_lora_adapter(model_dir, tmp_path / "lora", seed=5)
    fused = HFEngine(str(model_dir), dtype="bfloat16")
    monkeypatch.setenv(native_step.ENV, "0")
    plain = HFEngine(str(model_dir), dtype="bfloat16")
    assert fused.fused_layers == 3 and plain.fused_layers == 0
    torch.manual_seed(2)
    ids = torch.randint(0, 40000, (3, 29))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    calls = []
    real = native_step.rms_norm
    monkeypatch.setattr(native_step, "rms_norm", lambda *a: calls.append(1) or real(*a))

    def logits(engine: HFEngine) -> torch.Tensor:
        with torch.inference_mode():
            return engine._base(input_ids=ids, attention_mask=mask, position_ids=positions).logits

    assert torch.equal(logits(fused), logits(plain)) and calls  # the fused forward ran, to the bit
    for engine in (fused, plain):
        engine.load_adapter("a", str(lora))
    with fused._adapter_active("a"), plain._adapter_active("a"):
        adapted = logits(fused)
        assert torch.equal(adapted, logits(plain))
    with fused._adapter_active(None):
        assert not torch.equal(adapted, logits(fused))  # the adapter acted


@needs_step
def test_native_argmax_matches_torch_including_ties_infinities_and_nan() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 1000).bfloat16()
    logits[1, 10] = logits[1, 700] = 50.0  # a tie: the first index wins
    logits[2] = float("-inf")  # nothing finite: index 0
    logits[3, 999] = 80.0  # in the scalar tail (1000 = 62 x 16 + 8)
    logits[4, 5] = 90.0
    logits[4, 300] = float("nan")  # NaN wins over any number
    logits[5, 20] = float("inf")
    got = native_step.argmax_rows(logits)
    assert got is not None and got.tolist() == logits.float().argmax(dim=-1).tolist()
    assert got.tolist()[1:5] == [10, 0, 999, 300]
    assert native_step.argmax_rows(logits.float()) is None  # float32 logits: left to torch


@needs_step
@pytest.mark.parametrize(("rows", "queries", "positions", "dim"), [(3, 37, 61, 64), (2, 16, 16, 128), (1, 5, 40, 32)])
def test_prefill_attention_matches_sdpa_within_bfloat16_rounding(rows: int, queries: int, positions: int,
                                                                 dim: int) -> None:
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(rows * 100 + queries)
    kv_heads, group = 2, 3
    q = torch.randn(rows, queries, kv_heads * group, dim, generator=g).bfloat16().transpose(1, 2)  # strided view
    k = torch.randn(rows, kv_heads, positions + 7, dim, generator=g).bfloat16()[:, :, :positions]
    v = torch.randn(rows, kv_heads, positions + 7, dim, generator=g).bfloat16()[:, :, :positions]
    mask = torch.ones(rows, 1, queries, positions, dtype=torch.bool).tril(positions - queries)
    mask[:, :, :, :2] = False  # left padding of the keys
    mask[0, :, :3] = False  # queries that see nothing (padding)
    got = native_step.prefill_attention(q, k, v, mask, dim ** -0.5)
    assert got is not None and got.shape == (rows, queries, kv_heads * group, dim)
    want = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                          v.float().repeat_interleave(group, 1), attn_mask=mask).transpose(1, 2)
    want[0, :3] = 0.0  # a query that attends to nothing gets zeros
    assert torch.isfinite(got.float()).all()
    assert (got.float() - want).abs().max().item() < 0.02
    assert native_step.prefill_attention(q.float(), k, v, mask, 0.1) is None  # other dtypes: left to SDPA


@needs_step
def test_a_step_through_a_row_map_equals_a_step_on_the_compacted_cache(model_dir: Path) -> None:
    from trprompt.engines.hf import HFEngine, _preallocated_cache

    engine = HFEngine(str(model_dir), dtype="bfloat16")
    model, stepper = engine._base, engine._stepper
    assert stepper is not None and stepper.prepare()
    torch.manual_seed(3)
    ids = torch.randint(0, 40000, (5, 20))
    with torch.inference_mode():
        full = _preallocated_cache(model.config, 24)
        model(input_ids=ids, cache=full, use_cache=True)
        compact = copy.deepcopy(full)
        keep = torch.tensor([4, 1, 3])
        compact.batch_select_indices(keep)
        tokens, positions = torch.tensor([7, 8, 9]), torch.tensor([20, 20, 20])
        mask = torch.ones((3, 21), dtype=torch.long)
        mapped = stepper.step(tokens, positions, mask, full, keep)
        plain = stepper.step(tokens, positions, mask, compact)
    assert mapped is not None and plain is not None and torch.equal(mapped, plain)
    for a, b in zip(full.layers, compact.layers, strict=True):
        assert torch.equal(a.keys[keep], b.keys)  # the new position went to the mapped rows
    assert stepper.step(tokens, positions, mask, full, torch.tensor([0, 1, 9])) is None  # no such cache row


@needs_step
def test_an_unmasked_causal_prefill_takes_the_kernel_with_a_causal_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.functional as F

    from trprompt.engines import native_attention

    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 6, 21, 64, generator=g).bfloat16()
    k = torch.randn(2, 2, 21, 64, generator=g).bfloat16()
    v = torch.randn(2, 2, 21, 64, generator=g).bfloat16()
    seen = []
    real = native_step.prefill_attention
    monkeypatch.setattr(native_step, "prefill_attention", lambda *a: seen.append(a[3]) or real(*a))
    out, _ = native_attention.attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.125)
    assert seen and torch.equal(seen[0][0, 0], torch.ones(21, 21, dtype=torch.bool).tril())
    want = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(3, 1),
                                          v.float().repeat_interleave(3, 1), is_causal=True, scale=0.125)
    want = want.transpose(1, 2)
    assert out.shape == want.shape and (out.float() - want).abs().max().item() < 0.02


@needs_step
def test_a_deep_copy_of_a_fused_model_computes_with_its_own_weights(model_dir: Path) -> None:
    from trprompt.engines.hf import HFEngine

    engine = HFEngine(str(model_dir), dtype="bfloat16")
    twin = copy.deepcopy(engine._base)
    with torch.no_grad():
        for layer in twin.get_decoder().layers:
            layer.mlp.down_proj.weight.mul_(0.5)
    ids = torch.randint(0, 40000, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        mine, theirs = engine._base(input_ids=ids).logits, twin(input_ids=ids).logits
    assert twin.get_decoder().layers[0].forward.__self__ is twin.get_decoder().layers[0]
    assert not torch.equal(mine, theirs)  # the copy's forward reads the copy's (changed) weights


@needs_step
def test_a_batch_whose_native_step_gives_up_midway_finishes_on_pytorch_s_path(model_dir: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows already dropped through the row map: the cache is compacted to the live rows, the tokens stay the same."""
    from trprompt.engines.hf import HFEngine

    engine = HFEngine(str(model_dir), dtype="bfloat16", max_batch_size=8)
    reqs = _reqs(max_tokens=12)
    reqs[0] = ChatRequest(reqs[0].messages, SamplingParams(temperature=0.0, max_tokens=2))  # leaves early
    want = [r.texts for r in engine.generate(reqs)]
    real = engine._stepper.step
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) if len(calls) <= 4 else None  # gives up on the fifth step

    monkeypatch.setattr(engine._stepper, "step", flaky)
    before = dict(engine.stats)
    assert [r.texts for r in engine.generate(reqs)] == want
    native = engine.stats["native_steps"] - before["native_steps"]
    assert native == 4 and engine.stats["decode_steps"] - before["decode_steps"] > native
