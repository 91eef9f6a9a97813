"""The native AMX linear kernel: agreement with F.linear, the packed layers' use of it, fallbacks, the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trprompt.engines import amx_linear, native
from trprompt.engines.cpu_speed import PackedLinear, pack_linears, packing_supported

runs_here = (amx_linear.mode() != "0" and amx_linear.cpu_supported() and native.find_compiler() is not None
             and amx_linear.load() is not None)
needs_amx = pytest.mark.skipif(not runs_here, reason="needs AMX, Linux 5.16+ and a C compiler")


def _exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@needs_amx
@pytest.mark.parametrize("shape", [(16, 32), (48, 64), (192, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 3, 15, 16, 17, 29, 32, 33, 48, 49, 64])
def test_kernel_matches_f_linear_within_bfloat16_rounding(shape: tuple[int, int], rows: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + shape[0])
    w = torch.randn(*shape, generator=g).bfloat16()
    b = torch.randn(shape[0], generator=g).bfloat16()
    x = torch.randn(rows, shape[1], generator=g).bfloat16()
    packed = amx_linear.pack(w)
    for bias in (None, b):
        got = amx_linear.linear(x, packed, shape[0], bias)
        exact = _exact(x, w, bias)
        ref_err = (F.linear(x, w, bias).float() - exact).abs()
        assert got.shape == (rows, shape[0]) and got.dtype == torch.bfloat16
        # float32 sums rounded once: within bfloat16's half-ulp of the exact product (F.linear: the same or worse)
        assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-3).all()
        assert (got.float() - exact).abs().max() <= ref_err.max() * 1.01 + 1e-3


@needs_amx
def test_every_row_and_column_lands_in_its_place() -> None:
    """One-hot inputs pick single weight columns: any mix-up of rows, tiles or threads shows as a wrong entry."""
    n, k, rows = 64, 96, 40
    w = (torch.arange(n * k, dtype=torch.float32).reshape(n, k) % 251 - 125).bfloat16()  # exact in bfloat16
    x = torch.zeros(rows, k, dtype=torch.bfloat16)
    for r in range(rows):
        x[r, (r * 7) % k] = 1.0
    got = amx_linear.linear(x, amx_linear.pack(w), n)
    assert torch.equal(got, w[:, [(r * 7) % k for r in range(rows)]].T.contiguous())


@needs_amx
def test_results_do_not_depend_on_the_thread_count() -> None:
    """Each output column is summed by one thread in one order: 1 and 2 threads give identical bits."""
    w = torch.randn(320, 576).bfloat16()
    x = torch.randn(29, 576).bfloat16()
    packed = amx_linear.pack(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = amx_linear.linear(x, packed, 320)
        torch.set_num_threads(2)
        two = amx_linear.linear(x, packed, 320)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_amx
def test_inputs_it_does_not_take_are_refused() -> None:
    assert not amx_linear.takes(torch.zeros(20, 64, dtype=torch.bfloat16))  # 20 outputs: not a multiple of 16
    assert not amx_linear.takes(torch.zeros(16, 48, dtype=torch.bfloat16))  # 48 inputs: not a multiple of 32
    assert not amx_linear.takes(torch.zeros(16, 64))  # float32
    with pytest.raises(ValueError):
        amx_linear.pack(torch.zeros(20, 64, dtype=torch.bfloat16))
    packed = amx_linear.pack(torch.zeros(16, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        amx_linear.linear(torch.zeros(amx_linear.MAX_ROWS + 1, 64, dtype=torch.bfloat16), packed, 16)
    with pytest.raises(ValueError):
        amx_linear.linear(torch.zeros(2, 64), packed, 16)


@needs_amx
def test_packed_linear_routes_small_inputs_to_the_kernel_and_repacks(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    layer = PackedLinear(lin)
    layer.amx_rows = amx_linear.MAX_ROWS
    calls: list[int] = []
    real = amx_linear.linear

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(amx_linear, "linear", spy)
    with torch.inference_mode():
        x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
        y = layer(x)
        assert y.shape == (3, 5, 48) and calls == [15]
        exact = _exact(x, lin.weight, lin.bias)
        assert (y.float() - exact).abs().max() <= (F.linear(x, lin.weight, lin.bias).float() - exact).abs().max() + 1e-3
        layer(torch.randn(amx_linear.MAX_ROWS + 1, 64, dtype=torch.bfloat16))  # larger: oneDNN (or F.linear)
        assert calls == [15]
        assert layer._packed is None or packing_supported(torch.bfloat16)
    with torch.no_grad():
        lin.weight.mul_(-1)  # changed in place (a merged adapter): the kernel's copy follows
    with torch.inference_mode():
        x = torch.randn(4, 64, dtype=torch.bfloat16)
        after = layer(x)
    assert ((after.float() - _exact(x, lin.weight, lin.bias)).abs()
            <= _exact(x, lin.weight, lin.bias).abs() * 2**-8 + 1e-3).all()


@needs_amx
def test_pack_linears_gives_amx_copies_to_the_shapes_it_takes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 24)).to(torch.bfloat16)
    assert pack_linears(model) == 2
    assert model[0].amx_rows == amx_linear.MAX_ROWS and model[0]._amx is not None and model[0]._packed is None
    assert model[1].amx_rows == 0 and model[1]._amx is None  # 24 outputs: oneDNN's copy
    with torch.inference_mode():
        x = torch.randn(7, 64, dtype=torch.bfloat16)
        want = F.linear(F.linear(x, model[0].weight).float().bfloat16(), model[1].weight, model[1].bias)
        assert (model(x).float() - want.float()).abs().max() < 0.1


def test_setting_turns_it_off_and_rejects_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(amx_linear.ENV, "0")
    assert amx_linear.load() is None
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(torch.bfloat16)
    if packing_supported(torch.bfloat16):
        assert pack_linears(model) == 1 and model[0].amx_rows == 0
    monkeypatch.setenv(amx_linear.ENV, "fast")
    with pytest.raises(ValueError, match=amx_linear.ENV):
        amx_linear.load()


def test_no_amx_flag_means_no_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu avx512f avx512bw avx512vl avx512_bf16\n")
    assert not amx_linear.cpu_supported(str(info))
    info.write_text("flags\t\t: fpu avx512f avx512bw avx512vl avx512_bf16 amx_tile amx_bf16\n")
    assert amx_linear.cpu_supported(str(info))


@needs_amx
def test_a_bfloat16_engine_decodes_the_same_greedy_tokens_with_and_without_it(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    from trprompt.engines.base import ChatRequest, SamplingParams
    from trprompt.engines.hf import HFEngine
    from trprompt.testing import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path_factory.mktemp("tiny-amx") / "tiny-llama-256", hidden_size=256)
    questions = ["What is 2 + 3?", "Name a prime number.", "Why is the sky blue?", "Count to five."]
    reqs = [ChatRequest([{"role": "user", "content": q}], SamplingParams(temperature=0.0, max_tokens=8))
            for q in questions]
    engine = HFEngine(str(model_dir), dtype="bfloat16", max_batch_size=8)
    layers = [m for m in engine._base.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.amx_rows == amx_linear.MAX_ROWS for m in layers if amx_linear.takes(m.weight))
    assert any(m.amx_rows for m in layers)
    monkeypatch.setenv(amx_linear.ENV, "0")
    plain = HFEngine(str(model_dir), dtype="bfloat16", max_batch_size=8)
    assert not any(m.amx_rows for m in plain._base.modules() if isinstance(m, PackedLinear))
    assert [r.texts for r in engine.generate(reqs)] == [r.texts for r in plain.generate(reqs)]


@needs_amx
def test_a_new_weight_tensor_or_a_cast_layer_is_never_served_a_stale_copy() -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False)).to(torch.bfloat16)
    pack_linears(model)
    layer = model[0]
    assert layer.amx_rows
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    new = torch.randn(32, 64, dtype=torch.bfloat16)
    layer.weight = torch.nn.Parameter(new, requires_grad=False)  # a new tensor (version 0 again), not in place
    with torch.inference_mode():
        got = layer(x)
    assert ((got.float() - _exact(x, new, None)).abs() <= _exact(x, new, None).abs() * 2**-8 + 1e-3).all()
    model.float()  # cast after packing: float32 weights must not reach the bfloat16 kernel
    with torch.inference_mode():
        assert torch.allclose(layer(x.float()), F.linear(x.float(), layer.weight), atol=1e-4)
