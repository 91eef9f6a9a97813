"""The run's seed reaches every target-model request.

Each target request is seeded with ``target_seed(run seed, question)``: the same run seed gives
the same sampled answers (whatever the batch or order), another seed gives other answers when
the target samples (``target_temperature > 0``). Checked on the tiny random Llama (HF engine)
and, for each caller (evaluation, reward-search scorers, baseline methods), on the echo engine's
record of the requests it received.
"""

from __future__ import annotations

import hashlib

import pytest

from trprompt.config import GenerationConfig
from trprompt.data import Problem
from trprompt.engines.echo import EchoEngine
from trprompt.evaluation import answer_and_grade, evaluate, target_requests, target_seed
from trprompt.policies import fixed_policy
from trprompt.reward_search import FanOutRewardScorer, score_sequential
from trprompt.templates import Templates

TPL = Templates()
PROBLEMS = [
    Problem(id=f"q{i}", question=f"Tom has {i + 2} apples and buys {i + 5} more. How many apples?",
            answer=str(2 * i + 7), solution=None, dataset="gsm8k")
    for i in range(4)
]


def test_target_seed_is_stable_and_depends_on_seed_and_question():
    q0, q1 = PROBLEMS[0].question, PROBLEMS[1].question
    assert target_seed(3, q0) == target_seed(3, q0)
    assert target_seed(3, q0) != target_seed(4, q0)
    assert target_seed(3, q0) != target_seed(3, q1)
    assert 0 <= target_seed(3, q0) < 2**63
    # A fixed value: the derivation must not change between versions (old runs stay reproducible).
    assert target_seed(0, "x") == int.from_bytes(hashlib.sha256(b"0\0x").digest()[:8], "big") & (2**63 - 1)


def test_requests_carry_the_derived_seed():
    reqs = target_requests(PROBLEMS, ["Solve it."] * 4, TPL, max_tokens=8, temperature=0.7, seed=11)
    assert [r.sampling.seed for r in reqs] == [target_seed(11, p.question) for p in PROBLEMS]
    assert all(r.sampling.temperature == 0.7 and r.sampling.max_tokens == 8 for r in reqs)


def _seeds(engine: EchoEngine) -> list[int | None]:
    return [r.sampling.seed for r in engine.seen]


def test_every_caller_passes_the_run_seed():
    expected = [target_seed(5, p.question) for p in PROBLEMS]

    eng = EchoEngine(lambda r: "The answer is 7.")
    answer_and_grade(eng, PROBLEMS, ["x"] * 4, TPL, temperature=0.5, progress=False, seed=5)
    assert _seeds(eng) == expected

    eng = EchoEngine(lambda r: "The answer is 7.")
    evaluate(fixed_policy("plain", TPL), eng, PROBLEMS, TPL, temperature=0.5, progress=False, seed=5)
    assert _seeds(eng) == expected

    gen = GenerationConfig(target_temperature=0.5)
    pe, te, re_ = EchoEngine(lambda r: "Do it."), EchoEngine(lambda r: "The answer is 7."), EchoEngine()
    FanOutRewardScorer(pe, te, re_, PROBLEMS, TPL, gen, seed=5).score(["reward"], critique=False)
    assert sorted(_seeds(te)) == sorted(expected)  # the fan-out sends the shortest prompts first

    pe, te, re_ = EchoEngine(lambda r: "Do it."), EchoEngine(lambda r: "The answer is 7."), EchoEngine()
    score_sequential(pe, te, re_, PROBLEMS, TPL, gen, ["reward"], failures_in_feedback=0, seed=5)
    assert _seeds(te) == expected


def test_methods_answer_with_the_run_seed(tmp_path):
    from trprompt.methods.base import MethodContext
    from trprompt.roles import ROLES

    eng = EchoEngine(lambda r: "The answer is 7.")
    ctx = MethodContext.create({r: eng for r in ROLES}, train=PROBLEMS, val=PROBLEMS, templates=TPL,
                               generation=GenerationConfig(target_temperature=0.5), seed=9, work_dir=tmp_path)
    ctx.answer(["x"] * 4, PROBLEMS)
    assert _seeds(eng) == [target_seed(9, p.question) for p in PROBLEMS]


@pytest.fixture(scope="module")
def hf_target(tiny_model_dir):
    from trprompt.config import ModelConfig
    from trprompt.engines.factory import build_engine

    return build_engine(ModelConfig(model=str(tiny_model_dir), engine="hf", threads=1, max_batch_size=8))


def _outputs(engine, seed: int, temperature: float, problems=PROBLEMS) -> dict[str, str]:
    rows = answer_and_grade(engine, problems, ["Answer briefly."] * len(problems), TPL, max_tokens=12,
                            temperature=temperature, chunk_size=4, progress=False, seed=seed)
    return {r["id"]: r["output"] for r in rows}


def test_hf_target_same_seed_same_answers_other_seed_differs(hf_target):
    a = _outputs(hf_target, seed=3, temperature=1.0)
    b = _outputs(hf_target, seed=3, temperature=1.0)
    assert a == b
    # The answer to a question does not depend on which other questions share its batch, or their order.
    assert _outputs(hf_target, seed=3, temperature=1.0, problems=PROBLEMS[::-1][:2]) == {
        k: a[k] for k in ("q3", "q2")}
    c = _outputs(hf_target, seed=4, temperature=1.0)
    assert sum(a[k] != c[k] for k in a) >= 2, (a, c)


def test_hf_target_greedy_ignores_the_seed(hf_target):
    assert _outputs(hf_target, seed=3, temperature=0.0) == _outputs(hf_target, seed=4, temperature=0.0)
