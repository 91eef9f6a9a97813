"""Float scores decide selection: a ``python:`` grader returning a value in [0, 1] ranks candidates by
its mean (summed) score, never by how many answers reached a full score.

Each scenario is built so the binary count and the float score disagree: the incumbent and a
"consistent" candidate never reach a full score (0 correct) but score 0.5 / 0.9 everywhere, while
a "spiky" candidate gets two full scores and zeros elsewhere. Counting ``correct`` would pick the
spiky one; the mean score picks the consistent one.
"""

from __future__ import annotations

import re
import sys
import textwrap
from typing import Any

import pytest

from tests.test_racing import ScriptedOptimizer
from trprompt.config import GenerationConfig, RacingConfig, RewardSearchConfig
from trprompt.data import Problem
from trprompt.engines.base import ChatRequest
from trprompt.engines.echo import EchoEngine
from trprompt.methods.base import InstructionScore
from trprompt.reward_search import RUNG, FanOutRewardScorer, search_optimal_reward, survivors
from trprompt.templates import Templates

TPL = Templates()
N = 4
# Score of each candidate's answer to question j (by the candidate's token).
CREDIT: dict[str, list[float]] = {
    "CAND_INC": [0.5, 0.5, 0.5, 0.5],  # t*: 0 correct, total 2.0
    "CAND_SPIKY": [1.0, 0.0, 1.0, 0.0],  # 2 correct, total 2.0 (rung of 2 questions: 1 correct, 1.0)
    "CAND_STEADY": [0.9, 0.9, 0.9, 0.9],  # 0 correct, total 3.6 (rung: 0 correct, 1.8)
}
TOKEN = re.compile(r"CAND_[A-Z]+")


@pytest.fixture
def credit_grader(tmp_path, monkeypatch) -> str:
    """A user metric: the float after 'credit' in the answer (the target states its own score)."""
    name = f"credit_metric_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import re

        def credit(prediction_text, example):
            m = re.search(r"credit ([0-9.]+)", prediction_text)
            return float(m.group(1)) if m else 0.0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield f"python: {name}:credit"
    sys.modules.pop(name, None)


def _problems(grader: str) -> list[Problem]:
    return [Problem(id=f"q{j}", question=f"Question number {j}: rate it.", answer="1", solution=None,
                    dataset="custom", grader=grader) for j in range(N)]


def _user(req: ChatRequest) -> str:
    return [m["content"] for m in req.messages if m["role"] == "user"][-1]


def _prompt(req: ChatRequest) -> str:
    m = TOKEN.search(_user(req))
    return f"Follow {m.group(0) if m else 'nothing'}."


def _target(req: ChatRequest) -> str:
    content = _user(req)
    j = int(re.search(r"Question number (\d+)", content).group(1))  # type: ignore[union-attr]
    m = TOKEN.search(content)
    return f"credit {CREDIT[m.group(0)][j] if m else 0.0}"


def _search(grader: str, racing: bool) -> tuple[Any, list[dict[str, Any]]]:
    scorer = FanOutRewardScorer(EchoEngine(_prompt), EchoEngine(_target), EchoEngine(lambda r: "critique"),
                                _problems(grader), TPL, GenerationConfig())
    cfg = RewardSearchConfig(steps=1, candidates_per_step=2, max_tag_retries=0, failures_in_feedback=1,
                             racing=RacingConfig(enabled=racing, first_questions=2, keep_fraction=0.5))
    rows: list[dict[str, Any]] = []
    optimizer = ScriptedOptimizer(["Reward CAND_SPIKY", "Reward CAND_STEADY"])
    res = search_optimal_reward("Reward CAND_INC", scorer, optimizer, cfg, TPL, on_candidate=rows.append,
                                progress=False)
    return res, rows


def test_survivors_rank_by_summed_float_score():
    assert survivors({0: 1.0, 1: 1.8}, 0.5) == [1]
    assert 0.1 + 0.2 + 0.4 > 0.7  # float noise: the same sum in another order ...
    assert survivors({0: 0.7, 1: 0.1 + 0.2 + 0.4}, 0.5) == [0]  # ... is a tie, which goes to the lower index
    assert survivors({0: 0.5, 1: 1.0, 2: 0.9, 3: 0.2}, 0.5) == [1, 2]


@pytest.mark.parametrize("racing", [False, True])
def test_reward_search_accepts_the_higher_mean_score_not_the_more_correct(credit_grader, racing):
    res, rows = _search(credit_grader, racing)
    step = {r["text"]: r for r in res.trace if r["step"] == 1}
    spiky, steady = step["Reward CAND_SPIKY"], step["Reward CAND_STEADY"]
    assert steady["correct"] == 0 and res.trace[0]["correct"] == 0  # by counts, STEADY does not beat t*
    assert steady["accuracy"] == pytest.approx(0.9) and res.initial_accuracy == pytest.approx(0.5)
    assert res.optimal_reward == "Reward CAND_STEADY" and steady["accepted"] and not spiky["accepted"]
    assert res.best_accuracy == pytest.approx(0.9)
    if racing:  # rung of 2 questions: SPIKY has 1 correct (1.0), STEADY 0 correct (1.8): STEADY survives
        (rung,) = [r for r in rows if r.get("kind") == RUNG]
        assert rung["n"] == 2 and rung["alive"] == [1]
        assert rung["incumbent_score"] == pytest.approx(1.0) and rung["incumbent_correct"] == 0
        assert spiky["n"] == 2 and spiky["correct"] == 1
    else:
        assert spiky["correct"] == 2 and spiky["accuracy"] == pytest.approx(0.5)


def test_reward_search_rejects_more_correct_but_lower_score(credit_grader):
    """A candidate with more full scores but a lower summed score than t* is not accepted."""
    CREDIT["CAND_LOW"] = [1.0, 0.0, 0.0, 0.0]  # 1 correct, total 1.0 < t*'s 2.0
    try:
        scorer = FanOutRewardScorer(EchoEngine(_prompt), EchoEngine(_target), EchoEngine(lambda r: "c"),
                                    _problems(credit_grader), TPL, GenerationConfig())
        res = search_optimal_reward("Reward CAND_INC", scorer, ScriptedOptimizer(["Reward CAND_LOW"]),
                                    RewardSearchConfig(steps=1, candidates_per_step=1, max_tag_retries=0),
                                    TPL, progress=False)
    finally:
        del CREDIT["CAND_LOW"]
    low = [r for r in res.trace if r["step"] == 1 and r["text"] == "Reward CAND_LOW"][0]
    assert low["correct"] == 1 and not low["accepted"] and res.optimal_reward == "Reward CAND_INC"


def test_method_scores_rank_by_mean_score(credit_grader, tmp_path):
    """MethodContext.score (OPRO, TextGrad, GEPA's acceptance) and the GEPA adapter use the float scores."""
    from trprompt.methods.base import MethodContext
    from trprompt.methods.gepa_method import COMPONENT, ProblemAdapter
    from trprompt.roles import ROLES

    def target(req: ChatRequest) -> str:  # the instruction is the candidate token itself
        j = int(re.search(r"Question number (\d+)", _user(req)).group(1))  # type: ignore[union-attr]
        return f"credit {CREDIT[TOKEN.search(_user(req)).group(0)][j]}"  # type: ignore[union-attr]

    eng = EchoEngine(target)
    probs = _problems(credit_grader)
    ctx = MethodContext.create({r: eng for r in ROLES}, train=probs, val=probs, templates=TPL,
                               generation=GenerationConfig(), work_dir=tmp_path)
    spiky, steady = ctx.score(["CAND_SPIKY", "CAND_STEADY"])
    assert (spiky.correct, steady.correct) == (2, 0)
    assert steady.accuracy == pytest.approx(0.9) and spiky.accuracy == pytest.approx(0.5)
    assert max([spiky, steady], key=lambda s: s.accuracy) is steady
    assert not steady.perfect and InstructionScore("x", 0, 2, [{"correct": False, "score": 1.0}] * 2).perfect
    ev = ProblemAdapter(ctx).evaluate(probs, {COMPONENT: "CAND_STEADY"})
    assert ev.scores == pytest.approx([0.9] * N)


def test_instruction_score_from_a_summary_keeps_its_float_accuracy():
    """The TRPrompt method's history rows come from val summaries: their float accuracy, not correct/n."""
    s = InstructionScore("t*", correct=0, n=4, rows=[], mean_score=0.9)
    assert s.accuracy == pytest.approx(0.9)
    assert InstructionScore("t*", correct=1, n=4, rows=[]).accuracy == pytest.approx(0.25)  # old summaries
