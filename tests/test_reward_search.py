"""Optimal-reward search: TextGrad glue, fan-out scoring, acceptance, caching, resume."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from trprompt.config import GenerationConfig, RewardSearchConfig
from trprompt.data import Problem
from trprompt.engines.base import ChatRequest
from trprompt.engines.echo import EchoEngine
from trprompt.engines.textgrad_adapter import (
    ProtocolTextGradEngine,
    extract_tagged,
    propose_variants,
    robust_step,
    tg,
    whole_value,
)
from trprompt.grading import grade
from trprompt.reward_search import (
    FanOutRewardScorer,
    finished_steps,
    score_sequential,
    search_optimal_reward,
)
from trprompt.templates import Templates

TPL = Templates()
GOOD = "KEYSTONE"  # an instruction with this word makes the target right (except on the last problem)
BAD = "SLOPPY"  # an instruction with this word makes the target wrong everywhere

PROBLEMS = [
    Problem(id=f"p{i}", question=q, answer=a, solution="", dataset="gsm8k", metadata={})
    for i, (q, a) in enumerate(
        [
            ("Tom has 5 apples and buys 7 more. How many apples?", "12"),
            ("A box holds 6 rows of 5 eggs. How many eggs?", "30"),
            ("Sara had 20 dollars and spent 13. How much is left?", "7"),
            ("Nine bags hold 5 marbles each. How many marbles?", "45"),
        ]
    )
]
GOLD = {p.question: p.answer for p in PROBLEMS}


def _user(req: ChatRequest) -> str:
    return [m["content"] for m in req.messages if m["role"] == "user"][-1]


def _system(req: ChatRequest) -> str:
    return "".join(m["content"] for m in req.messages if m["role"] == "system")


def prompt_responder(req: ChatRequest) -> str:
    """Π: mirrors the reward's keyword into the instruction."""
    reward = _user(req).split("Feedback the ideal instruction would earn:\n", 1)[1]
    if BAD in reward:
        return f"Instruction: be {BAD} and guess."
    if GOOD in reward:
        return f'"Use the {GOOD} method: add carefully."'
    return "Solve it."


def target_answer(question: str, instruction: str) -> str:
    """The scripted target's reply to question + instruction."""
    gold = GOLD[question]
    right = (GOOD in instruction and question != PROBLEMS[-1].question) or (
        BAD not in instruction and question == PROBLEMS[0].question
    )
    return f"The answer is {gold}." if right else f"The answer is {int(gold) + 1}."


def target_responder(req: ChatRequest) -> str:
    content = _user(req)
    question = next(q for q in GOLD if content.startswith(q))
    return target_answer(question, content[len(question) :])


def reward_responder(req: ChatRequest) -> str:
    return "critique: the instruction should stress checking the sum"


def engines() -> tuple[EchoEngine, EchoEngine, EchoEngine]:
    return EchoEngine(prompt_responder), EchoEngine(target_responder), EchoEngine(reward_responder)


def expected_accuracy(reward: str) -> float:
    """Accuracy computed directly: run the scripted Π and target per problem and grade."""
    correct = 0
    for p in PROBLEMS:
        req = ChatRequest(TPL.prompt_model_messages(p.question, reward))
        instruction = prompt_responder(req)
        correct += grade(p.dataset, target_answer(p.question, instruction), p.answer).correct
    return correct / len(PROBLEMS)


class ScriptedOptimizer(EchoEngine):
    """Optimizer model: fixed loss/gradient replies, proposals popped from a script."""

    def __init__(self, proposals: list[str]) -> None:
        super().__init__(self._respond)
        self.proposals = list(proposals)
        self.kinds: list[str] = []

    def _respond(self, req: ChatRequest) -> str:
        system = _system(req)
        if system.startswith("A prompt-writing model was conditioned"):
            self.kinds.append("loss")
            return "The instructions never name a method, so the assistant adds wrongly."
        if "You are the gradient (feedback) engine" in system:
            self.kinds.append("backward")
            return f"Ask for instructions that name the {GOOD} method."
        if "improves text (i.e., variable)" in system:
            self.kinds.append("step")
            return self.proposals.pop(0) if self.proposals else "no tags here"
        raise AssertionError(f"unexpected optimizer request: {system[:80]!r}")


def tagged(text: str) -> str:
    return f"Here you go.\n<IMPROVED_VARIABLE>{text}</IMPROVED_VARIABLE>"


def gen(batch_size: int = 64) -> GenerationConfig:
    return GenerationConfig(batch_size=batch_size)


LONG_REWARD = " ".join(
    [f"word{i}" for i in range(30)] + ["zebracornmiddle"] + [f"tail{i}" for i in range(35)]
)  # 66 words; TextGrad's short view would drop the middle


# ----------------------------------------------------------------- textgrad glue


def test_protocol_engine_builds_one_request_and_counts() -> None:
    echo = EchoEngine(lambda r: "reply")
    eng = ProtocolTextGradEngine(echo, temperature=0.7, max_tokens=33, seed=5)
    assert eng("hello", system_prompt="sys") == "reply"
    assert eng.generate("again", temperature=0.0) == "reply"
    assert eng.sample("three", n=3) == ["reply"] * 3
    assert eng.calls == 3 and eng.samples == 5
    first, second, third = echo.seen
    assert first.messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]
    assert first.sampling.temperature == 0.7 and first.sampling.max_tokens == 33 and first.sampling.seed == 5
    assert second.messages == [{"role": "user", "content": "again"}] and second.sampling.temperature == 0.0
    assert second.sampling.seed == 6 and third.sampling.n == 3


def test_whole_value_shows_middle_and_restores() -> None:
    v = tg.Variable(LONG_REWARD, role_description="r", requires_grad=True)
    assert "zebracornmiddle" not in v.get_short_value()
    with whole_value(v, v):
        assert v.get_short_value() == LONG_REWARD
    assert "zebracornmiddle" not in v.get_short_value()
    assert "(...)" in v.get_short_value()


def _variable_with_gradient(value: str) -> tg.Variable:
    v = tg.Variable(value, role_description="an instruction", requires_grad=True)
    v.gradients.add(tg.Variable("make it clearer", role_description="feedback"))
    return v


def test_robust_step_keeps_incumbent_after_tagless_replies() -> None:
    echo = EchoEngine(lambda r: "I would improve it but forgot the tags")
    v = _variable_with_gradient(LONG_REWARD)
    opt = tg.TextualGradientDescent(parameters=[v], engine=ProtocolTextGradEngine(echo))
    with pytest.raises(IndexError):  # what plain TextGrad does
        opt.step()
    echo.seen.clear()
    out = robust_step(opt, max_tag_retries=2)
    assert not out.updated and out.attempts == 3 and out.error
    assert len(echo.seen) == 3
    assert v.value == LONG_REWARD
    # the optimizer saw the WHOLE variable in its <VARIABLE> span
    span = _user(echo.seen[0]).split("<VARIABLE>", 1)[1].split("</VARIABLE>", 1)[0]
    assert "zebracornmiddle" in span and "(...)" not in span


def test_robust_step_retries_until_tags_appear() -> None:
    replies = iter(["no tags", tagged("a new value")])
    echo = EchoEngine(lambda r: next(replies))
    v = _variable_with_gradient("old value")
    opt = tg.TextualGradientDescent(parameters=[v], engine=ProtocolTextGradEngine(echo))
    out = robust_step(opt, max_tag_retries=2)
    assert out.updated and out.attempts == 2
    assert v.value == "a new value"


def test_propose_variants_reasks_only_missing_then_keeps_incumbent() -> None:
    replies = iter(["none", tagged("A"), "none", tagged("B"), "none", "still none"])
    echo = EchoEngine(lambda r: next(replies))
    v = _variable_with_gradient(LONG_REWARD)
    opt = tg.TextualGradientDescent(parameters=[v], engine=ProtocolTextGradEngine(echo, temperature=0.9))
    props = propose_variants(opt, v, n=3, max_tag_retries=2)
    assert props.texts == ["A", "B", LONG_REWARD]
    assert props.kept_incumbent == 1 and props.calls == 3
    assert [r.sampling.n for r in echo.seen] == [3, 2, 1]
    assert v.value == LONG_REWARD
    assert "zebracornmiddle" in props.prompt.split("<VARIABLE>", 1)[1].split("</VARIABLE>", 1)[0]


def test_extract_tagged() -> None:
    assert extract_tagged("x <IMPROVED_VARIABLE> v </IMPROVED_VARIABLE> y") == "v"
    assert extract_tagged("<IMPROVED_VARIABLE>unterminated") == "unterminated"
    assert extract_tagged("no tags") is None
    assert extract_tagged("<IMPROVED_VARIABLE>  </IMPROVED_VARIABLE>") is None


# ----------------------------------------------------------------- scorer


def test_fan_out_sends_all_candidates_x_questions_in_one_call() -> None:
    pe, te, re_ = engines()
    scorer = FanOutRewardScorer(pe, te, re_, PROBLEMS, TPL, gen(64), failures_in_feedback=2)
    cands = ["plain reward", f"use {GOOD}", f"be {BAD}"]
    scores = scorer.score(cands)
    assert pe.calls == 1 and len(pe.seen) == len(cands) * len(PROBLEMS)
    assert te.calls == 1 and len(te.seen) == len(cands) * len(PROBLEMS)
    assert re_.calls == 1
    assert len(re_.seen) == sum(len(s.failures) for s in scores) == 2 + 1 + 2
    assert all(r.sampling.temperature == scorer.gen.prompt_eval_temperature for r in pe.seen)
    assert [s.accuracy for s in scores] == [expected_accuracy(c) for c in cands] == [0.25, 0.75, 0.0]
    good = scores[1]
    assert good.correct == 3 and good.n == 4
    assert [f["id"] for f in good.failures] == ["p3"]
    assert good.failures[0]["critique"].startswith("critique:")
    assert good.rows[0]["instruction"] == f"Use the {GOOD} method: add carefully."  # cleaned quotes


def test_fan_out_chunks_by_batch_size() -> None:
    pe, te, re_ = engines()
    scorer = FanOutRewardScorer(pe, te, re_, PROBLEMS, TPL, gen(5))
    scorer.score(["a", "b", "c"])
    assert pe.calls == math.ceil(12 / 5) and len(pe.seen) == 12
    assert te.calls == math.ceil(12 / 5)


def test_scorer_caches_identical_candidates() -> None:
    pe, te, re_ = engines()
    scorer = FanOutRewardScorer(pe, te, re_, PROBLEMS, TPL, gen())
    s1, s2 = scorer.score(["same", "same"])
    assert s1 is s2 and len(pe.seen) == len(PROBLEMS)
    s3, s4 = scorer.score(["same", f"{GOOD} too"])
    assert s3 is s1 and s4.accuracy == 0.75
    assert len(pe.seen) == 2 * len(PROBLEMS) and pe.calls == 2
    assert scorer.scored == 2 and scorer.cache_hits == 2


def test_sequential_reference_matches_fan_out() -> None:
    cands = ["plain", f"{GOOD}!", f"{BAD}!"]
    pe, te, re_ = engines()
    fan = FanOutRewardScorer(pe, te, re_, PROBLEMS, TPL, gen(), failures_in_feedback=3).score(cands)
    pe2, te2, re2 = engines()
    seq = score_sequential(pe2, te2, re2, PROBLEMS, TPL, gen(), cands, failures_in_feedback=3)
    assert pe2.calls == len(cands) * len(PROBLEMS) and all(len(r.messages) == 2 for r in pe2.seen)
    for a, b in zip(fan, seq, strict=True):
        assert (a.optimal_reward, a.accuracy, a.correct) == (b.optimal_reward, b.accuracy, b.correct)
        assert a.rows == b.rows and a.failures == b.failures


# ----------------------------------------------------------------- the search


def _cfg(**kw: Any) -> RewardSearchConfig:
    base = {"steps": 1, "candidates_per_step": 3, "max_tag_retries": 1, "failures_in_feedback": 2}
    base.update(kw)
    return RewardSearchConfig(**base)


def test_search_accepts_the_keyword_candidate_and_trace_is_real() -> None:
    pe, te, re_ = engines()
    scorer = FanOutRewardScorer(pe, te, re_, PROBLEMS, TPL, gen())
    worse = f"Be {BAD} about it."
    better = f"Instructions naming the {GOOD} method."
    same = "Rephrased feedback with no special method."
    opt = ScriptedOptimizer([tagged(worse), tagged(better), tagged(same)])
    seen_rows: list[dict[str, Any]] = []
    res = search_optimal_reward(LONG_REWARD, scorer, opt, _cfg(), TPL, on_candidate=seen_rows.append,
                                progress=False)

    assert res.best_reward == better
    assert res.initial_accuracy == pytest.approx(0.25) and res.best_accuracy == pytest.approx(0.75)
    assert res.steps_run == 1 and seen_rows == res.trace
    assert [r["step"] for r in res.trace] == [0, 1, 1, 1]
    for row in res.trace:  # every accuracy is the one the scripted models really produce
        assert row["accuracy"] == pytest.approx(expected_accuracy(row["text"]))
        assert row["n"] == len(PROBLEMS)
    accepted = {r["text"]: r["accepted"] for r in res.trace[1:]}
    assert accepted == {worse: False, better: True, same: False}
    # one loss + one backward + ONE proposal request with n=3
    assert opt.kinds == ["loss", "backward", "step", "step", "step"]
    step_reqs = [r for r in opt.seen if "improves text (i.e., variable)" in _system(r)]
    assert len(step_reqs) == 1 and step_reqs[0].sampling.n == 3
    assert step_reqs[0].sampling.temperature == _cfg().optimizer_temperature
    # the optimizer and the gradient engine saw the whole t* in the <VARIABLE> span
    for req in opt.seen[1:]:
        span = re.search(r"<VARIABLE>(.*?)</VARIABLE>", _user(req), re.S)
        assert span and "zebracornmiddle" in span.group(1) and "(...)" not in span.group(1)
    # the loss was built from the incumbent's real failures, with critiques
    loss_system = _system(opt.seen[0])
    assert "25.0% of 4 problems" in loss_system and "critique: the instruction" in loss_system
    # scoring the three candidates was one fan-out: 1 (initial) + 1 (candidates) prompt-model calls
    assert pe.calls == 2 and len(pe.seen) == 4 * len(PROBLEMS)


def test_ties_and_worse_candidates_keep_incumbent() -> None:
    pe, te, re_ = engines()
    scorer = FanOutRewardScorer(pe, te, re_, PROBLEMS, TPL, gen())
    opt = ScriptedOptimizer([tagged(f"{BAD} one"), tagged("tie: plain words")])
    res = search_optimal_reward("plain start", scorer, opt, _cfg(candidates_per_step=2), TPL, progress=False)
    assert res.best_reward == "plain start" and res.best_accuracy == pytest.approx(0.25)
    assert [r["accuracy"] for r in res.trace[1:]] == [0.0, 0.25]
    assert not any(r["accepted"] for r in res.trace[1:])


def test_search_survives_an_optimizer_that_never_tags() -> None:
    pe, te, re_ = engines()
    scorer = FanOutRewardScorer(pe, te, re_, PROBLEMS, TPL, gen())
    opt = ScriptedOptimizer([])  # every proposal reply lacks the tags
    res = search_optimal_reward("plain start", scorer, opt, _cfg(steps=2, max_tag_retries=2), TPL, progress=False)
    assert res.best_reward == "plain start" and res.steps_run == 2
    step_rows = [r for r in res.trace if r["step"] > 0]
    assert len(step_rows) == 6 and all(r["fallback"] and not r["accepted"] for r in step_rows)
    proposal_reqs = [r for r in opt.seen if "improves text (i.e., variable)" in _system(r)]
    assert len(proposal_reqs) == 2 * 3  # per step: 1 try + 2 retries


def test_search_resumes_from_trace() -> None:
    better = f"Name the {GOOD} method."
    pe, te, re_ = engines()
    scorer = FanOutRewardScorer(pe, te, re_, PROBLEMS, TPL, gen())
    opt = ScriptedOptimizer([tagged("first step, plain"), tagged(better)])
    full = search_optimal_reward("plain start", scorer, opt, _cfg(steps=2, candidates_per_step=1), TPL,
                                 progress=False)
    assert full.best_reward == better and [r["step"] for r in full.trace] == [0, 1, 2]

    # interrupted after step 1 with a half-written retry of step 2 (a lone row claiming 2 candidates)
    partial = full.trace[:2] + [{**full.trace[2], "candidates_in_step": 2}]
    assert len(finished_steps(partial)) == 2
    pe, te, re_ = engines()
    scorer = FanOutRewardScorer(pe, te, re_, PROBLEMS, TPL, gen())
    opt2 = ScriptedOptimizer([tagged(better)])
    res = search_optimal_reward("IGNORED", scorer, opt2, _cfg(steps=2, candidates_per_step=1), TPL,
                                progress=False, start_trace=partial)
    assert opt2.kinds == ["loss", "backward", "step"]  # only step 2 ran
    assert res.best_reward == better and res.initial_accuracy == pytest.approx(0.25)
    assert [r["step"] for r in res.trace] == [0, 1, 2] and res.steps_run == 2

    # everything finished: nothing runs
    opt3 = ScriptedOptimizer([])
    again = search_optimal_reward("IGNORED", scorer, opt3, _cfg(steps=2, candidates_per_step=1), TPL,
                                  progress=False, start_trace=res.trace)
    assert opt3.seen == [] and again.best_reward == better and again.best_accuracy == pytest.approx(0.75)


def test_search_stops_when_validation_is_perfect() -> None:
    pe, te, re_ = engines()
    easy = [PROBLEMS[0]]  # the plain reward already solves this one
    scorer = FanOutRewardScorer(pe, te, re_, easy, TPL, gen())
    opt = ScriptedOptimizer([])
    res = search_optimal_reward("plain", scorer, opt, _cfg(steps=3), TPL, progress=False)
    assert res.best_accuracy == 1.0 and res.steps_run == 0 and opt.seen == []
