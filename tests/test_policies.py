"""Π's request for (q, t*) is built in one place: training, the reward search, evaluation and serving agree."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from trprompt.config import config_from_dict, dump_config
from trprompt.data import Problem
from trprompt.engines.base import ChatRequest
from trprompt.engines.echo import EchoEngine
from trprompt.loop import TRPromptTrainer
from trprompt.policies import (
    FixedInstructionPolicy,
    QueryAwarePolicy,
    clean_instruction,
    eval_sampling,
    fixed_policy,
    prompt_model_request,
)
from trprompt.reward_search import scoring_request
from trprompt.roles import ROLES
from trprompt.templates import Templates

T = Templates()
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
OPTIMAL_REWARD = "The ideal instruction names both quantities and asks for the sum as a single number."


def Recorder() -> EchoEngine:  # noqa: N802
    """An echo engine (it keeps every request in ``seen``) that knows the adapter ``pi``."""
    return EchoEngine(adapters=("pi",))


def _cfg(tmp_path: Path) -> Any:
    return config_from_dict({
        "run_dir": str(tmp_path / "run"),
        "models": {r: {"model": "fake", "engine": "echo"} for r in ROLES[:3]},
    })


def _key(req: ChatRequest) -> tuple[Any, ...]:
    """Everything a request carries except the engine-local adapter id."""
    return (tuple(tuple(sorted(m.items())) for m in req.messages), req.sampling)


def _serving_request(cfg: Any, recorder: EchoEngine) -> ChatRequest:
    """Run the serving deployment's prompt path in-process (no Ray Serve) and return Π's request."""
    from cluster.serve.deployments import PromptModel
    from cluster.serve.messages import PromptJob
    from cluster.serve.run_spec import RunSpec

    spec = RunSpec(run_dir=cfg.run_dir, run_id="r", config=cfg, templates=T, optimal_reward=OPTIMAL_REWARD,
                   adapter_name=None, adapter_path=None, adapter_version="base", reward_version="v")
    settings = {"run_dir": cfg.run_dir, "batching": False, "engine_factory": lambda _mc: recorder}

    async def go() -> list[ChatRequest]:
        model = PromptModel.__new__(PromptModel)
        await model.__init__(spec, settings, False)  # may send a trial prompt of its own
        before = len(recorder.seen)
        await model._run_prompts([PromptJob(question=QUESTION)])
        model._sync_task.cancel()
        return recorder.seen[before:]

    (req,) = asyncio.run(go())
    return req


def test_training_search_evaluation_and_serving_build_identical_requests(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    problem = Problem("q1", QUESTION, "7", "", "gsm8k", {})

    # training: the loop's validation policy
    trainer = TRPromptTrainer(cfg, {r: Recorder() for r in ROLES}, lambda *a, **k: {}, "unused", progress=False)
    seen = trainer.engines["prompt_model"].engine.seen
    before = len(seen)
    trainer.policy(OPTIMAL_REWARD, "pi").instructions([problem])
    (training,) = seen[before:]
    # the optimal-reward search's scoring request
    search = scoring_request(T, cfg.generation, QUESTION, OPTIMAL_REWARD, "pi")
    # evaluation (trprompt eval, the comparison): the run's policy rebuilt from its saved config
    saved = config_from_dict(yaml.safe_load(dump_config(cfg)))
    evaluation = QueryAwarePolicy.for_run(Recorder(), T, OPTIMAL_REWARD, saved.generation, saved.seed,
                                          adapter="pi").requests([problem])[0]
    # serving
    serving = _serving_request(cfg, Recorder())

    expected = prompt_model_request(T, QUESTION, OPTIMAL_REWARD, eval_sampling(cfg.generation), "pi")
    assert _key(training) == _key(search) == _key(evaluation) == _key(serving) == _key(expected)
    assert training.adapter == search.adapter == evaluation.adapter == "pi"
    assert serving.adapter is None  # the base-model run spec above has no adapter
    # and the request really carries the question and t*
    text = "\n".join(m["content"] for m in expected.messages)
    assert QUESTION in text and OPTIMAL_REWARD in text


def test_eval_sampling_follows_the_generation_config(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    cfg.generation.prompt_eval_temperature = 0.3
    cfg.generation.prompt_max_tokens = 40
    sp = eval_sampling(cfg.generation, seed=5, n=2)
    assert (sp.temperature, sp.max_tokens, sp.seed, sp.n) == (0.3, 40, 5, 2)
    assert eval_sampling(cfg.generation, temperature=0.0).temperature == 0.0


def test_fixed_policies(tmp_path: Path) -> None:
    probs = [Problem(str(i), f"q{i}", "1", "", "gsm8k", {}) for i in range(3)]
    assert fixed_policy("plain", T).instructions(probs) == ["", "", ""]
    assert fixed_policy("cot", T).instructions(probs) == [T.cot_instruction] * 3
    f = tmp_path / "p.txt"
    f.write_text("  Add them.\n")
    assert fixed_policy("fixed", T, f) == FixedInstructionPolicy("fixed", "Add them.")
    with pytest.raises(ValueError, match="prompt-file"):
        fixed_policy("fixed", T)
    with pytest.raises(ValueError, match="unknown fixed-instruction method"):
        fixed_policy("bogus", T)


def test_clean_instruction() -> None:
    assert clean_instruction('  Instruction: "Add the numbers."  ') == "Add the numbers."
    assert clean_instruction("'quoted'") == "quoted"
    assert clean_instruction("plain") == "plain"
