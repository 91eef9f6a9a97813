"""CPU speed-ups of the transformers engine: prepacked bfloat16 linears, allocator tuning, batched head prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_engines_hf import QUESTIONS, chaotic_model_dir, feedback_requests, make_lora  # noqa: F401
from trprompt.engines import cpu_speed
from trprompt.engines.base import ChatRequest, SamplingParams
from trprompt.engines.cpu_speed import PackedLinear, pack_linears, packing_supported, tune_allocator

needs_packing = pytest.mark.skipif(not packing_supported(torch.bfloat16),
                                   reason="this torch build or CPU cannot prepack bfloat16 weights for oneDNN")
needs_f32_packing = pytest.mark.skipif(not packing_supported(torch.float32),
                                       reason="this torch build cannot prepack float32 weights for oneDNN")


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
@needs_f32_packing
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
    with torch.inference_mode():
        x32 = torch.randn(8, 96)  # not the weight's dtype: F.linear (which promotes or raises as usual)
        with pytest.raises(RuntimeError):
            packed(x32)
        assert calls == ["packed"]
    f32 = PackedLinear(torch.nn.Linear(96, 160))
    with torch.inference_mode():
        f32(torch.randn(PackedLinear.max_rows_float32 + 1, 96))  # float32 has its own, larger limit
        assert calls == ["packed"]
        f32(torch.randn(PackedLinear.max_rows + 1, 96))
        assert calls == ["packed", "packed"]


@needs_packing
def test_pack_linears_replaces_bfloat16_linears_and_keeps_tied_weights(chaotic_model_dir: Path) -> None:  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(chaotic_model_dir), dtype=torch.float32)
    assert pack_linears(model, float32="never") == 0  # float32 left to F.linear when asked
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
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


@needs_f32_packing
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (5, 1, 96), (3, 7, 96), (300, 96)])
def test_float32_packed_linear_matches_f_linear_within_float32_rounding(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 160, bias=bias)
    packed = PackedLinear(lin)
    x = torch.randn(*shape)
    exact = torch.nn.functional.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    with torch.inference_mode():
        for path in cpu_speed.ONE_ROW_PATHS:
            packed.one_row = path
            got = packed(x)
            assert got.shape == exact.shape and got.dtype == torch.float32
            assert (got.double() - exact).abs().max() < 1e-5, path  # float32 rounding, not bfloat16's 1e-2


def float32_model(chaotic_model_dir: Path) -> torch.nn.Module:  # noqa: F811
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(chaotic_model_dir), dtype=torch.float32)


@needs_f32_packing
def test_float32_packing_follows_the_timing_and_puts_plain_layers_back(chaotic_model_dir: Path,  # noqa: F811
                                                                      monkeypatch) -> None:
    linears = sum(type(m) is torch.nn.Linear for m in float32_model(chaotic_model_dir).modules())
    for pays in (False, True):
        model = float32_model(chaotic_model_dir)
        ids = torch.tensor([[1, 5, 9, 200, 31]])
        with torch.inference_mode():
            want = model(input_ids=ids).logits
        monkeypatch.setattr(cpu_speed, "float32_packing_pays", lambda layers, pays=pays: pays)
        assert pack_linears(model) == (linears if pays else 0)
        assert sum(isinstance(m, PackedLinear) for m in model.modules()) == (linears if pays else 0)
        assert sum(type(m) is torch.nn.Linear for m in model.modules()) == (0 if pays else linears)
        with torch.inference_mode():
            assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-4, rtol=1e-5)
    model = float32_model(chaotic_model_dir)
    monkeypatch.setattr(cpu_speed, "float32_packing_pays", lambda layers: pytest.fail("timed when forced"))
    assert pack_linears(model, float32="always") == linears
    with pytest.raises(ValueError, match="float32"):
        pack_linears(model, float32="sometimes")


@needs_f32_packing
def test_a_remembered_no_skips_the_float32_copies_on_the_next_load(chaotic_model_dir: Path,  # noqa: F811
                                                                  monkeypatch) -> None:
    """A second engine in the same process does not pack, time and unpack float32 weights again."""
    linears = sum(type(m) is torch.nn.Linear for m in float32_model(chaotic_model_dir).modules())
    packs: list[int] = []
    real_pack = PackedLinear._pack
    monkeypatch.setattr(PackedLinear, "_pack", lambda self: packs.append(1) or real_pack(self))
    monkeypatch.setattr(cpu_speed, "_float32_choice", {})
    monkeypatch.setattr(cpu_speed, "_time_pass", lambda layers, inputs, packed: 1.0 if packed else 0.5)
    assert pack_linears(float32_model(chaotic_model_dir)) == 0  # timed: the packed kernel is slower
    assert len(packs) >= linears and list(cpu_speed._float32_choice.values()) == [False]
    packs.clear()
    monkeypatch.setattr(cpu_speed, "_time_pass", lambda *a, **k: pytest.fail("timed again"))
    model = float32_model(chaotic_model_dir)
    assert pack_linears(model) == 0 and packs == []  # remembered: no packed copies at all
    assert sum(type(m) is torch.nn.Linear for m in model.modules()) == linears
    cpu_speed._float32_choice[next(iter(cpu_speed._float32_choice))] = True
    assert pack_linears(float32_model(chaotic_model_dir)) == linears  # a remembered yes packs, untimed
    assert pack_linears(float32_model(chaotic_model_dir), float32="never") == 0


def test_float32_packing_pays_only_when_clearly_faster_and_remembers_the_answer(monkeypatch) -> None:
    layers = [PackedLinear(torch.nn.Linear(96, 160, bias=False)), PackedLinear(torch.nn.Linear(160, 96))]
    times = {True: 0.90, False: 1.0}
    timed: list[bool] = []

    def fake(ls, inputs, packed):
        timed.append(packed)
        assert {x.dtype for x in inputs.values()} == {torch.float32} and set(inputs) == {96, 160}
        assert len({x.shape[0] for x in inputs.values()}) == 1  # one batch size: the rows asked for
        return times[packed]

    monkeypatch.setattr(cpu_speed, "_time_pass", fake)
    monkeypatch.setattr(cpu_speed, "_float32_choice", {})
    assert cpu_speed.float32_packing_pays(layers, rows=4) is True  # 10 % faster
    assert True in timed and False in timed
    n = len(timed)
    times[True] = 5.0
    assert cpu_speed.float32_packing_pays(layers, rows=4) is True and len(timed) == n  # kept for this process
    times[True] = 0.97  # 3 % faster: not worth a second copy of the weights
    assert cpu_speed.float32_packing_pays(layers, rows=5) is False and len(timed) > n  # other rows: timed anew


def test_no_bfloat16_packing_on_a_cpu_without_it_and_the_engine_still_loads(chaotic_model_dir: Path,  # noqa: F811
                                                                             monkeypatch) -> None:
    """oneDNN refuses to pack bfloat16 weights on AVX2-only CPUs: nothing is packed, nothing fails."""
    from trprompt.engines.hf import HFEngine

    def refuse(weight, *args):
        if weight.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")
        return real(weight, *args)

    real = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(cpu_speed, "_packing_works", {})
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    assert cpu_speed.packing_supported(torch.bfloat16) is False
    assert cpu_speed._packing_works[torch.bfloat16] is False  # tried once per process
    model = float32_model(chaotic_model_dir).to(torch.bfloat16)
    assert pack_linears(model) == 0 and not any(isinstance(m, PackedLinear) for m in model.modules())
    eng = HFEngine(str(chaotic_model_dir), dtype="bfloat16", max_batch_size=8)
    assert eng.packed_linears == 0 and eng.batch_prefill is True
    assert all(r.completion_tokens == 6 or r.finish_reasons == ["stop"] for r in eng.generate(greedy_reqs()))


def test_pack_mode_reads_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(cpu_speed.PACK_ENV, raising=False)
    assert cpu_speed.pack_mode() == "auto"
    for mode, float32 in (("1", "always"), ("bfloat16", "never"), ("auto", "auto"), (" BFloat16 ", "never")):
        monkeypatch.setenv(cpu_speed.PACK_ENV, mode)
        assert cpu_speed.float32_packing(cpu_speed.pack_mode()) == float32
    monkeypatch.setenv(cpu_speed.PACK_ENV, "0")
    assert cpu_speed.pack_mode() == "0"
    monkeypatch.setenv(cpu_speed.PACK_ENV, "yes")
    with pytest.raises(ValueError, match="TRPROMPT_CPU_PACK"):
        cpu_speed.pack_mode()


@needs_f32_packing
def test_float32_engine_with_packed_weights_batches_prefill_and_keeps_greedy_tokens(chaotic_model_dir: Path,  # noqa: F811
                                                                                   monkeypatch) -> None:
    from trprompt.engines.cpu_speed import PACK_ENV
    from trprompt.engines.hf import HFEngine

    monkeypatch.setenv(PACK_ENV, "bfloat16")
    plain = HFEngine(str(chaotic_model_dir), dtype="float32", max_batch_size=16)
    monkeypatch.setenv(PACK_ENV, "1")
    packed = HFEngine(str(chaotic_model_dir), dtype="float32", max_batch_size=16)
    assert plain.packed_linears == 0 and plain.batch_prefill is False  # sgemm: one row at a time
    assert packed.packed_linears > 0 and packed.batch_prefill is True
    assert all(m.weight.dtype == torch.float32 for m in packed._base.modules() if isinstance(m, PackedLinear))
    rewards = ["The instruction names every quantity and asks for a final check. " * 3,
               "The instruction is one short sentence that restates the question. " * 3]
    reqs = [*feedback_requests(rewards, QUESTIONS[1:]), *greedy_reqs()]
    got = packed.generate(reqs)
    want = plain.generate(reqs)
    assert packed.stats["prefill_calls"] < plain.stats["prefill_calls"]  # padded batches: fewer forwards
    assert [r.texts for r in got] == [r.texts for r in want]


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
    from trprompt.engines.cpu_speed import PACK_ENV
    from trprompt.engines.hf import HFEngine

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
