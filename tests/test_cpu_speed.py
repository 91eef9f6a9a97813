"""CPU speed-ups of the transformers engine: prepacked bfloat16 linears, allocator tuning, batched head prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_engines_hf import QUESTIONS, chaotic_model_dir, feedback_requests, make_lora  # noqa: F401
from trprompt.engines import cpu_speed
from trprompt.engines.base import ChatRequest, SamplingParams
from trprompt.engines.cpu_speed import PackedLinear, pack_linears, packing_supported, tune_allocator

needs_packing = pytest.mark.skipif(not packing_supported(), reason="this torch build has no oneDNN weight packing")


def bf16_linear(bias: bool, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(96, 160, bias=bias).to(torch.bfloat16)


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (5, 1, 96), (3, 7, 96), (300, 96)])
def test_packed_linear_matches_f_linear(bias: bool, shape: tuple[int, ...]) -> None:
    lin = bf16_linear(bias)
    packed = PackedLinear(lin)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = torch.nn.functional.linear(x, lin.weight, lin.bias)
        got = packed(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    exact = torch.nn.functional.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
    # Within bfloat16 rounding of the float32 result, like F.linear itself.
    assert (got.float() - exact).abs().max() <= 2 * (want.float() - exact).abs().max() + 1e-2
    if not bias:
        assert torch.equal(got, want)  # same oneDNN kernel, same accumulation: bit-identical here


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
def test_both_one_row_paths_match_f_linear(bias: bool) -> None:
    lin = bf16_linear(bias, seed=3)
    packed = PackedLinear(lin)
    x = torch.randn(1, 1, 96, dtype=torch.bfloat16)
    exact = torch.nn.functional.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())
    with torch.inference_mode():
        want = torch.nn.functional.linear(x, lin.weight, lin.bias)
        for path in cpu_speed.ONE_ROW_PATHS:
            packed.one_row = path
            got = packed(x)
            assert got.shape == want.shape and got.dtype == torch.bfloat16
            assert (got.float() - exact).abs().max() <= 2 * (want.float() - exact).abs().max() + 1e-2, path


def test_one_row_path_is_the_faster_one_or_the_forced_one(monkeypatch) -> None:
    layers = [PackedLinear(bf16_linear(False))]
    times = {"mv": 2.0, "packed": 1.0}
    monkeypatch.setattr(cpu_speed, "_time_one_row", lambda ls, path, inputs, passes: times[path])
    monkeypatch.delenv(cpu_speed.ONE_ROW_ENV, raising=False)
    assert cpu_speed.choose_one_row_path(layers) == "packed"
    times.update(mv=1.0, packed=1.5)
    assert cpu_speed.choose_one_row_path(layers) == "mv"
    times.update(mv=1.0, packed=1.0)
    assert cpu_speed.choose_one_row_path(layers) == "mv"  # a tie keeps the default
    times.update(mv=9.0, packed=1.0)
    monkeypatch.setenv(cpu_speed.ONE_ROW_ENV, "mv")
    assert cpu_speed.choose_one_row_path(layers) == "mv"  # forced: no timing decides
    monkeypatch.setenv(cpu_speed.ONE_ROW_ENV, "fastest")
    with pytest.raises(ValueError, match="TRPROMPT_CPU_ONE_ROW"):
        cpu_speed.choose_one_row_path(layers)


@needs_packing
def test_timing_a_path_restores_each_layers_choice() -> None:
    layers = [PackedLinear(bf16_linear(False, seed=s)) for s in range(3)]
    layers[1].one_row = "packed"
    inputs = {96: torch.randn(1, 96, dtype=torch.bfloat16)}
    assert cpu_speed._time_one_row(layers, "packed", inputs, passes=2) > 0
    assert [layer.one_row for layer in layers] == ["mv", "packed", "mv"]


@needs_packing
def test_pack_linears_gives_every_packed_layer_the_chosen_path(chaotic_model_dir: Path, monkeypatch) -> None:  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(chaotic_model_dir), dtype=torch.bfloat16)
    monkeypatch.setenv(cpu_speed.ONE_ROW_ENV, "packed")
    n = pack_linears(model)
    paths = [m.one_row for m in model.modules() if isinstance(m, PackedLinear)]
    assert n == len(paths) > 0 and set(paths) == {"packed"}
    ids = torch.tensor([[7]])  # one row through every packed layer
    with torch.inference_mode():
        got = model(input_ids=ids).logits
        for m in model.modules():
            if isinstance(m, PackedLinear):
                m.one_row = "mv"
        want = model(input_ids=ids).logits
    assert torch.allclose(got.float(), want.float(), atol=0.1, rtol=0.05)


@needs_packing
def test_packed_linear_shares_the_weight_and_repacks_after_an_in_place_change() -> None:
    lin = bf16_linear(False)
    packed = PackedLinear(lin)
    assert packed.weight is lin.weight and packed.in_features == 96 and packed.out_features == 160
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        before = packed(x)
    with torch.no_grad():
        lin.weight.mul_(2)  # e.g. a merged adapter
    with torch.inference_mode():
        after = packed(x)
    assert torch.equal(after, torch.nn.functional.linear(x, lin.weight))
    assert not torch.equal(after, before)


@needs_packing
def test_packed_linear_falls_back_to_f_linear_for_training_float32_and_large_inputs(monkeypatch) -> None:
    lin = bf16_linear(True)
    packed = PackedLinear(lin)
    calls: list[str] = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(*args, **kwargs):
        calls.append("packed")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    x = torch.randn(8, 96, dtype=torch.bfloat16, requires_grad=True)
    y = packed(x)  # gradients wanted: F.linear, and backward works
    y.float().sum().backward()
    assert x.grad is not None and calls == []
    with torch.inference_mode():
        packed(torch.randn(PackedLinear.max_rows + 1, 96, dtype=torch.bfloat16))  # prefill-sized
        assert calls == []
        packed(torch.randn(8, 96, dtype=torch.bfloat16))
        assert calls == ["packed"]
    f32 = PackedLinear(torch.nn.Linear(96, 160))
    with torch.inference_mode():
        x32 = torch.randn(8, 96)
        assert torch.equal(f32(x32), torch.nn.functional.linear(x32, f32.weight, f32.bias)) and calls == ["packed"]


@needs_packing
def test_pack_linears_replaces_only_bfloat16_linears_and_keeps_tied_weights(chaotic_model_dir: Path) -> None:  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(chaotic_model_dir), dtype=torch.float32)
    assert pack_linears(model) == 0  # float32: nothing to gain
    model = model.to(torch.bfloat16)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
    assert pack_linears(model, max_bytes=1) == 0  # the copies would not fit: nothing packed
    assert pack_linears(model) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, want)


def test_tune_allocator_is_idempotent_and_can_be_turned_off(monkeypatch) -> None:
    import trprompt.engines.cpu_speed as cs

    monkeypatch.setattr(cs, "_tuned", None)
    monkeypatch.setenv(cs.MALLOC_ENV, "0")
    assert cs.tune_allocator() is False
    monkeypatch.setattr(cs, "_tuned", None)
    monkeypatch.delenv(cs.MALLOC_ENV)
    first = cs.tune_allocator()
    assert isinstance(first, bool) and cs.tune_allocator() is first
    if cs.sys.platform.startswith("linux"):
        assert first is True  # glibc accepts both settings
    monkeypatch.setattr(cs, "_tuned", None)
    assert tune_allocator() is first


def greedy_reqs(adapter: str | None = None) -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": q}], SamplingParams(temperature=0.0, max_tokens=6),
                        adapter=adapter) for q in QUESTIONS]


@needs_packing
def test_bfloat16_engine_packs_its_linears_and_keeps_greedy_tokens(chaotic_model_dir: Path, tmp_path: Path,  # noqa: F811
                                                                  monkeypatch) -> None:
    """Packed and unpacked bfloat16 engines decode the same greedy tokens, with and without a LoRA adapter."""
    from trprompt.engines.hf import PACK_ENV, HFEngine

    lora = make_lora(chaotic_model_dir, tmp_path / "lora", seed=3)
    packed = HFEngine(str(chaotic_model_dir), dtype="bfloat16", max_batch_size=16)
    monkeypatch.setenv(PACK_ENV, "0")
    plain = HFEngine(str(chaotic_model_dir), dtype="bfloat16", max_batch_size=16)
    assert packed.packed_linears > 0 and plain.packed_linears == 0
    assert not any(isinstance(m, PackedLinear) for m in plain._base.modules())
    for eng in (packed, plain):
        eng.load_adapter("a", str(lora))
    assert [r.texts for r in packed.generate(greedy_reqs())] == [r.texts for r in plain.generate(greedy_reqs())]
    with_adapter = packed.generate(greedy_reqs("a"))
    assert [r.texts for r in with_adapter] == [r.texts for r in plain.generate(greedy_reqs("a"))]
    assert [r.texts for r in with_adapter] != [r.texts for r in packed.generate(greedy_reqs())]  # the adapter acts
    packed.unload_adapter("a")  # back to the plain model: the packed layers stay
    assert sum(isinstance(m, PackedLinear) for m in packed._base.modules()) == packed.packed_linears


def test_heads_of_different_lengths_share_one_right_padded_prefill(chaotic_model_dir: Path) -> None:  # noqa: F811
    """Distinct heads are prefilled together (right-padded, no mask); greedy tokens equal per-head prefill."""
    import trprompt.engines.hf as hf

    eng = hf.HFEngine(str(chaotic_model_dir), max_batch_size=16, dtype="float32")
    rewards = ["Short feedback about the instruction. " * 2,
               "A much longer feedback text that says the instruction names every quantity, asks for one line per "
               "step and a final check of the number. " * 2]
    reqs = feedback_requests(rewards, QUESTIONS[1:])
    per_head = eng.generate(reqs)  # float32: batch_prefill off, a forward per head
    shapes: list[tuple[int, ...]] = []
    forward = eng._forward

    def spy(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    eng._forward = spy
    eng.batch_prefill, eng.prefill_padding = True, 10.0
    batched = eng.generate(reqs)
    prompts = [eng.render_prompt_ids(r.messages) for r in reqs]
    heads = sorted({h for h in hf._prefix_heads(prompts, eng.min_shared_prefix) if h})
    assert len(heads) == 2 and heads[0] < heads[1]  # two heads of different lengths
    assert shapes[0] == (2, heads[1])  # both in one forward, right-padded to the longer
    assert [r.texts for r in batched] == [r.texts for r in per_head]
    assert eng.stats["logit_rows"] > 0
