"""Step 3 of Algorithm 1: search for a better optimal textual reward t* with TextGrad.

The optimal reward t* is the text the prompt model Π is conditioned on at test
time. Each search step

1. scores the incumbent t* on the validation questions (cached after the first time):
   Π(q, t*) writes one instruction per question, the target answers
   question + instruction, answers are graded, and the reward model critiques up
   to ``failures_in_feedback`` failures;
2. turns those real results into a textual loss (``templates.reward_search_loss``
   with the accuracy and the failures) evaluated on t* by the optimizer model
   through :class:`textgrad.TextLoss`; ``loss.backward()`` leaves a textual
   gradient on t*;
3. proposes ``candidates_per_step`` new t* from TextGrad's update prompt
   (whole t* shown, see :mod:`trprompt.textgrad_engine`): ONE optimizer request
   sampling ``n = candidates_per_step`` replies at ``optimizer_temperature``, so the
   candidates are independent draws from the same incumbent and gradient; replies
   without the ``<IMPROVED_VARIABLE>`` tags are re-asked, then fall back to the
   incumbent;
4. scores every candidate by real validation accuracy in ONE fan-out
   (:meth:`FanOutRewardScorer.score`) and accepts the best one only if it is
   strictly more accurate than the incumbent (ties keep the incumbent).

Scoring candidates is most of the cost (the paper reports about 70% of the run),
so :class:`FanOutRewardScorer` builds every (candidate x question) request of a
stage and sends them as one large batched stream per model role instead of one
request at a time; :func:`score_sequential` is the one-at-a-time reference used by
``bench/reward_search.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from trprompt.config import GenerationConfig, RewardSearchConfig
from trprompt.data import Problem
from trprompt.engines.base import ChatRequest, ChatResult, Engine, SamplingParams
from trprompt.evaluation import clean_instruction, generate_in_chunks, target_requests
from trprompt.grading import grade
from trprompt.templates import Templates
from trprompt.textgrad_engine import ProtocolTextGradEngine, propose_variants, run_backward, tg

log = logging.getLogger(__name__)

DEFAULT_FAILURES_IN_FEEDBACK = RewardSearchConfig().failures_in_feedback
"""Failures critiqued per candidate when neither the scorer nor the search config says otherwise."""


@dataclass
class CandidateScore:
    """Validation result of one candidate t*.

    ``rows`` has one dict per validation problem (id, question, instruction,
    output, extracted, gold, correct, token counts); ``failures`` holds copies of
    up to ``failures_in_feedback`` failed rows, each with the reward model's
    ``critique``.
    """

    reward: str
    accuracy: float
    correct: int
    n: int
    rows: list[dict[str, Any]] = field(repr=False)
    failures: list[dict[str, Any]] = field(repr=False)


# ----------------------------------------------------------------- request builders
# Shared by the fan-out scorer and the sequential reference so both send the very
# same requests and build the very same rows.


def prompt_model_request(
    templates: Templates, gen: GenerationConfig, question: str, reward: str, adapter: str | None
) -> ChatRequest:
    """Π(q, t) at the evaluation temperature (deterministic scoring)."""
    sp = SamplingParams(temperature=gen.prompt_eval_temperature, max_tokens=gen.prompt_max_tokens, seed=0)
    return ChatRequest(templates.prompt_model_messages(question, reward), sp, adapter=adapter)


def reward_model_request(templates: Templates, gen: GenerationConfig, row: dict[str, Any]) -> ChatRequest:
    """R(p, q, ŷ, y*): the critique of one failed row."""
    sp = SamplingParams(temperature=gen.reward_temperature, max_tokens=gen.reward_max_tokens, seed=0)
    msgs = templates.reward_model_messages(row["question"], row["instruction"], row["output"], row["gold"])
    return ChatRequest(msgs, sp)


def graded_row(problem: Problem, instruction: str, result: ChatResult) -> dict[str, Any]:
    """One validation row: the target's answer to question + instruction, graded."""
    g = grade(problem.dataset, result.text, problem.answer)
    return {
        "id": problem.id,
        "question": problem.question,
        "instruction": instruction,
        "output": result.text,
        "extracted": g.extracted,
        "gold": problem.answer,
        "correct": bool(g.correct),
        "target_prompt_tokens": result.prompt_tokens,
        "target_completion_tokens": result.completion_tokens,
    }


def _score_from_rows(reward: str, rows: list[dict[str, Any]], max_failures: int) -> CandidateScore:
    correct = sum(1 for r in rows if r["correct"])
    n = len(rows)
    failures = [dict(r) for r in rows if not r["correct"]][:max_failures]
    return CandidateScore(reward, correct / n if n else 0.0, correct, n, rows, failures)


def generate_sorted(
    engine: Engine,
    requests: Sequence[ChatRequest],
    chunk_size: int,
    desc: str | None = None,
    progress: bool = True,
) -> list[ChatResult]:
    """Like :func:`generate_in_chunks`, but requests are sent shortest-prompt first (results in request order).

    Chunks of similar-length prompts waste less on padding in engines that batch
    a chunk as one padded tensor.
    """
    order = sorted(range(len(requests)), key=lambda i: sum(len(m["content"]) for m in requests[i].messages))
    res = generate_in_chunks(engine, [requests[i] for i in order], chunk_size, desc, progress)
    out: list[ChatResult | None] = [None] * len(requests)
    for pos, i in enumerate(order):
        out[i] = res[pos]
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------- scorers


class RewardScorer(Protocol):
    """Anything that scores candidate rewards on validation (see :class:`FanOutRewardScorer`)."""

    def score(self, candidates: Sequence[str]) -> list[CandidateScore]:
        """One score per candidate, in order."""
        ...


class FanOutRewardScorer:
    """Scores candidate rewards by validation accuracy, fanning all work out in large batches.

    For the candidates of one :meth:`score` call that are not cached yet:

    * every (candidate x question) prompt-model request goes into ONE
      :func:`generate_sorted` stream (chunks of ``gen.batch_size``);
    * then every target request, also as one stream; answers are graded with
      :func:`trprompt.grading.grade` using each problem's own dataset;
    * then the reward model critiques up to ``failures_in_feedback`` failures per
      candidate, all candidates' failures in one stream.

    Scores are cached by exact candidate text. ``failures_in_feedback=None`` lets
    :func:`search_optimal_reward` set it from its config (else the config default).
    ``problems`` should be the validation questions (``val_questions`` of them).
    """

    def __init__(
        self,
        prompt_engine: Engine,
        target_engine: Engine,
        reward_engine: Engine,
        problems: Sequence[Problem],
        templates: Templates,
        gen: GenerationConfig,
        adapter: str | None = None,
        failures_in_feedback: int | None = None,
        progress: bool = False,
    ) -> None:
        if not problems:
            raise ValueError("FanOutRewardScorer needs at least one validation problem")
        self.prompt_engine = prompt_engine
        self.target_engine = target_engine
        self.reward_engine = reward_engine
        self.problems = list(problems)
        self.templates = templates
        self.gen = gen
        self.adapter = adapter
        self.failures_in_feedback = failures_in_feedback
        self.progress = progress
        self.cache: dict[str, CandidateScore] = {}
        self.cache_hits = 0
        self.scored = 0

    @property
    def n(self) -> int:
        """Validation problems each candidate is scored on."""
        return len(self.problems)

    def _max_failures(self) -> int:
        return DEFAULT_FAILURES_IN_FEEDBACK if self.failures_in_feedback is None else self.failures_in_feedback

    def score(self, candidates: Sequence[str]) -> list[CandidateScore]:
        """One :class:`CandidateScore` per candidate, in order (duplicates and cached texts scored once)."""
        new: list[str] = []
        for c in candidates:
            if c in self.cache or c in new:
                self.cache_hits += 1
            else:
                new.append(c)
        if new:
            self._score_new(new)
        return [self.cache[c] for c in candidates]

    def _score_new(self, new: list[str]) -> None:
        probs, gen, tpl, bs = self.problems, self.gen, self.templates, self.gen.batch_size
        p_reqs = [prompt_model_request(tpl, gen, p.question, c, self.adapter) for c in new for p in probs]
        p_res = generate_sorted(self.prompt_engine, p_reqs, bs, "reward search: prompt model", self.progress)
        instructions = [clean_instruction(r.text) for r in p_res]

        t_reqs = target_requests(probs * len(new), instructions, tpl, gen.target_max_tokens, gen.target_temperature)
        t_res = generate_sorted(self.target_engine, t_reqs, bs, "reward search: target", self.progress)

        scores: list[CandidateScore] = []
        for ci, cand in enumerate(new):
            lo = ci * len(probs)
            rows = [graded_row(p, instructions[lo + j], t_res[lo + j]) for j, p in enumerate(probs)]
            scores.append(_score_from_rows(cand, rows, self._max_failures()))

        failed = [f for s in scores for f in s.failures]
        if failed:
            r_reqs = [reward_model_request(tpl, gen, f) for f in failed]
            r_res = generate_sorted(self.reward_engine, r_reqs, bs, "reward search: reward model", self.progress)
            for f, r in zip(failed, r_res, strict=True):
                f["critique"] = r.text.strip()
        for s in scores:
            self.cache[s.reward] = s
        self.scored += len(new)


def score_sequential(
    prompt_engine: Engine,
    target_engine: Engine,
    reward_engine: Engine,
    problems: Sequence[Problem],
    templates: Templates,
    gen: GenerationConfig,
    candidates: Sequence[str],
    adapter: str | None = None,
    failures_in_feedback: int = DEFAULT_FAILURES_IN_FEEDBACK,
) -> list[CandidateScore]:
    """Reference scorer: the same requests as :class:`FanOutRewardScorer`, sent one at a time, no cache.

    This is how a TextGrad-style loop evaluates a prompt (one call per question
    per model); ``bench/reward_search.py`` times it against the fan-out.
    """
    out: list[CandidateScore] = []
    for cand in candidates:
        rows = []
        for p in problems:
            (pr,) = prompt_engine.generate([prompt_model_request(templates, gen, p.question, cand, adapter)])
            ins = clean_instruction(pr.text)
            (treq,) = target_requests([p], [ins], templates, gen.target_max_tokens, gen.target_temperature)
            (tr,) = target_engine.generate([treq])
            rows.append(graded_row(p, ins, tr))
        score = _score_from_rows(cand, rows, failures_in_feedback)
        for f in score.failures:
            (rr,) = reward_engine.generate([reward_model_request(templates, gen, f)])
            f["critique"] = rr.text.strip()
        out.append(score)
    return out


# ----------------------------------------------------------------- the search


def format_failures(failures: Sequence[dict[str, Any]], max_field_chars: int = 800) -> str:
    """The failed examples as text for the loss (long fields are cut, keeping their end)."""

    def cut(s: Any) -> str:
        s = str(s).strip()
        return s if len(s) <= max_field_chars else "..." + s[-max_field_chars:]

    blocks = []
    for i, f in enumerate(failures, 1):
        blocks.append(
            f"Example {i}\n"
            f"Problem: {cut(f['question'])}\n"
            f"Instruction given: {cut(f['instruction'])}\n"
            f"Assistant's answer: {cut(f['output'])}\n"
            f"Correct answer: {cut(f['gold'])}\n"
            f"Reviewer's critique: {cut(f.get('critique', ''))}"
        )
    return "\n\n".join(blocks) if blocks else "(none: every validation problem was answered correctly)"


def build_loss_text(templates: Templates, score: CandidateScore, max_failures: int | None = None) -> str:
    """``templates.reward_search_loss`` filled with the incumbent's real validation results."""
    failures = score.failures if max_failures is None else score.failures[:max_failures]
    return templates.format(
        "reward_search_loss",
        accuracy_pct=100.0 * score.accuracy,
        n=score.n,
        failures=format_failures(failures),
    )


@dataclass
class RewardSearchResult:
    """Outcome of :func:`search_optimal_reward`.

    ``trace`` has one row per scored text: the initial t* (step 0) and every
    candidate of every step (step, index, text, accuracy, correct, n, accepted,
    fallback, incumbent_accuracy, candidates_in_step, gradient).
    """

    best_reward: str
    best_accuracy: float
    initial_accuracy: float
    trace: list[dict[str, Any]]
    steps_run: int


def finished_steps(trace: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The complete steps ``0, 1, 2, ...`` of a (possibly interrupted, possibly re-appended) trace.

    Rows are grouped into runs (a run starts at a new step number or at index 0);
    a run is complete when it holds ``candidates_in_step`` rows. For each step the
    last complete run wins; the result stops at the first step with none.
    """
    runs: list[list[dict[str, Any]]] = []
    for row in trace:
        if runs and runs[-1][-1]["step"] == row["step"] and row.get("index", 0) != 0:
            runs[-1].append(row)
        else:
            runs.append([row])
    complete: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        if len(run) == int(run[0].get("candidates_in_step", 1)):
            complete[int(run[0]["step"])] = run
    out = []
    s = 0
    while s in complete:
        out.append(complete[s])
        s += 1
    return out


def search_optimal_reward(
    initial: str,
    scorer: RewardScorer,
    optimizer_engine: Engine,
    cfg: RewardSearchConfig,
    templates: Templates,
    on_candidate: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    start_trace: Sequence[dict[str, Any]] | None = None,
    seed: int = 0,
) -> RewardSearchResult:
    """Run ``cfg.steps`` TextGrad steps on t*, accepting only candidates that raise validation accuracy.

    ``scorer`` evaluates texts (its ``problems`` are the validation questions).
    ``optimizer_engine`` serves both TextGrad roles: the loss evaluation and the
    backward (gradient) call at temperature 0, and candidate proposals at
    ``cfg.optimizer_temperature``. Every trace row is passed to ``on_candidate``
    as soon as its step is decided, so persisting them makes the search
    resumable: pass them back as ``start_trace`` and finished steps are skipped
    (the incumbent is rebuilt from the accepted rows). The search stops early once
    the incumbent answers every validation question.
    """
    if getattr(scorer, "failures_in_feedback", 0) is None:
        scorer.failures_in_feedback = cfg.failures_in_feedback

    def emit(row: dict[str, Any]) -> None:
        trace.append(row)
        if on_candidate is not None:
            on_candidate(row)

    done = finished_steps(start_trace or [])
    trace: list[dict[str, Any]] = [row for step in done for row in step]
    if done:
        initial_accuracy = float(done[0][0]["accuracy"])
        incumbent = str(done[0][0]["text"])
        for step_rows in done[1:]:
            for row in step_rows:
                if row["accepted"]:
                    incumbent = str(row["text"])
        log.info("reward search: resuming after %d finished steps", len(done) - 1)
    else:
        (s0,) = scorer.score([initial])
        initial_accuracy = s0.accuracy
        incumbent = initial
        emit(_row(0, 0, 1, s0, accepted=True, fallback=False, incumbent_accuracy=None, gradient=""))
    steps_done = max(0, len(done) - 1)

    critic = ProtocolTextGradEngine(optimizer_engine, temperature=0.0, max_tokens=cfg.optimizer_max_tokens, seed=seed)
    proposer = ProtocolTextGradEngine(
        optimizer_engine, temperature=cfg.optimizer_temperature, max_tokens=cfg.optimizer_max_tokens, seed=seed + 1
    )
    t_star = tg.Variable(incumbent, role_description=templates.optimal_reward_role, requires_grad=True)
    optimizer = tg.TextualGradientDescent(parameters=[t_star], engine=proposer)

    bar = tqdm(range(steps_done + 1, cfg.steps + 1), desc="reward search", disable=not progress, leave=False)
    for step in bar:
        inc = scorer.score([incumbent])[0]
        if inc.correct == inc.n:
            log.info("reward search: incumbent answers all %d validation questions; stopping", inc.n)
            break
        # Loss on the real validation results, gradient on t*.
        t_star.set_value(incumbent)
        optimizer.zero_grad()
        loss_fn = tg.TextLoss(build_loss_text(templates, inc, cfg.failures_in_feedback), engine=critic)
        loss = loss_fn(t_star)
        run_backward(loss, critic, t_star)
        gradient = t_star.get_gradient_text()

        # K candidates from the same incumbent and gradient, then one fan-out to score them all.
        proposals = propose_variants(optimizer, t_star, cfg.candidates_per_step, cfg.max_tag_retries)
        t_star.set_value(incumbent)
        fallback = [i >= len(proposals.texts) - proposals.kept_incumbent for i in range(len(proposals.texts))]
        scores = scorer.score(proposals.texts)

        best_i: int | None = None
        for i, s in enumerate(scores):
            if fallback[i] or s.reward == incumbent:
                continue
            if s.accuracy > inc.accuracy and (best_i is None or s.accuracy > scores[best_i].accuracy):
                best_i = i
        for i, s in enumerate(scores):
            emit(_row(step, i, len(scores), s, accepted=i == best_i, fallback=fallback[i],
                      incumbent_accuracy=inc.accuracy, gradient=gradient))
        if best_i is not None:
            incumbent = scores[best_i].reward
            log.info("reward search step %d: accepted candidate %d (%.3f > %.3f)", step, best_i,
                     scores[best_i].accuracy, inc.accuracy)
        steps_done = step
        bar.set_postfix(acc=f"{scorer.score([incumbent])[0].accuracy:.3f}")
    bar.close()

    best_accuracy = _trace_accuracy(trace, incumbent)
    return RewardSearchResult(incumbent, best_accuracy, initial_accuracy, trace, steps_done)


def _trace_accuracy(trace: Sequence[dict[str, Any]], text: str) -> float:
    for row in reversed(trace):
        if row["text"] == text:
            return float(row["accuracy"])
    raise KeyError("the incumbent is not in the trace")


def _row(
    step: int,
    index: int,
    count: int,
    score: CandidateScore,
    *,
    accepted: bool,
    fallback: bool,
    incumbent_accuracy: float | None,
    gradient: str,
) -> dict[str, Any]:
    return {
        "step": step,
        "index": index,
        "candidates_in_step": count,
        "text": score.reward,
        "accuracy": score.accuracy,
        "correct": score.correct,
        "n": score.n,
        "accepted": accepted,
        "fallback": fallback,
        "incumbent_accuracy": incumbent_accuracy,
        "gradient": gradient,
    }
