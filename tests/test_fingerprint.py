"""Fingerprints: stable, sensitive to every input, and able to name what changed."""

from __future__ import annotations

from trprompt.config import config_from_dict
from trprompt.fingerprint import (
    GRADER_VERSION_FALLBACK,
    canonical_json,
    changed_fields,
    config_fields,
    dir_digest,
    fingerprint,
    grader_version,
    model_identity,
)


def test_fingerprint_is_order_independent_and_sensitive():
    a = {"dataset.name": "gsm8k", "seed": 0, "nested": {"x": 1, "y": [1, 2]}}
    b = {"nested": {"y": [1, 2], "x": 1}, "seed": 0, "dataset.name": "gsm8k"}
    assert fingerprint(a) == fingerprint(b) and len(fingerprint(a)) == 16
    assert fingerprint({**a, "seed": 1}) != fingerprint(a)
    assert canonical_json({"b": 1, "a": 2}) == '{"a":2,"b":1}'


def test_changed_fields_names_added_removed_and_changed():
    old = {"seed": 0, "dataset.test_limit": 5, "gone": 1}
    new = {"seed": 0, "dataset.test_limit": 7, "added": 2}
    assert changed_fields(old, new) == ["added", "dataset.test_limit", "gone"]
    assert changed_fields(None, {"a": 1}) == ["a"]
    assert changed_fields(new, dict(new)) == []


def test_config_fields_and_model_identity():
    cfg = config_from_dict({"dataset": {"name": "svamp", "test_limit": 3}, "seed": 4})
    got = config_fields(cfg, "dataset.name", "dataset.test_limit", "seed", "loop")
    assert got["dataset.name"] == "svamp" and got["dataset.test_limit"] == 3 and got["seed"] == 4
    assert got["loop"]["iterations"] == cfg.loop.iterations
    ident = model_identity(cfg.models.prompt_model, "prompt_model")
    assert ident == {"prompt_model.model": "smollm2-135m-instruct", "prompt_model.engine": "hf",
                     "prompt_model.dtype": "float32", "prompt_model.base_url": None}  # auto, TRPROMPT_CPU_BF16=0
    # placement settings are not part of a model's identity
    cfg.models.prompt_model.num_actors = 3
    assert model_identity(cfg.models.prompt_model, "prompt_model") == ident


def test_grader_version_and_dir_digest(tmp_path):
    assert isinstance(grader_version(), str) and grader_version()
    assert GRADER_VERSION_FALLBACK
    (tmp_path / "w.bin").write_bytes(b"abc")
    d1 = dir_digest(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"abd")
    assert dir_digest(tmp_path) != d1


def test_dtype_auto_is_fingerprinted_as_what_it_resolves_to(monkeypatch):
    from trprompt.config import ModelConfig, TRPromptConfig
    from trprompt.experiments.fingerprints import models_inputs, sft_inputs
    from trprompt.fingerprint import effective_dtype, model_identity

    hf = ModelConfig(model="smollm2-135m-instruct", engine="hf", dtype="auto")
    monkeypatch.setenv("TRPROMPT_CPU_BF16", "1")
    assert model_identity(hf, "m")["m.dtype"] == "bfloat16"
    assert model_identity(hf, "m") == model_identity(ModelConfig(model=hf.model, engine="hf", dtype="bfloat16"), "m")
    run = TRPromptConfig()
    bf16 = (models_inputs(run), sft_inputs(run))
    monkeypatch.setenv("TRPROMPT_CPU_BF16", "0")
    assert model_identity(hf, "m")["m.dtype"] == "float32"
    fp32 = (models_inputs(run), sft_inputs(run))
    assert bf16[1]["sft"]["dtype"] == "bfloat16" and fp32[1]["sft"]["dtype"] == "float32"
    assert run.models.prompt_model.engine == "hf" and bf16[0] != fp32[0]
    # a recorded resolution wins; non-HF engines and GPUs keep "auto"
    assert effective_dtype(ModelConfig(model="x", engine="hf", dtype="auto", resolved_dtype="bfloat16")) == "bfloat16"
    assert effective_dtype(ModelConfig(model="x", engine="vllm", dtype="auto")) == "auto"
    assert effective_dtype(ModelConfig(model="x", engine="hf", dtype="auto", num_gpus=1)) == "auto"
