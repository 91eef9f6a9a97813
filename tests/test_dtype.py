"""dtype auto: native-bfloat16 detection from /proc/cpuinfo, the float32 fallback, the logged and recorded choice."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from trprompt.config import SFTConfig, TRPromptConfig, dump_config, load_config
from trprompt.engines.dtype import (
    ENV_OVERRIDE,
    cpu_bf16_flags,
    cpu_has_native_bf16,
    resolve_config_dtypes,
    resolve_dtype,
)

SAPPHIRE = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
COOPER = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n"


@pytest.fixture
def cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV_OVERRIDE, raising=False)  # the test suite forces float32; detection is tested here

    def write(text: str) -> Path:
        p = tmp_path / "cpuinfo"
        p.write_text(text)
        return p

    return write


def test_detects_avx512_bf16_and_amx(cpuinfo) -> None:
    assert cpu_bf16_flags(cpuinfo(SAPPHIRE)) == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_flags(cpuinfo(COOPER)) == ["avx512_bf16"]
    assert cpu_bf16_flags(cpuinfo(SKYLAKE)) == []
    assert cpu_has_native_bf16(cpuinfo(COOPER)) and not cpu_has_native_bf16(cpuinfo(SKYLAKE))
    assert cpu_bf16_flags("/no/such/cpuinfo") == [] and not cpu_has_native_bf16("/no/such/cpuinfo")


def test_auto_resolves_per_cpu_and_falls_back_to_float32(cpuinfo, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trprompt.engines.dtype"):
        assert resolve_dtype("auto", "cpu", who="eng", cpuinfo=cpuinfo(SAPPHIRE)) == "bfloat16"
        assert "eng: dtype auto -> bfloat16 on CPU" in caplog.text and "amx_bf16" in caplog.text
        caplog.clear()
        assert resolve_dtype("auto", torch.device("cpu"), who="eng", cpuinfo=cpuinfo(SKYLAKE)) == "float32"
        assert "eng: dtype auto -> float32 on CPU: the CPU has no native bfloat16" in caplog.text
    assert resolve_dtype("auto", "cpu", cpuinfo="/no/such/cpuinfo") == "float32"
    # explicit choices pass through; other devices keep their own meaning of auto
    assert resolve_dtype("float32", "cpu", cpuinfo=cpuinfo(SAPPHIRE)) == "float32"
    assert resolve_dtype("bfloat16", "cpu", cpuinfo=cpuinfo(SKYLAKE)) == "bfloat16"
    assert resolve_dtype("auto", "cuda:0", cpuinfo=cpuinfo(SKYLAKE)) == "auto"
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8")


def test_env_override(cpuinfo, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(ENV_OVERRIDE, "0")
    with caplog.at_level(logging.INFO, logger="trprompt.engines.dtype"):
        assert resolve_dtype("auto", "cpu", cpuinfo=cpuinfo(SAPPHIRE)) == "float32"
    assert f"{ENV_OVERRIDE}=0" in caplog.text
    monkeypatch.setenv(ENV_OVERRIDE, "1")
    assert resolve_dtype("auto", "cpu", cpuinfo=cpuinfo(SKYLAKE)) == "bfloat16"


def test_hf_engine_loads_the_resolved_dtype(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from trprompt.engines.hf import HFEngine

    monkeypatch.setenv(ENV_OVERRIDE, "1")
    with caplog.at_level(logging.INFO, logger="trprompt.engines.dtype"):
        eng = HFEngine(str(tiny_model_dir))
    assert eng.dtype_name == "bfloat16" and next(eng._base.parameters()).dtype == torch.bfloat16
    assert "dtype auto -> bfloat16" in caplog.text
    monkeypatch.setenv(ENV_OVERRIDE, "0")
    eng = HFEngine(str(tiny_model_dir))
    assert eng.dtype_name == "float32" and next(eng._base.parameters()).dtype == torch.float32
    eng = HFEngine(str(tiny_model_dir), dtype="bfloat16")
    assert eng.dtype_name == "bfloat16"


def test_resolved_dtype_goes_into_the_run_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_OVERRIDE, "1")
    cfg = TRPromptConfig()
    cfg.models.reward_model.dtype = "float32"
    cfg.models.target_model.num_gpus = 1.0
    resolve_config_dtypes([cfg.models.prompt_model, cfg.models.target_model, cfg.models.reward_model, None], cfg.sft)
    assert cfg.models.prompt_model.resolved_dtype == "bfloat16"
    assert cfg.models.reward_model.resolved_dtype == "float32"
    assert cfg.models.target_model.resolved_dtype == "auto"  # a GPU: the checkpoint's dtype, as before
    assert cfg.sft.resolved_dtype == "bfloat16"
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert "resolved_dtype: bfloat16" in path.read_text()
    again = load_config(path)  # a run's config still loads
    assert again.models.prompt_model.resolved_dtype == "bfloat16" and again.sft.dtype == "auto"


def test_sft_resolves_auto_the_same_way(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    from trprompt.sft import SFTExample, train_lora
    from trprompt.templates import Templates

    cfg = SFTConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, epochs=1, batch_size=2, max_length=128)
    examples = [SFTExample("What is 2+3?", "Good.", "Add the two numbers.")] * 2
    monkeypatch.setenv(ENV_OVERRIDE, "1")
    with caplog.at_level(logging.INFO, logger="trprompt.engines.dtype"):
        m = train_lora(examples, tiny_model_dir, tmp_path / "bf16", cfg, Templates())
    assert m["dtype"] == "bfloat16" and "LoRA SFT: dtype auto -> bfloat16" in caplog.text
    assert m["first_loss"] == m["first_loss"]  # not NaN
    monkeypatch.setenv(ENV_OVERRIDE, "0")
    assert train_lora(examples, tiny_model_dir, tmp_path / "fp32", cfg, Templates())["dtype"] == "float32"
