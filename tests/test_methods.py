"""Every prompting method end to end on a scripted fake model: budgets, real scores, method contracts."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest

from trprompt.config import GenerationConfig, config_from_dict
from trprompt.data import Problem, load_split
from trprompt.engines.base import ChatRequest
from trprompt.engines.echo import EchoEngine
from trprompt.engines.wrappers import BudgetExceededError
from trprompt.evaluation import answer_and_grade
from trprompt.methods import make_method
from trprompt.methods.base import MethodBudget, MethodContext
from trprompt.policies import FixedInstructionPolicy, QueryAwarePolicy, policy_from_spec, policy_spec
from trprompt.roles import ROLES
from trprompt.templates import Templates

T = Templates()
KEYWORD = "magic word"
WRONG = "The answer is -987654."


def _gold_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for ds, split in (("gsm8k", "train"), ("gsm8k", "val"), ("gsm8k", "test"), ("svamp", "test")):
        for p in load_split(ds, split):
            table[p.question.strip()] = p.answer
    return table


GOLD = _gold_table()


def gold_of(content: str) -> str | None:
    """The gold answer of the problem a target prompt ("question\\n\\ninstruction") is about."""
    for candidate in (content.rsplit("\n\n", 1)[0], content):
        if candidate.strip() in GOLD:
            return GOLD[candidate.strip()]
    return None


class Scripted:
    """A fake model playing every role. The target is right only when the instruction holds the keyword.

    Each optimizer (TextGrad, OPRO, GEPA reflection) has its own proposal counter: proposal ``i``
    holds the keyword when ``i`` is odd and ``i >= good_after``, so methods must really score
    candidates to tell them apart.
    """

    def __init__(self, good_after: int = 0) -> None:
        self.good_after = good_after
        self.counters: dict[str, itertools.count] = {}

    def _good(self, kind: str) -> tuple[bool, int]:
        i = next(self.counters.setdefault(kind, itertools.count()))
        return i % 2 == 1 and i >= self.good_after, i

    def __call__(self, request: ChatRequest) -> str:
        msgs = list(request.messages)
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
        user = msgs[-1]["content"]
        if system == T.prompt_model_system:
            return f"Use the {KEYWORD}." if request.adapter else "Just guess."
        if system == T.reward_model_system:
            return "The instruction was vague; it should name the key quantity."
        if "<IMPROVED_VARIABLE>" in user or "IMPROVED_VARIABLE" in system:
            good, i = self._good("textgrad")
            text = f"Use the {KEYWORD} and check the arithmetic ({i})." if good else f"Be brief ({i})."
            return f"<IMPROVED_VARIABLE>{text}</IMPROVED_VARIABLE>"
        if "You are improving the instruction given to a math assistant" in user:
            good, i = self._good("opro")
            return f"<INS>Say the {KEYWORD} ({i}).</INS>" if good else f"<INS>Be precise ({i}).</INS>"
        if "I provided an assistant with the following instructions" in user:
            good, i = self._good("gepa")
            return f"```\nRemember the {KEYWORD} ({i}).\n```" if good else f"```\nAnswer fast ({i}).\n```"
        if len(msgs) == 1 and gold_of(user) is not None:
            return f"The answer is {gold_of(user)}." if KEYWORD in user else WRONG
        return f"The instruction should mention the {KEYWORD}."


def scripted_engine(good_after: int = 0) -> EchoEngine:
    return EchoEngine(Scripted(good_after))


def expected_accuracy(instruction: str, problems: list[Problem]) -> float:
    """Accuracy recomputed from scratch: a fresh scripted target answers and the real grader grades."""
    rows = answer_and_grade(scripted_engine(), problems, [instruction] * len(problems), T, progress=False)
    return sum(r["correct"] for r in rows) / len(rows)


class FakeSFT:
    """Writes a stand-in adapter folder."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, examples, base_model, out_dir, cfg, templates, init_adapter=None, seed=0):
        self.calls.append(str(out_dir))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "adapter_config.json").write_text("{}")
        return {"examples": len(examples)}


TRAIN = load_split("gsm8k", "train", limit=24)
VAL = load_split("gsm8k", "val", limit=6)


def make_ctx(tmp_path: Path, engine: Any, budget: MethodBudget, **kw: Any) -> MethodContext:
    return MethodContext.create(
        {r: engine for r in ROLES}, train=TRAIN, val=VAL, templates=T,
        generation=GenerationConfig(batch_size=8, target_max_tokens=64), budget=budget, seed=0,
        work_dir=tmp_path / "work", **kw,
    )


def target_requests(engine: EchoEngine) -> int:
    return sum(1 for r in engine.seen if len(r.messages) == 1 and gold_of(r.messages[0]["content"]) is not None)


def check_history_is_real(ctx: MethodContext) -> None:
    assert ctx.history, "the method recorded no scored candidate"
    for row in ctx.history:
        assert row["n"] == len(VAL)
        assert row["val_accuracy"] == pytest.approx(expected_accuracy(row["text"], VAL)), row["text"]
        assert row["val_accuracy"] <= row["incumbent_accuracy"] + 1e-12 or not row["accepted"]


def check_within_budget(ctx: MethodContext, engine: EchoEngine) -> None:
    b = ctx.budget
    assert target_requests(engine) == ctx.metric_calls  # the meter saw every target request
    assert len(engine.seen) == ctx.llm_requests
    if b.max_metric_calls is not None:
        assert ctx.metric_calls <= b.max_metric_calls
    if b.max_llm_requests is not None:
        assert ctx.llm_requests <= b.max_llm_requests


# ------------------------------------------------------------------ context and fixed methods
def test_fixed_methods_spend_nothing(tmp_path):
    engine = scripted_engine()
    for name, instruction in (("plain", ""), ("cot", T.cot_instruction)):
        ctx = make_ctx(tmp_path / name, engine, MethodBudget(max_metric_calls=1))
        policy = make_method(name, T).fit(ctx)
        assert isinstance(policy, FixedInstructionPolicy) and policy.instruction == instruction
        assert ctx.llm_requests == 0 and not engine.seen


def test_context_refuses_to_overspend_before_sending(tmp_path):
    engine = scripted_engine()
    ctx = make_ctx(tmp_path, engine, MethodBudget(max_metric_calls=10))
    ctx.score(["a"])  # 6 metric calls
    assert ctx.metric_calls == 6
    with pytest.raises(BudgetExceededError):
        ctx.score(["b"])  # 6 more would make 12 > 10
    assert ctx.metric_calls == 6 and len(engine.seen) == 6  # nothing was sent
    assert ctx.score(["a"])[0].n == 6 and ctx.metric_calls == 6  # cached: free
    assert ctx.can_afford(4) and not ctx.can_afford(5)


def test_context_scores_are_real_and_batched(tmp_path):
    engine = scripted_engine()
    ctx = make_ctx(tmp_path, engine, MethodBudget())
    good, bad = ctx.score([f"Use the {KEYWORD}.", "Guess."])
    assert (good.accuracy, bad.accuracy) == (1.0, 0.0)
    # Both candidates x 6 problems went out as one stream: 12 requests in chunks of batch_size 8.
    assert engine.calls == 2 and [len(r.messages) for r in engine.seen] == [1] * 12
    assert ctx.engines["target_model"].usage.calls == 2 and ctx.metric_calls == 12


# ------------------------------------------------------------------ textgrad
@pytest.mark.parametrize("max_metric_calls,expected_steps", [(200, 3), (30, 1), (20, 0)])
def test_textgrad_end_to_end_within_budget(tmp_path, max_metric_calls, expected_steps):
    from trprompt.methods.textgrad_task import TextGradSettings

    engine = scripted_engine(good_after=4)  # only the 6th proposal (step 3) holds the keyword
    budget = MethodBudget(max_metric_calls=max_metric_calls, max_llm_requests=400)
    ctx = make_ctx(tmp_path, engine, budget)
    method = make_method("textgrad", T, TextGradSettings(steps=3, candidates_per_step=2, minibatch_size=4))
    policy = method.fit(ctx)
    check_within_budget(ctx, engine)
    check_history_is_real(ctx)
    steps = sorted({r["step"] for r in ctx.history})
    assert steps == list(range(expected_steps + 1))
    assert ctx.metric_calls == 6 + expected_steps * (4 + 2 * 6)  # initial + per step: minibatch + 2 candidates
    assert ctx.history[0]["val_accuracy"] == 0.0
    if expected_steps == 3:
        # The good proposal was scored 100% and accepted; earlier ones (0%) were not.
        assert KEYWORD in policy.instruction
        accepted = [r for r in ctx.history if r["accepted"] and r["step"] > 0]
        assert [(r["step"], r["val_accuracy"]) for r in accepted] == [(3, 1.0)]
        assert [r["incumbent_accuracy"] for r in ctx.history if r["step"] == 2] == [0.0, 0.0]
        # The whole instruction was shown to the optimizer, and the loss carried real failures.
        update_prompts = [r for r in engine.seen if "IMPROVED_VARIABLE" in r.messages[-1]["content"]]
        assert update_prompts and T.cot_instruction in update_prompts[0].messages[-1]["content"]
        assert any("-987654" in m["content"] for r in engine.seen for m in r.messages if m["role"] == "system")
    else:
        assert policy.instruction == T.cot_instruction


def test_textgrad_keeps_incumbent_when_tags_missing(tmp_path):
    from trprompt.methods.textgrad_task import TextGradSettings

    def no_tags(request: ChatRequest) -> str:
        content = request.messages[-1]["content"]
        if len(request.messages) == 1 and gold_of(content) is not None:
            return WRONG
        return "I would rather not use tags."

    engine = EchoEngine(no_tags)
    ctx = make_ctx(tmp_path, engine, MethodBudget(max_metric_calls=100))
    policy = make_method("textgrad", T, TextGradSettings(steps=1, candidates_per_step=2, minibatch_size=4,
                                                         max_tag_retries=1)).fit(ctx)
    assert policy.instruction == T.cot_instruction
    step1 = [r for r in ctx.history if r["step"] == 1]
    assert len(step1) == 2 and all(r["fallback"] and not r["accepted"] for r in step1)
    assert ctx.metric_calls == 6 + 4  # the fallbacks were not re-scored


# ------------------------------------------------------------------ OPRO
def test_opro_meta_prompt_ascending_and_trimmed():
    from trprompt.methods.opro import build_meta_prompt, meta_prompt_entries

    scored = [("a", 0.5), ("b", 0.1), ("c", 0.9), ("d", 0.3), ("e", 0.5)]
    assert meta_prompt_entries(scored, 3) == [("a", 0.5), ("e", 0.5), ("c", 0.9)]
    assert meta_prompt_entries(scored, 10) == [("b", 0.1), ("d", 0.3), ("a", 0.5), ("e", 0.5), ("c", 0.9)]
    text = build_meta_prompt(scored, TRAIN[:2], 3)
    listed = re.findall(r"Instruction: <INS>(.*?)</INS>\nScore: (\d+)", text)
    assert listed == [("a", "50"), ("e", "50"), ("c", "90")]
    assert "<INS>b</INS>" not in text and "<INS>d</INS>" not in text
    for p in TRAIN[:2]:
        assert p.question.strip() in text and f"Correct answer: {p.answer}" in text
    assert text.index("<INS>c</INS>") < text.index(TRAIN[0].question.strip())


def test_opro_extracts_instructions():
    from trprompt.methods.opro import extract_instruction

    assert extract_instruction("Sure! <INS>Add carefully.</INS> done") == "Add carefully."
    assert extract_instruction("<INS></INS><INS>Second.</INS>") == "Second."
    assert extract_instruction("<INS>Unclosed tag text") == "Unclosed tag text"
    assert extract_instruction("Instruction: Plain reply.\n\nextra") == "Plain reply."
    assert extract_instruction("<INS>   </INS>") is None


@pytest.mark.parametrize("max_metric_calls,steps_run", [(500, 3), (40, 2)])
def test_opro_end_to_end_within_budget(tmp_path, max_metric_calls, steps_run):
    from trprompt.methods.opro import OPROSettings

    engine = scripted_engine()
    ctx = make_ctx(tmp_path, engine, MethodBudget(max_metric_calls=max_metric_calls))
    method = make_method("opro", T, OPROSettings(steps=3, proposals_per_step=2, max_in_meta_prompt=3, exemplars=2))
    policy = method.fit(ctx)
    check_within_budget(ctx, engine)
    check_history_is_real(ctx)
    assert len(method.meta_prompts) == steps_run
    # Proposals come from one request with n = proposals_per_step at temperature 1.0.
    opro_requests = [r for r in engine.seen if "You are improving the instruction" in r.messages[-1]["content"]]
    assert len(opro_requests) == steps_run
    assert all(r.sampling.n == 2 and r.sampling.temperature == 1.0 for r in opro_requests)
    for meta in method.meta_prompts:
        scores = [int(s) for s in re.findall(r"^Score: (\d+)$", meta, re.M)]
        assert scores == sorted(scores) and 1 <= len(scores) <= 3
    # The final meta-prompt lists a 100-score instruction last; the result is the best one.
    assert KEYWORD in policy.instruction
    assert re.findall(r"^Score: (\d+)$", method.meta_prompts[-1], re.M)[-1] == "100"


# ------------------------------------------------------------------ GEPA
def test_gepa_adapter_contract(tmp_path):
    from trprompt.methods.gepa_method import COMPONENT, ProblemAdapter

    engine = scripted_engine()
    ctx = make_ctx(tmp_path, engine, MethodBudget(max_metric_calls=100))
    adapter = ProblemAdapter(ctx)
    batch = TRAIN[:3]
    good = {COMPONENT: f"Use the {KEYWORD}."}
    bad = {COMPONENT: "Guess."}
    ev = adapter.evaluate(batch, bad, capture_traces=False)
    assert len(ev.outputs) == len(ev.scores) == 3 and ev.trajectories is None
    assert ev.scores == [0.0, 0.0, 0.0]
    ev = adapter.evaluate(batch, good, capture_traces=True)
    assert ev.scores == [1.0, 1.0, 1.0] and len(ev.trajectories) == 3
    assert [t["gold"] for t in ev.trajectories] == [p.answer for p in batch]
    assert all(o["correct"] for o in ev.outputs)
    # One engine call for several (candidate, batch) pairs.
    calls = engine.calls
    both = adapter.batch_evaluate([(good, batch), (bad, TRAIN[3:5])])
    assert engine.calls == calls + 1
    assert [b.scores for b in both] == [[1.0] * 3, [0.0] * 2] and all(b.trajectories for b in both)
    # The reflective dataset carries the feedback for the component.
    wrong = adapter.evaluate(batch, bad, capture_traces=True)
    ds = adapter.make_reflective_dataset(bad, wrong, [COMPONENT])
    assert list(ds) == [COMPONENT] and len(ds[COMPONENT]) == 3
    for rec, p in zip(ds[COMPONENT], batch, strict=True):
        assert rec["Inputs"]["problem"] == p.question
        assert rec["Generated Outputs"] == WRONG
        assert rec["Feedback"].startswith("Incorrect") and f"correct answer is {p.answer}" in rec["Feedback"]
        assert "-987654" in rec["Feedback"]
    ds_ok = adapter.make_reflective_dataset(good, adapter.evaluate(batch, good, capture_traces=True), [COMPONENT])
    assert all(r["Feedback"].startswith("Correct") for r in ds_ok[COMPONENT])
    with pytest.raises(KeyError):
        adapter.make_reflective_dataset(good, wrong, ["other"])
    with pytest.raises(ValueError):
        adapter.make_reflective_dataset(good, adapter.evaluate(batch, good), [COMPONENT])
    assert ctx.metric_calls == adapter.examples_scored == 3 + 3 + 5 + 3 + 3 + 3


@pytest.mark.parametrize("max_metric_calls", [60, 25])
def test_gepa_end_to_end_within_budget(tmp_path, max_metric_calls):
    from trprompt.methods.gepa_method import GEPASettings

    engine = scripted_engine()
    ctx = make_ctx(tmp_path, engine, MethodBudget(max_metric_calls=max_metric_calls, max_llm_requests=300))
    method = make_method("gepa", T, GEPASettings(minibatch_size=3))
    policy = method.fit(ctx)
    check_within_budget(ctx, engine)
    check_history_is_real(ctx)
    res = method.result
    # gepa's own scores for every candidate equal the accuracy recomputed from scratch.
    for cand, score in zip(res.candidates, res.val_aggregate_scores, strict=True):
        assert score == pytest.approx(expected_accuracy(cand["instruction"], VAL))
    reflections = [r for r in engine.seen if "I provided an assistant" in r.messages[-1]["content"]]
    assert reflections
    # The reflection prompt carries our feedback (the correct answers of the minibatch).
    assert "the correct answer is" in reflections[0].messages[-1]["content"]
    if max_metric_calls == 60:
        assert KEYWORD in policy.instruction and len(res.candidates) >= 2


def test_gepa_needs_a_metric_budget(tmp_path):
    engine = scripted_engine()
    ctx = make_ctx(tmp_path, engine, MethodBudget())
    with pytest.raises(ValueError, match="metric-call budget"):
        make_method("gepa", T).fit(ctx)


# ------------------------------------------------------------------ TRPrompt and its ablations
def trprompt_run_config(tmp_path: Path):
    return config_from_dict({
        "run_dir": str(tmp_path / "unused"),
        "dataset": {"name": "gsm8k", "train_limit": 24, "val_limit": 6, "test_limit": 5},
        "models": {r: {"model": "fake", "engine": "echo"} for r in ("prompt_model", "target_model", "reward_model")},
        "loop": {"iterations": 1, "synthetic_size": 6},
        "reward_search": {"steps": 1, "candidates_per_step": 2, "val_questions": 4},
        "generation": {"batch_size": 8, "target_max_tokens": 64},
    })


@pytest.mark.parametrize("name", ["trprompt", "trprompt-fixed-reward", "trprompt-numeric-reward"])
def test_trprompt_variants(tmp_path, name):
    from trprompt.methods.trprompt_method import TRPromptPolicy

    engine = scripted_engine()
    sft = FakeSFT()
    ctx = make_ctx(tmp_path, engine, MethodBudget(max_llm_requests=500), run_config=trprompt_run_config(tmp_path),
                   sft_runner=sft, base_model_path="unused")
    policy = make_method(name, T).fit(ctx)
    assert isinstance(policy, TRPromptPolicy) and policy.name == name
    assert policy.adapter is not None and policy.adapter.endswith("iter1") and policy.adapter != "iter1"
    assert Path(policy.adapter_path).is_dir() and sft.calls == [policy.adapter_path]
    assert (ctx.work_dir / "run" / "best.json").exists()
    check_within_budget(ctx, engine)
    # History: the initial Π (no adapter: 0%) and Π after SFT (the adapter writes the keyword: 100%).
    by_phase = {r["phase"]: r["val_accuracy"] for r in ctx.history}
    assert by_phase["initial"] == 0.0 and by_phase["sft"] == 1.0
    reward_calls = [r for r in engine.seen if r.messages[0]["content"] == T.reward_model_system]
    rs = (ctx.work_dir / "run" / "iter_1" / "reward_search.json").read_text()
    if name == "trprompt-numeric-reward":
        assert not reward_calls
    else:
        assert reward_calls
    if name == "trprompt-fixed-reward":
        assert '"skipped": true' in rs and policy.optimal_reward == T.initial_optimal_reward
    # The spec round-trips and reloads the adapter on another engine.
    spec = policy_spec(policy)
    other = EchoEngine(Scripted())
    rebuilt = policy_from_spec(spec, other, T)
    assert isinstance(rebuilt, QueryAwarePolicy) and other.loaded == {policy.adapter: policy.adapter_path}
    assert rebuilt.instructions(VAL[:2]) == [f"Use the {KEYWORD}."] * 2


def test_trprompt_variants_do_not_share_adapter_ids(tmp_path):
    engine = scripted_engine()
    ids = []
    for name in ("trprompt", "trprompt-numeric-reward"):
        ctx = make_ctx(tmp_path / name, engine, MethodBudget(), run_config=trprompt_run_config(tmp_path),
                       sft_runner=FakeSFT(), base_model_path="unused")
        ids.append(make_method(name, T).fit(ctx).adapter)
    assert ids[0] != ids[1] and set(ids) <= set(engine.loaded)


def test_trprompt_budget_is_enforced(tmp_path):
    engine = scripted_engine()
    ctx = make_ctx(tmp_path, engine, MethodBudget(max_llm_requests=10), run_config=trprompt_run_config(tmp_path),
                   sft_runner=FakeSFT(), base_model_path="unused")
    with pytest.raises(BudgetExceededError):
        make_method("trprompt", T).fit(ctx)
    assert ctx.llm_requests <= 10 and len(engine.seen) <= 10


def test_policy_spec_roundtrip_fixed():
    p = FixedInstructionPolicy("opro", "Add the numbers.")
    assert policy_from_spec(policy_spec(p), EchoEngine(), T) == p
    with pytest.raises(ValueError):
        policy_from_spec({"kind": "nope"}, EchoEngine(), T)
