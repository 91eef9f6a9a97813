"""Racing (successive halving) in the optimal-reward search: rungs, survivors, the incumbent rule, batches, resume."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest

from trprompt.config import ConfigError, GenerationConfig, RacingConfig, RewardSearchConfig, config_from_dict
from trprompt.data import Problem
from trprompt.engines.base import ChatRequest, ChatResult
from trprompt.engines.echo import EchoEngine
from trprompt.reward_search import (
    RUNG,
    FanOutRewardScorer,
    finished_steps,
    rung_sizes,
    search_optimal_reward,
    survivors,
)
from trprompt.templates import Templates

TPL = Templates()
N = 8
PROBLEMS = [
    Problem(id=f"q{j}", question=f"Question number {j}: what is {j} plus one?", answer=str(j + 1), solution="",
            dataset="gsm8k", metadata={})
    for j in range(N)
]
# Which validation questions the target answers right under each optimal reward (by its token).
RIGHT: dict[str, set[int]] = {
    "CAND_INC": {0, 1, 2, 3, 4, 5},  # the starting t*: 2/2, 4/4, 6/8
    "CAND_A": {0, 1, 6, 7},  # 2/2, 2/4, 4/8: survives rung 1, dropped at rung 2
    "CAND_B": {0, 1, 2, 3, 4, 5, 6},  # 2/2, 4/4, 7/8: the winner
    "CAND_C": {0},  # 1/2: dropped at rung 1
    "CAND_D": {1, 2, 3, 4, 5, 6, 7},  # 1/2 (7/8 on all): dropped at rung 1 although as good as B on all
}
TOKEN = re.compile(r"CAND_[A-Z]+")


def _user(req: ChatRequest) -> str:
    return [m["content"] for m in req.messages if m["role"] == "user"][-1]


def _system(req: ChatRequest) -> str:
    return "".join(m["content"] for m in req.messages if m["role"] == "system")


class SpyEngine(EchoEngine):
    """An echo engine that also records how many requests each call carried."""

    def __init__(self, responder: Any) -> None:
        super().__init__(responder)
        self.batches: list[int] = []

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        self.batches.append(len(requests))
        return super().generate(requests)


def prompt_responder(req: ChatRequest) -> str:
    m = TOKEN.search(_user(req))
    return f"Follow {m.group(0) if m else 'nothing'}."


def target_responder(req: ChatRequest) -> str:
    content = _user(req)
    j = int(re.search(r"Question number (\d+)", content).group(1))  # type: ignore[union-attr]
    m = TOKEN.search(content)
    right = m is not None and j in RIGHT[m.group(0)]
    return f"The answer is {j + 1 if right else j + 5}."


class ScriptedOptimizer(EchoEngine):
    """Optimizer model: fixed loss and gradient replies, proposals popped from a script."""

    def __init__(self, proposals: list[str]) -> None:
        super().__init__(self._respond)
        self.proposals = list(proposals)

    def _respond(self, req: ChatRequest) -> str:
        system = _system(req)
        if "improves text (i.e., variable)" in system:
            text = self.proposals.pop(0) if self.proposals else None
            return f"<IMPROVED_VARIABLE>{text}</IMPROVED_VARIABLE>" if text else "no tags"
        return "Name a better method."


def setup(batch_size: int = 256) -> tuple[FanOutRewardScorer, SpyEngine]:
    pe, te = SpyEngine(prompt_responder), SpyEngine(target_responder)
    re_ = EchoEngine(lambda r: "critique: check the sum")
    return FanOutRewardScorer(pe, te, re_, PROBLEMS, TPL, GenerationConfig(batch_size=batch_size)), pe


def cfg(enabled: bool = True, **kw: Any) -> RewardSearchConfig:
    base: dict[str, Any] = {"steps": 1, "candidates_per_step": 4, "max_tag_retries": 0, "failures_in_feedback": 2,
                            "racing": RacingConfig(enabled=enabled, first_questions=2, keep_fraction=0.5)}
    base.update(kw)
    return RewardSearchConfig(**base)


CANDS = ["Reward CAND_A", "Reward CAND_B", "Reward CAND_C", "Reward CAND_D"]
START = "Reward CAND_INC"


def _tokens(reqs: Sequence[ChatRequest]) -> list[str]:
    return [TOKEN.search(_user(r)).group(0) for r in reqs]  # type: ignore[union-attr]


# ----------------------------------------------------------------- schedule


def test_rung_sizes_and_survivors() -> None:
    on = RacingConfig(enabled=True, first_questions=16, keep_fraction=0.5)
    assert rung_sizes(64, on) == [16, 32, 64]
    assert rung_sizes(40, on) == [16, 32, 40]
    assert rung_sizes(16, on) == [16] and rung_sizes(10, on) == [10]
    assert rung_sizes(64, RacingConfig(enabled=False)) == [64]
    assert rung_sizes(64, RacingConfig(enabled=True, first_questions=16, keep_fraction=1 / 3)) == [16, 48, 64]
    assert survivors({0: 3, 1: 5, 2: 5, 3: 1}, 0.5) == [1, 2]
    assert survivors({0: 3, 1: 5, 2: 4}, 0.5) == [1]  # floor(1.5) = 1
    assert survivors({4: 2, 7: 2}, 0.5) == [4]  # ties go to the earlier proposal
    assert survivors({0: 0}, 0.1) == [0]  # at least one


def test_racing_config_validation() -> None:
    c = config_from_dict({"reward_search": {"racing": {"enabled": True, "first_questions": 8, "keep_fraction": 0.25}}})
    assert c.reward_search.racing == RacingConfig(True, 8, 0.25)
    with pytest.raises(ConfigError, match="reward_search.racing.keep_fraction"):
        config_from_dict({"reward_search": {"racing": {"keep_fraction": 1.0}}})
    with pytest.raises(ConfigError, match="reward_search.racing.first_questions"):
        config_from_dict({"reward_search": {"racing": {"first_questions": 0}}})


# ----------------------------------------------------------------- the race


def test_survivors_per_rung_one_batch_per_rung_and_the_incumbent_rule() -> None:
    scorer, pe = setup()
    rows: list[dict[str, Any]] = []
    res = search_optimal_reward(START, scorer, ScriptedOptimizer(list(CANDS)), cfg(), TPL,
                                on_candidate=rows.append, progress=False)
    # rungs of 2, 4 and then all 8 questions: 4 candidates -> 2 (A, B) -> 1 (B) -> the full set
    rungs = [r for r in rows if r.get("kind") == RUNG]
    assert [(r["n"], r["alive"]) for r in rungs] == [(2, [0, 1]), (4, [1])]
    # ONE prompt-model (and target) call per rung, holding every survivor x the rung's new questions;
    # the first call is the starting t* on all 8 questions
    assert pe.batches == [8, 4 * 2, 2 * 2, 1 * 4]
    assert _tokens(pe.seen[8:16]).count("CAND_C") == 2 and "CAND_C" not in _tokens(pe.seen[16:])
    assert set(_tokens(pe.seen[16:20])) == {"CAND_A", "CAND_B"} and _tokens(pe.seen[20:]) == ["CAND_B"] * 4
    assert scorer.generations == 8 + 16  # vs 8 + 32 scoring every candidate on every question

    assert res.optimal_reward == "Reward CAND_B" and res.best_accuracy == pytest.approx(7 / 8)
    assert res.generations == 24 and res.best_reward == res.optimal_reward
    step = {r["text"]: r for r in res.trace if r["step"] == 1}
    assert {t: r["n"] for t, r in step.items()} == {CANDS[0]: 4, CANDS[1]: 8, CANDS[2]: 2, CANDS[3]: 2}
    assert step[CANDS[1]]["questions_per_rung"] == [2, 4, 8] and step[CANDS[2]]["questions_per_rung"] == [2]
    # the incumbent is compared on the same questions as each challenger
    assert step[CANDS[0]]["incumbent_accuracy"] == pytest.approx(4 / 4)
    assert step[CANDS[1]]["incumbent_accuracy"] == pytest.approx(6 / 8)
    assert step[CANDS[3]]["incumbent_accuracy"] == pytest.approx(2 / 2)
    assert step[CANDS[0]]["accuracy"] == pytest.approx(2 / 4) and step[CANDS[3]]["accuracy"] == pytest.approx(1 / 2)
    assert [r["accepted"] for r in step.values()] == [False, True, False, False]
    assert all(r.get("kind") != RUNG for r in res.trace)


def test_racing_off_scores_every_candidate_on_every_question() -> None:
    scorer, pe = setup()
    rows: list[dict[str, Any]] = []
    res = search_optimal_reward(START, scorer, ScriptedOptimizer(list(CANDS)), cfg(enabled=False), TPL,
                                on_candidate=rows.append, progress=False)
    assert pe.batches == [8, 4 * 8] and rows == res.trace
    step = [r for r in res.trace if r["step"] == 1]
    assert all(r["n"] == N and r["incumbent_accuracy"] == pytest.approx(6 / 8) for r in step)
    assert res.optimal_reward == "Reward CAND_B"  # B and D tie at 7/8: the earlier proposal wins


def test_a_slice_leader_is_accepted_only_if_better_on_all_questions() -> None:
    # A leads C on the slice (2/2 vs 1/2) but reaches only 4/8 < 6/8 on all questions: t* stays.
    scorer, pe = setup()
    res = search_optimal_reward(START, scorer, ScriptedOptimizer(["Reward CAND_A", "Reward CAND_C"]),
                                cfg(candidates_per_step=2), TPL, progress=False)
    assert res.optimal_reward == START and res.best_accuracy == pytest.approx(6 / 8)
    a, c = [r for r in res.trace if r["step"] == 1]
    assert (a["n"], a["accepted"], a["incumbent_accuracy"]) == (8, False, pytest.approx(6 / 8))
    assert (c["n"], c["incumbent_accuracy"]) == (2, pytest.approx(1.0))
    assert pe.batches == [8, 2 * 2, 6]


def test_incumbent_joins_the_rung_batch_when_not_scored_yet() -> None:
    # A resumed search lost the scorer's cache: t* must be rescored on the rung's questions in the same batch.
    scorer, pe = setup()
    rows: list[dict[str, Any]] = []
    search_optimal_reward(START, scorer, ScriptedOptimizer(list(CANDS)), cfg(), TPL, on_candidate=rows.append,
                          progress=False)
    first_rung = next(i for i, r in enumerate(rows) if r.get("kind") == RUNG)
    fresh, pe2 = setup()
    search_optimal_reward("IGNORED", fresh, ScriptedOptimizer([]), cfg(), TPL, start_trace=rows[: first_rung + 1],
                          progress=False)
    # t* on all 8 (step start, for the loss), then rung 2 for A and B on questions 2-3, then B on 4-7
    assert pe2.batches == [8, 2 * 2, 4]


def test_resume_mid_race_continues_at_the_next_rung() -> None:
    scorer, _ = setup()
    rows: list[dict[str, Any]] = []
    full = search_optimal_reward(START, scorer, ScriptedOptimizer(list(CANDS)), cfg(steps=2), TPL,
                                 on_candidate=rows.append, progress=False)
    # interrupted right after step 1's first rung was persisted
    cut = next(i for i, r in enumerate(rows) if r.get("kind") == RUNG) + 1
    assert len(finished_steps(rows[:cut])) == 1
    fresh, pe = setup()
    opt = ScriptedOptimizer([])  # step 1 must not ask the optimizer again; step 2 gets only tagless replies
    res = search_optimal_reward("IGNORED", fresh, opt, cfg(steps=2), TPL, start_trace=rows[:cut], progress=False)
    step1_proposals = [r for r in opt.seen if "improves text (i.e., variable)" in _system(r)]
    assert len(step1_proposals) == 1  # only step 2 proposed (and fell back)
    assert "CAND_C" not in _tokens(pe.seen) and "CAND_D" not in _tokens(pe.seen)  # rung 1 was not redone
    assert res.optimal_reward == full.optimal_reward == "Reward CAND_B"
    assert [(r["step"], r["text"], r["n"], r["accepted"]) for r in res.trace if r["step"] == 1] == [
        (r["step"], r["text"], r["n"], r["accepted"]) for r in full.trace if r["step"] == 1
    ]
    assert res.steps_run == 2


def test_report_shows_questions_per_candidate(tmp_path: Any) -> None:
    import json

    from trprompt.report import _reward_search_lines

    scorer, _ = setup()
    res = search_optimal_reward(START, scorer, ScriptedOptimizer(list(CANDS)), cfg(), TPL, progress=False)
    (tmp_path / "iter_0").mkdir()
    (tmp_path / "iter_0" / "reward_search.json").write_text(json.dumps({"trace": res.trace}))
    lines = _reward_search_lines(tmp_path)
    assert "| 0 | 1 | 4, 8, 2, 2 | 50.00%, 87.50%, 50.00%, 50.00% | 1 |" in lines
