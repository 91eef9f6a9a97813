"""Paper configs: gpt-4o-mini as TextGrad's optimizer (key from the environment), all-local twins, and a
clear error naming the variable before any model loads when it is missing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from trprompt.config import ConfigError, check_api_keys, load_config

ROOT = Path(__file__).resolve().parent.parent
PAPER = ["paper-gsm8k", "paper-gsmhard", "paper-math"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_uses_gpt4o_mini_and_local_twin_differs_only_there(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    opt = cfg.models.optimizer_model
    assert opt is not None and (opt.model, opt.engine, opt.api_key_env) == ("gpt-4o-mini", "openai", "OPENAI_API_KEY")
    assert opt.base_url == "https://api.openai.com/v1" and opt.num_gpus == 0
    local = load_config(ROOT / "configs" / f"{name}-local.yaml")
    assert local.models.optimizer_model is None  # TextGrad's optimizer falls back to the local reward model
    assert local.run_dir == f"runs/{name}-local"
    a, b = dataclasses.asdict(cfg), dataclasses.asdict(local)
    for d in (a, b):
        d["models"].pop("optimizer_model")
        d.pop("run_dir")
    assert a == b


def test_check_api_keys_names_the_variable():
    cfg = load_config(ROOT / "configs" / "paper-gsmhard.yaml")
    with pytest.raises(ConfigError, match=r"models\.optimizer_model\.api_key_env: environment variable "
                                          r"OPENAI_API_KEY is not set"):
        check_api_keys(cfg.models, environ={})
    check_api_keys(cfg.models, environ={"OPENAI_API_KEY": "sk-test"})
    check_api_keys(load_config(ROOT / "configs" / "paper-gsmhard-local.yaml").models, environ={})


def _no_model_loads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model started loading before the API key was checked")

    import cluster.resources
    import trprompt.engines.model_store

    monkeypatch.setattr(trprompt.engines.model_store, "resolve_model", boom)
    monkeypatch.setattr(cluster.resources, "build_role_engines", boom)


def test_train_job_stops_before_any_model_loads_without_the_key(tmp_path, monkeypatch, capsys):
    import jobs.train as job

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    _no_model_loads(monkeypatch)
    rc = job.main(["--config", str(ROOT / "configs" / "paper-gsm8k.yaml"), "--run-dir", str(tmp_path / "run"),
                   "--local"])
    err = capsys.readouterr().err
    assert rc == 2 and "OPENAI_API_KEY is not set" in err and "models.optimizer_model" in err


def test_compare_job_stops_before_any_model_loads_without_the_key(tmp_path, monkeypatch, capsys):
    import jobs.compare as job

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    _no_model_loads(monkeypatch)
    run = yaml.safe_load((ROOT / "configs" / "paper-gsm8k.yaml").read_text())
    run["run_dir"] = str(tmp_path / "cmp")
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"run": run, "compare": {"methods": ["cot", "opro"]}}))
    rc = job.main(["--config", str(path), "--local", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "OPENAI_API_KEY is not set" in err
