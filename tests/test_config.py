from pathlib import Path

import pytest
import yaml

from trprompt.config import ConfigError, TRPromptConfig, config_from_dict, dump_config, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_papers():
    cfg = TRPromptConfig().validate()
    assert cfg.loop.iterations == 4 and cfg.loop.synthetic_size == 800
    assert cfg.sft.lora_r == 256 and cfg.sft.lora_alpha == 256 and cfg.sft.epochs == 2
    assert cfg.sft.learning_rate == 2e-5 and cfg.sft.lr_schedule == "linear"
    assert cfg.reward_search.steps == 10
    assert cfg.generation.prompt_temperature == 0.9
    assert cfg.dataset.val_fraction == 0.1


@pytest.mark.parametrize(
    "data, field",
    [
        ({"loop": {"iterations": 0}}, "loop.iterations"),
        ({"loop": {"iterations": "two"}}, "loop.iterations"),
        ({"sft": {"lora_r": -1}}, "sft.lora_r"),
        ({"sft": {"learning_rate": 3}}, "sft.learning_rate"),
        ({"sft": {"lr_schedule": "exp"}}, "sft.lr_schedule"),
        ({"sft": {"threads": 0}}, "sft.threads"),
        ({"dataset": {"name": "imagenet"}}, "dataset.name"),
        ({"dataset": {"val_fraction": 1.5}}, "dataset.val_fraction"),
        ({"models": {"target_model": {"engine": "openai"}}}, "models.target_model.base_url"),
        ({"models": {"prompt_model": {"engine": "tpu"}}}, "models.prompt_model.engine"),
        ({"models": {"reward_model": {"num_actors": 0}}}, "models.reward_model.num_actors"),
        ({"generation": {"prompt_temperature": 9}}, "generation.prompt_temperature"),
        ({"reward_search": {"candidates_per_step": 0}}, "reward_search.candidates_per_step"),
        ({"eval": {"baselines": ["magic"]}}, "eval.baselines"),
        ({"sft": {"lora_rank": 8}}, "lora_rank"),
        ({"bogus": 1}, "bogus"),
        ({"budget": {"max_tokens": 0}}, "budget.max_tokens"),
        ({"templates_file": "/no/such/file.yaml"}, "templates_file"),
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert field in str(e.value)


def test_prompt_model_cannot_be_remote():
    with pytest.raises(ConfigError, match="prompt_model.engine"):
        config_from_dict({"models": {"prompt_model": {"engine": "openai", "base_url": "http://127.0.0.1:1"}}})


def test_yaml_roundtrip_and_overrides(tmp_path):
    cfg = config_from_dict({"loop": {"iterations": 2}, "sft": {"lora_r": 8}})
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p, ["loop.synthetic_size=12", "reward_search.steps=0"])
    assert again.loop.iterations == 2 and again.sft.lora_r == 8
    assert again.loop.synthetic_size == 12 and again.reward_search.steps == 0
    assert again.hash() != cfg.hash()
    assert load_config(p).hash() == cfg.hash()


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loop: [unclosed")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="a.b.c=value"):
        load_config(tmp_path / "bad.yaml" if False else _write(tmp_path), ["no_equals_sign"])


def _write(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("seed: 1\n")
    return p


def test_shipped_configs_load():
    names = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert "cpu-demo.yaml" in names
    for p in (ROOT / "configs").glob("*.yaml"):
        raw = yaml.safe_load(p.read_text())
        if isinstance(raw, dict) and ("sweep" in raw or "compare" in raw):
            continue  # sweep and compare configs wrap a run config; tested with their jobs
        cfg = load_config(p)
        assert cfg.run_dir


def test_default_sections_are_not_shared_between_configs():
    """Nested default sections are copies: changing one config's model never changes another's."""
    from trprompt.config import TRPromptConfig

    a, b = TRPromptConfig(), TRPromptConfig()
    a.models.prompt_model.resolved_dtype = "bfloat16"
    a.models.target_model.num_gpus = 1.0
    a.eval.baselines.append("extra")
    assert b.models.prompt_model.resolved_dtype is None and b.models.target_model.num_gpus == 0
    assert TRPromptConfig().models.prompt_model.resolved_dtype is None
    assert "extra" not in TRPromptConfig().eval.baselines
    assert a.models.prompt_model is not a.models.target_model
