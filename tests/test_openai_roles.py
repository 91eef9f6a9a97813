"""The frozen roles (target, reward, TextGrad optimizer) on any OpenAI-compatible endpoint, Π local.

A tiny deterministic OpenAI-compatible server (``tests/fake_openai.py``, FastAPI + uvicorn on
127.0.0.1) plays the three frozen roles; Π is a local engine (the echo engine standing in for the
LoRA model, as in ``tests/test_loop.py``). The engines are built from the config by the same code the
jobs use (``cluster.resources.build_role_engines`` -> ``trprompt.engines.factory.build_engine``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fake_openai import FakeOpenAIServer

from trprompt.config import ConfigError, config_from_dict, load_config
from trprompt.engines.base import ChatRequest
from trprompt.engines.echo import EchoEngine


def frozen_roles(messages: list[dict[str, Any]]) -> str:
    """Target, reward model and optimizer, told apart by the chat they get."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    user = messages[-1]["content"]
    if system.startswith("You review instructions"):
        return "The instruction was vague; it should mention the magic word."
    if "IMPROVED_VARIABLE" in user or "IMPROVED_VARIABLE" in system:
        return "<IMPROVED_VARIABLE>An ideal instruction uses the magic word.</IMPROVED_VARIABLE>"
    if len(messages) == 1:  # the target: right only with the helpful instruction
        return "The answer is 42." if "magic word" in user else "I think it is 7."
    return "Mention the magic word."


def prompt_model(request: ChatRequest) -> str:
    """Π: writes the helpful instruction only under an optimal reward that asks for it (TextGrad must find it)."""
    return "Use the magic word." if "magic word" in request.messages[-1]["content"] else "Just guess."


class FakeSFT:
    def __call__(self, examples, base_model, out_dir, cfg, templates, init_adapter=None, seed=0):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "adapter_config.json").write_text("{}")
        return {"examples": len(examples), "final_loss": 1.0}


def _task_file(tmp_path: Path) -> Path:
    f = tmp_path / "answers.jsonl"
    f.write_text("".join(json.dumps({"question": f"Question {i}: what is the secret number?", "answer": "42",
                                     "explanation": "It is always 42."}) + "\n" for i in range(40))
                 + json.dumps({"question": "A row without an answer?"}) + "\n")  # dropped: skip_bad_rows
    return f


def _cfg(tmp_path: Path, base_url: str) -> Any:
    frozen = {"engine": "openai", "base_url": base_url, "max_batch_size": 4, "timeout_s": 20, "max_retries": 1}
    return config_from_dict({
        "run_dir": str(tmp_path / "run"),
        "dataset": {"name": str(_task_file(tmp_path)), "fields": {"solution": "explanation"}, "test_size": 8,
                    "skip_bad_rows": True,
                    "val_limit": 6, "test_limit": 4},
        "task": {"description": "Name the secret number. A correct answer is that number.", "grader": "numeric"},
        "models": {
            "prompt_model": {"model": "local-pi", "engine": "echo"},
            "target_model": {"model": "target-llm", **frozen},
            "reward_model": {"model": "reward-llm", **frozen},
            "optimizer_model": {"model": "optimizer-llm", **frozen},
        },
        "loop": {"iterations": 1, "synthetic_size": 6},
        "reward_search": {"steps": 1, "candidates_per_step": 2, "val_questions": 4},
        "generation": {"batch_size": 4},
    })


def test_prompt_model_cannot_be_openai(tmp_path):
    with pytest.raises(ConfigError, match="prompt_model.engine cannot be 'openai'"):
        config_from_dict({"models": {"prompt_model": {"engine": "openai", "base_url": "http://127.0.0.1:1/v1"}}})


def test_loop_with_target_reward_and_optimizer_on_an_openai_endpoint(tmp_path, monkeypatch):
    from cluster.resources import build_role_engines
    from trprompt.engines.factory import build_engine
    from trprompt.loop import TRPromptTrainer

    monkeypatch.setenv("TEXTGRAD_LOG_DIR", str(tmp_path / "tg"))
    with FakeOpenAIServer(frozen_roles) as server:
        cfg = _cfg(tmp_path, server.base_url)
        engines = build_role_engines(
            cfg.models, local=True,
            engine_builder=lambda mc: EchoEngine(prompt_model) if mc.engine == "echo" else build_engine(mc))
        assert type(engines["target_model"]).__name__ == "OpenAIEngine"
        assert type(engines["prompt_model"]).__name__ == "EchoEngine"
        summary = TRPromptTrainer(cfg, dict(engines), FakeSFT(), base_model_path="unused", progress=False).run()
        seen = list(server.requests)
    assert server.models_seen() == {"target-llm", "reward-llm", "optimizer-llm"}
    by_model = {m: [r for r in seen if r["model"] == m] for m in server.models_seen()}
    assert all(len(r["messages"]) == 1 for r in by_model["target-llm"])
    assert all(r["messages"][0]["content"].startswith("You review instructions") for r in by_model["reward-llm"])
    # R saw the task description and the reference explanation (the neutral wording)
    first_review = by_model["reward-llm"][0]["messages"]
    assert "Name the secret number." in first_review[0]["content"]
    assert "Reference explanation:\nIt is always 42." in first_review[1]["content"]
    assert any("IMPROVED_VARIABLE" in json.dumps(r["messages"]) for r in by_model["optimizer-llm"])
    # the optimizer's t* (served over HTTP) made Π helpful: the policy beats the baselines on the HTTP target
    assert summary.test["trprompt"]["accuracy"] == 1.0 and summary.test["plain"]["accuracy"] == 0.0
    usage = json.loads((Path(cfg.run_dir) / "usage.json").read_text())
    for role in ("target_model", "reward_model", "optimizer_model"):
        assert usage[role]["requests"] > 0 and usage[role]["prompt_tokens"] > 0, role
    report = (Path(cfg.run_dir) / "report.md").read_text()
    assert "grader: `numeric`" in report
    assert "**1 bad rows dropped** (`skip_bad_rows`): missing field: 1" in report
    assert "answers.jsonl:41: field 'answer': missing field" in report


def test_shipped_openai_config_is_valid():
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "openai-frozen-roles.yaml")
    assert cfg.models.prompt_model.engine in ("hf", "vllm")
    for role in ("target_model", "reward_model", "optimizer_model"):
        assert getattr(cfg.models, role).engine == "openai", role


def test_comparison_with_frozen_roles_on_an_openai_endpoint(tmp_path, monkeypatch):
    """jobs/compare.py's path: OPRO and task-level TextGrad propose on the HTTP optimizer, the target answers there."""
    import yaml

    from cluster.resources import build_role_engines
    from trprompt.engines.factory import build_engine
    from trprompt.experiments.compare.config import load_compare_config
    from trprompt.experiments.compare.runner import Comparison

    monkeypatch.setenv("TEXTGRAD_LOG_DIR", str(tmp_path / "tg"))
    with FakeOpenAIServer(frozen_roles) as server:
        run = _cfg(tmp_path, server.base_url)
        data = {"run": run.to_dict(), "compare": {
            "methods": ["plain", "cot", "opro", "textgrad"], "test_limit": 4,
            "opro": {"steps": 1, "proposals_per_step": 2, "exemplars": 2},
            "textgrad": {"steps": 1, "candidates_per_step": 1, "minibatch_size": 3}}}
        path = tmp_path / "compare.yaml"
        path.write_text(yaml.safe_dump(data))
        run, cmp = load_compare_config(path)
        engines = build_role_engines(
            run.models, local=True,
            engine_builder=lambda mc: EchoEngine(prompt_model) if mc.engine == "echo" else build_engine(mc))
        result = Comparison(run, cmp, dict(engines), sft_runner=FakeSFT(), base_model_path="unused").run_all()
        seen = list(server.requests)
    assert {"target-llm", "optimizer-llm"} <= {r["model"] for r in seen}
    optimizer_chats = [json.dumps(r["messages"]) for r in seen if r["model"] == "optimizer-llm"]
    # the OPRO header and the TextGrad loss carry the task's description (task-neutral wording)
    assert any("Name the secret number." in c and "improving the instruction" in c for c in optimizer_chats)
    report = (Path(run.run_dir) / "comparison.md").read_text()
    for method in ("plain", "cot", "opro", "textgrad"):
        assert f"| {method} |" in report, method
    assert result is not None


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_with_target_and_reward_on_an_openai_endpoint(ray_session, tmp_path, tiny_model_dir, monkeypatch):
    """jobs/sweep.py's path (cluster.tune_sweep.run_sweep, real Ray Tune trial): Π is the tiny Llama on a local
    engine actor and gets a real LoRA SFT in the trial; the target and reward model are the HTTP endpoint."""
    from cluster.tune_sweep import run_sweep
    from trprompt.experiments.sweep.spec import sweep_spec_from_dict

    monkeypatch.setenv("TEXTGRAD_LOG_DIR", str(tmp_path / "tg"))
    with FakeOpenAIServer(frozen_roles) as server:
        frozen = {"engine": "openai", "base_url": server.base_url, "max_batch_size": 4, "timeout_s": 20,
                  "max_retries": 1, "num_cpus": 0.1}
        base = _cfg(tmp_path, server.base_url).to_dict()
        base["models"] = {
            "prompt_model": {"model": str(tiny_model_dir), "engine": "hf", "threads": 1, "num_cpus": 0.25},
            "target_model": {"model": "target-llm", **frozen},
            "reward_model": {"model": "reward-llm", **frozen},
            "optimizer_model": None,
        }
        base.pop("run_dir")
        base["loop"] = {"iterations": 1, "synthetic_size": 4}
        base["reward_search"] = {"steps": 0}
        base["generation"] = {"batch_size": 4, "prompt_max_tokens": 8}
        base["sft"] = {"lora_r": 4, "lora_alpha": 4, "batch_size": 4, "epochs": 1, "max_length": 256, "threads": 1}
        base["dataset"].update({"val_limit": 2, "test_limit": 2})
        base["eval"] = {"run_test": False, "baselines": []}
        spec = sweep_spec_from_dict({"name": "openai-roles", "base": base, "sweep": {
            "metric": "val_accuracy", "mode": "max",
            "search": {"generation.prompt_temperature": {"grid": [0.7]}},
            "budget": {"max_trials": 1}, "resources_per_trial": {"CPU": 0.25},
            "run_dir": str(tmp_path / "sweep")}})
        out = run_sweep(spec, verbose=0)
        seen = list(server.requests)
    [row] = out.rows
    assert row["stop_reason"] == "completed" and row["iterations_completed"] == 1
    assert row["tokens_target_model"] > 0 and row["tokens_prompt_model"] > 0
    # the HTTP endpoint played the target (question + Π's instruction, one user message) and the reward model
    targets = [r for r in seen if r["model"] == "target-llm"]
    reviews = [r for r in seen if r["model"] == "reward-llm"]
    assert targets and reviews and {r["model"] for r in seen} == {"target-llm", "reward-llm"}
    assert all(len(r["messages"]) == 1 and r["messages"][0]["content"].startswith("Question ") for r in targets)
    assert all(r["messages"][0]["content"].startswith("You review instructions") for r in reviews)
    # Π was trained locally: a real peft adapter (weights, not a stand-in) in the trial's run directory
    adapter = Path(row["run_dir"]) / "iter_1" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0


@pytest.mark.ray
def test_serving_a_run_whose_target_is_an_openai_endpoint(serve_url, tmp_path):
    """jobs/serve.py's app (cluster.serve.app.build_app) for a run with an ``engine: openai`` target: /v1/solve and
    the OpenAI-compatible route send question + Π's instruction to the endpoint and return its answer."""
    import httpx
    from ray import serve

    from cluster.serve.app import build_app
    from cluster.serve.run_spec import write_base_run

    reward = "SERVE-REWARD: name the units, then give one number."
    with FakeOpenAIServer(lambda messages: "1 l = 1000 ml, so the answer is 2500.") as server:
        run = write_base_run(
            tmp_path / "openai-target-run", {"model": "local-pi", "engine": "echo", "num_cpus": 0.1},
            {"model": "target-llm", "engine": "openai", "base_url": server.base_url, "num_cpus": 0.1,
             "timeout_s": 20, "max_retries": 1},
            optimal_reward=reward, extra_config={"dataset": {"name": "gsm8k"}})
        app = build_app({"run_dir": str(run), "num_cpus": 0.1, "request_timeout_s": 60.0, "rate_limit_per_s": 0})
        serve.run(app, name="trp-openai-target", route_prefix="/openai-target", blocking=False)
        try:
            question = "How many millilitres are in 2.5 litres?"
            with httpx.Client(base_url=f"{serve_url}/openai-target", timeout=60.0) as c:
                r = c.post("/v1/solve", json={"question": question})
                assert r.status_code == 200, r.text
                solved = r.json()
                r = c.post("/v1/chat/completions", json={"model": "any", "messages": [
                    {"role": "user", "content": question}]})
                assert r.status_code == 200, r.text
                chat = r.json()
            seen = list(server.requests)
        finally:
            serve.delete("trp-openai-target")
    # the answers are the endpoint's, and the endpoint got question + the instruction Π wrote (one user message)
    assert solved["answer"] == "1 l = 1000 ml, so the answer is 2500." and solved["extracted"] == "2500"
    assert chat["choices"][0]["message"]["content"] == solved["answer"]
    assert reward in solved["prompt"] and question in solved["prompt"]  # echo Π: its input carries q and t*
    assert len(seen) == 2 and {r["model"] for r in seen} == {"target-llm"}
    for body in seen:
        assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
        content = body["messages"][0]["content"]
        assert question in content and solved["prompt"] in content
    assert solved["tokens_by_role"]["target_model"]["completion"] == 10  # the fake server's word count
