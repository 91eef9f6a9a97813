"""Step 3 of Algorithm 1: search for a better optimal textual reward t* with TextGrad.

The optimal reward t* is the text the prompt model Π is conditioned on at test
time. Each search step

1. scores the current optimal reward on the validation questions (cached after the
   first time): Π(q, t*) writes one instruction per question, the target answers
   question + instruction, answers are graded, and the reward model critiques up
   to ``failures_in_feedback`` failures;
2. turns those real results into a textual loss (``templates.reward_search_loss``
   with the accuracy and the failures) evaluated on t* by the optimizer model
   through :class:`textgrad.TextLoss`; ``loss.backward()`` leaves a textual
   gradient on t*;
3. proposes ``candidates_per_step`` new t* from TextGrad's update prompt
   (whole t* shown, see :mod:`trprompt.engines.textgrad_adapter`): ONE optimizer request
   sampling ``n = candidates_per_step`` replies at ``optimizer_temperature``, so the
   candidates are independent draws from the same t* and gradient; replies
   without the ``<IMPROVED_VARIABLE>`` tags are re-asked, then fall back to the
   current t*;
4. scores the candidates by real validation accuracy and accepts the best one only
   if it is strictly more accurate than the current t* on the same questions (ties
   keep the current t*). Accuracy is the mean grader score, so with a float metric
   (a ``python:`` grader returning a value in [0, 1]) candidates are ranked, raced and
   accepted by their summed score, not by how many answers reached a full score.

Scoring is either full (every candidate on every validation question, one fan-out)
or **racing** (``reward_search.racing.enabled``, successive halving): every
candidate is scored on the first ``first_questions`` questions, the better
``keep_fraction`` of them is extended to ``first_questions / keep_fraction``
questions, and so on (:func:`rung_sizes`); once one candidate is left it is scored
on the whole validation set. The current t* is scored on the same questions as the
challengers of every rung (its rows are cached, so this is usually free), and
acceptance is always decided on the whole validation set. All (candidate x
question) generations of one rung go to the engines as one fanned-out batch.

Scoring candidates is most of the cost (the paper reports about 70% of the run),
so :class:`FanOutRewardScorer` builds every (candidate x question) request of a
rung and sends them as one large batched stream per model role instead of one
request at a time; :func:`score_sequential` is the one-at-a-time reference used by
``bench/reward_search.py``.

Resume: every decided step and every finished racing rung is handed to
``on_candidate`` as a trace row (rung rows carry ``kind: "rung"``, the proposals,
the gradient, the survivors and the rows scored in that rung); passing the rows back
as ``start_trace`` skips finished steps and continues an interrupted step at its
next rung without asking the optimizer again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from trprompt.config import GenerationConfig, RacingConfig, RewardSearchConfig
from trprompt.data import Problem
from trprompt.engines.base import ChatRequest, ChatResult, Engine, SamplingParams
from trprompt.engines.textgrad_adapter import ProtocolTextGradEngine, propose_variants, run_backward, tg
from trprompt.engines.wrappers import generate_in_chunks
from trprompt.evaluation import SCORE_TOLERANCE, graded_row, row_score, target_requests
from trprompt.policies import clean_instruction, eval_sampling, prompt_model_request
from trprompt.templates import Templates

log = logging.getLogger(__name__)

DEFAULT_FAILURES_IN_FEEDBACK = RewardSearchConfig().failures_in_feedback
"""Failures critiqued per candidate when neither the scorer nor the search config says otherwise."""

RUNG = "rung"
"""``kind`` of the trace rows that persist a racing rung (candidate rows have no ``kind``)."""


@dataclass
class CandidateScore:
    """Validation result of one candidate optimal reward on the first ``n`` validation questions.

    ``rows`` has one dict per scored problem (id, question, instruction, output,
    extracted, gold, correct, token counts); ``failures`` holds copies of up to
    ``failures_in_feedback`` failed rows, each with the reward model's ``critique``
    once critiqued.
    """

    optimal_reward: str
    accuracy: float
    correct: int
    n: int
    rows: list[dict[str, Any]] = field(repr=False)
    failures: list[dict[str, Any]] = field(repr=False)
    critiqued: bool = field(default=False, repr=False)

    @property
    def total(self) -> float:
        """Sum of the rows' scores: the number correct for a binary grader, the summed metric for a float one.

        Candidates scored on the same questions are ranked by it (equivalently by ``accuracy``).
        """
        return sum(row_score(r) for r in self.rows)

    @property
    def perfect(self) -> bool:
        """Every question got the full score (nothing left to improve on these questions)."""
        return self.total >= self.n - SCORE_TOLERANCE


# ----------------------------------------------------------------- request builders
# Shared by the fan-out scorer and the sequential reference so both send the very
# same requests and build the very same rows.


def scoring_request(
    templates: Templates, gen: GenerationConfig, question: str, optimal_reward: str, adapter: str | None,
    seed: int = 0,
) -> ChatRequest:
    """Π(q, t) at the evaluation temperature with the run's ``seed``: the very request validation sends.

    Built by the policies module, like the validation policy's requests, so a
    candidate's score and the validation accuracy of the same Π and t* agree.
    """
    return prompt_model_request(templates, question, optimal_reward, eval_sampling(gen, seed=seed), adapter)


def reward_model_request(templates: Templates, gen: GenerationConfig, row: dict[str, Any]) -> ChatRequest:
    """R(p, q, ŷ, y*): the critique of one failed row."""
    sp = SamplingParams(temperature=gen.reward_temperature, max_tokens=gen.reward_max_tokens, seed=0)
    msgs = templates.reward_model_messages(row["question"], row["instruction"], row["output"], row["gold"])
    return ChatRequest(msgs, sp)


def _score_from_rows(optimal_reward: str, rows: list[dict[str, Any]], max_failures: int) -> CandidateScore:
    correct = sum(1 for r in rows if r["correct"])
    n = len(rows)
    failures = [dict(r) for r in rows if not r["correct"]][:max_failures]
    mean_score = sum(row_score(r) for r in rows) / n if n else 0.0
    return CandidateScore(optimal_reward, mean_score, correct, n, rows, failures)


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
    """Anything that scores candidate optimal rewards on validation (see :class:`FanOutRewardScorer`)."""

    @property
    def n(self) -> int:
        """Validation questions available."""
        ...

    def score(
        self, candidates: Sequence[str], n: int | None = None, critique: bool = True
    ) -> list[CandidateScore]:
        """One score per candidate on the first ``n`` questions (all when None), in order."""
        ...


class FanOutRewardScorer:
    """Scores candidate optimal rewards by validation accuracy, fanning all work out in large batches.

    ``score(candidates, n)`` scores each candidate on the first ``n`` validation
    questions (all when None). For the (candidate x question) pairs not scored yet:

    * every prompt-model request goes into ONE :func:`generate_sorted` stream
      (chunks of ``gen.batch_size``);
    * then every target request, also as one stream; answers are graded with
      each problem's own grader (:func:`trprompt.grading.grader_for`);
    * then (``critique=True``) the reward model critiques up to
      ``failures_in_feedback`` failures per candidate, all candidates' failures in
      one stream.

    Rows are cached per candidate text and question, so extending a candidate from
    16 to 32 questions generates only the 16 new ones. ``failures_in_feedback=None``
    lets :func:`search_optimal_reward` set it from its config (else the config
    default). ``problems`` should be the validation questions (``val_questions`` of
    them). ``seed`` is the run's seed: Π's and the target's requests are then the very
    ones validation sends, so rows validation already graded for the same Π and t* can be
    handed over with :meth:`restore`. ``generations`` counts the (candidate x question)
    pairs generated so far.
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
        seed: int = 0,
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
        self.seed = seed
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._scores: dict[tuple[str, int], CandidateScore] = {}
        self._critiques: dict[tuple[str, int], str] = {}
        self.cache_hits = 0
        self.scored = 0
        self.generations = 0

    @property
    def n(self) -> int:
        """Validation problems available (a candidate is scored on at most this many)."""
        return len(self.problems)

    def _max_failures(self) -> int:
        return DEFAULT_FAILURES_IN_FEEDBACK if self.failures_in_feedback is None else self.failures_in_feedback

    def rows_scored(self, optimal_reward: str) -> int:
        """How many leading validation questions ``optimal_reward`` has been scored on."""
        return len(self._rows.get(optimal_reward, ()))

    def rows(self, optimal_reward: str) -> list[dict[str, Any]]:
        """The graded rows of ``optimal_reward`` so far (question order)."""
        return list(self._rows.get(optimal_reward, ()))

    def restore(self, optimal_reward: str, rows: Sequence[dict[str, Any]]) -> None:
        """Reuse rows scored earlier (a resumed search, or validation of the same Π and t*) for the first questions."""
        rows = list(rows)[: self.n]
        for j, r in enumerate(rows):
            if r.get("id") != self.problems[j].id:
                raise ValueError(f"restored row {j} is for problem {r.get('id')!r}, expected "
                                 f"{self.problems[j].id!r}: the validation questions changed")
        if len(rows) > self.rows_scored(optimal_reward):
            self._rows[optimal_reward] = [dict(r) for r in rows]

    def score(
        self, candidates: Sequence[str], n: int | None = None, critique: bool = True
    ) -> list[CandidateScore]:
        """One :class:`CandidateScore` per candidate on the first ``n`` questions (all when None), in order.

        Duplicates and already scored (candidate, question) pairs are generated once;
        ``critique=False`` skips the reward model (racing rungs do not need critiques).
        """
        n = self.n if n is None else max(1, min(int(n), self.n))
        todo: list[tuple[str, int]] = []
        seen: list[str] = []
        for c in candidates:
            have = self.rows_scored(c)
            if c in seen or have >= n:
                self.cache_hits += 1
            else:
                todo.append((c, have))
            if c not in seen:
                seen.append(c)
        if todo:
            self._generate(todo, n)
        scores = {}
        for c in seen:
            key = (c, n)
            if key not in self._scores:
                self._scores[key] = _score_from_rows(c, self._rows[c][:n], self._max_failures())
            scores[c] = self._scores[key]
        if critique:
            self._critique([s for s in scores.values() if not s.critiqued])
        return [scores[c] for c in candidates]

    def _generate(self, todo: list[tuple[str, int]], n: int) -> None:
        probs, gen, tpl, bs = self.problems, self.gen, self.templates, self.gen.batch_size
        pairs = [(c, j) for c, have in todo for j in range(have, n)]
        p_reqs = [scoring_request(tpl, gen, probs[j].question, c, self.adapter, self.seed) for c, j in pairs]
        p_res = generate_sorted(self.prompt_engine, p_reqs, bs, "reward search: prompt model", self.progress)
        instructions = [clean_instruction(r.text) for r in p_res]

        t_reqs = target_requests([probs[j] for _, j in pairs], instructions, tpl, gen.target_max_tokens,
                                 gen.target_temperature, self.seed)
        t_res = generate_sorted(self.target_engine, t_reqs, bs, "reward search: target", self.progress)
        for (c, j), ins, res in zip(pairs, instructions, t_res, strict=True):
            rows = self._rows.setdefault(c, [])
            assert len(rows) == j, "rows are filled in question order"
            rows.append(graded_row(probs[j], ins, res))
        self.scored += len(todo)
        self.generations += len(pairs)

    def _critique(self, scores: list[CandidateScore]) -> None:
        """Give every failure of ``scores`` its critique; the missing ones in one reward-model stream."""
        todo: list[tuple[str, int, dict[str, Any]]] = []
        for s in scores:
            failed = [j for j, r in enumerate(s.rows) if not r["correct"]][: len(s.failures)]
            for j, f in zip(failed, s.failures, strict=True):
                if (s.optimal_reward, j) not in self._critiques:
                    todo.append((s.optimal_reward, j, f))
        if todo:
            reqs = [reward_model_request(self.templates, self.gen, f) for _, _, f in todo]
            res = generate_sorted(self.reward_engine, reqs, self.gen.batch_size, "reward search: reward model",
                                  self.progress)
            for (c, j, _), r in zip(todo, res, strict=True):
                self._critiques[(c, j)] = r.text.strip()
        for s in scores:
            failed = [j for j, r in enumerate(s.rows) if not r["correct"]][: len(s.failures)]
            for j, f in zip(failed, s.failures, strict=True):
                f["critique"] = self._critiques[(s.optimal_reward, j)]
            s.critiqued = True


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
    seed: int = 0,
) -> list[CandidateScore]:
    """Reference scorer: the same requests as :class:`FanOutRewardScorer`, sent one at a time, no cache.

    This is how a TextGrad-style loop evaluates a prompt (one call per question
    per model); ``bench/reward_search.py`` times it against the fan-out.
    """
    out: list[CandidateScore] = []
    for cand in candidates:
        rows = []
        for p in problems:
            (pr,) = prompt_engine.generate([scoring_request(templates, gen, p.question, cand, adapter, seed)])
            ins = clean_instruction(pr.text)
            (treq,) = target_requests([p], [ins], templates, gen.target_max_tokens, gen.target_temperature, seed)
            (tr,) = target_engine.generate([treq])
            rows.append(graded_row(p, ins, tr))
        score = _score_from_rows(cand, rows, failures_in_feedback)
        score.critiqued = True
        for f in score.failures:
            (rr,) = reward_engine.generate([reward_model_request(templates, gen, f)])
            f["critique"] = rr.text.strip()
        out.append(score)
    return out


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
    fallback, incumbent_accuracy, candidates_in_step, gradient, questions_per_rung).
    ``n`` is how many validation questions the candidate was scored on (fewer than
    all when racing dropped it early) and ``incumbent_accuracy`` is the then current
    t*'s accuracy on those same questions. Racing's rung rows are not in ``trace``
    (they go to ``on_candidate`` only).
    """

    optimal_reward: str
    best_accuracy: float
    initial_accuracy: float
    trace: list[dict[str, Any]]
    steps_run: int
    generations: int = 0

    @property
    def best_reward(self) -> str:
        """Old name of :attr:`optimal_reward` (kept for callers written before the rename)."""
        return self.optimal_reward


def finished_steps(trace: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The complete steps ``0, 1, 2, ...`` of a (possibly interrupted, possibly re-appended) trace.

    Racing's rung rows (``kind: "rung"``) are skipped. Candidate rows are grouped
    into runs (a run starts at a new step number or at index 0); a run is complete
    when it holds ``candidates_in_step`` rows. For each step the last complete run
    wins; the result stops at the first step with none.
    """
    runs: list[list[dict[str, Any]]] = []
    for row in trace:
        if row.get("kind") == RUNG:
            continue
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


def rung_sizes(total: int, racing: RacingConfig) -> list[int]:
    """Questions per racing rung: ``first_questions``, then divided by ``keep_fraction`` each rung, up to ``total``.

    With racing off (or ``total <= first_questions``) there is one rung: ``[total]``.
    Example: 64 questions, 16 first, keep 0.5 -> ``[16, 32, 64]``.
    """
    if not racing.enabled or total <= racing.first_questions:
        return [total]
    sizes = [racing.first_questions]
    while sizes[-1] < total:
        sizes.append(min(total, max(sizes[-1] + 1, math.ceil(sizes[-1] / racing.keep_fraction))))
    return sizes


def survivors(scores: Mapping[int, float], keep_fraction: float) -> list[int]:
    """The better ``keep_fraction`` of the candidates (at least one) by summed score.

    ``scores`` maps candidate index -> the sum of its scores on the rung's questions
    (:attr:`CandidateScore.total`: the number answered right for a binary grader, the
    summed metric for a float one; all candidates scored on the same questions). Ties
    go to the lower index (the earlier proposal). Returns the kept indices in ascending order.
    """
    k = max(1, math.floor(keep_fraction * len(scores) + 1e-9))
    ranked = sorted(scores, key=lambda i: (-round(scores[i], 9), i))  # float noise does not break a tie
    return sorted(ranked[:k])


@dataclass
class _Race:
    """State of one step's race (persisted as rung rows)."""

    texts: list[str]
    fallback: list[bool]
    gradient: str
    alive: list[int]
    next_rung: int
    reached: dict[int, list[int]]  # candidate -> question counts of the rungs it ran


def search_optimal_reward(
    optimal_reward: str,
    scorer: RewardScorer,
    optimizer_engine: Engine,
    cfg: RewardSearchConfig,
    templates: Templates,
    on_candidate: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    start_trace: Sequence[dict[str, Any]] | None = None,
    seed: int = 0,
) -> RewardSearchResult:
    """Run ``cfg.steps`` TextGrad steps on the optimal reward, accepting only candidates that raise accuracy.

    ``optimal_reward`` is the starting t*. ``scorer`` evaluates texts (its
    ``problems`` are the validation questions). ``optimizer_engine`` serves both
    TextGrad roles: the loss evaluation and the backward (gradient) call at
    temperature 0, and candidate proposals at ``cfg.optimizer_temperature``. With
    ``cfg.racing.enabled`` the candidates are raced (see the module docstring).
    Every trace row is passed to ``on_candidate`` as soon as its step (or racing
    rung) is decided, so persisting them makes the search resumable: pass them back
    as ``start_trace`` and finished steps are skipped (the optimal reward is rebuilt
    from the accepted rows) and an interrupted race continues at its next rung. The
    search stops early once t* answers every validation question.
    """
    if getattr(scorer, "failures_in_feedback", 0) is None:
        scorer.failures_in_feedback = cfg.failures_in_feedback  # type: ignore[attr-defined]
    generations_before = int(getattr(scorer, "generations", 0))

    def emit(row: dict[str, Any]) -> None:
        if row.get("kind") != RUNG:
            trace.append(row)
        if on_candidate is not None:
            on_candidate(row)

    start_trace = list(start_trace or [])
    done = finished_steps(start_trace)
    trace: list[dict[str, Any]] = [row for step in done for row in step]
    if done:
        initial_accuracy = float(done[0][0]["accuracy"])
        optimal_reward = str(done[0][0]["text"])
        for step_rows in done[1:]:
            for row in step_rows:
                if row["accepted"]:
                    optimal_reward = str(row["text"])
        log.info("reward search: resuming after %d finished steps", len(done) - 1)
    else:
        (s0,) = scorer.score([optimal_reward])
        initial_accuracy = s0.accuracy
        emit(_row(0, 0, 1, s0, accepted=True, fallback=False, incumbent_accuracy=None, gradient="",
                  questions_per_rung=[s0.n]))
    steps_done = max(0, len(done) - 1)
    pending = _pending_race(start_trace, steps_done + 1, scorer)

    critic = ProtocolTextGradEngine(optimizer_engine, temperature=0.0, max_tokens=cfg.optimizer_max_tokens, seed=seed)
    proposer = ProtocolTextGradEngine(
        optimizer_engine, temperature=cfg.optimizer_temperature, max_tokens=cfg.optimizer_max_tokens, seed=seed + 1
    )
    variable = tg.Variable(optimal_reward, role_description=templates.optimal_reward_role, requires_grad=True)
    optimizer = tg.TextualGradientDescent(parameters=[variable], engine=proposer)
    sizes = rung_sizes(scorer.n, cfg.racing)

    bar = tqdm(range(steps_done + 1, cfg.steps + 1), desc="reward search", disable=not progress, leave=False)
    for step in bar:
        current = scorer.score([optimal_reward])[0]
        if current.perfect:
            log.info("reward search: the optimal reward answers all %d validation questions; stopping", current.n)
            break
        if pending is not None:
            race, pending = pending, None
            log.info("reward search step %d: resuming the race at rung %d", step, race.next_rung + 1)
        else:
            race = _propose(step, optimal_reward, current, variable, optimizer, critic, cfg, templates, sizes)
        best_i = _run_race(step, race, optimal_reward, scorer, sizes, cfg.racing, emit)

        texts = race.texts
        for i, text in enumerate(texts):
            raced_as = next((j for j in race.reached if texts[j] == text), None)
            n = race.reached[raced_as][-1] if raced_as is not None else scorer.n
            s = scorer.score([text], n=n, critique=False)[0]
            inc = scorer.score([optimal_reward], n=n, critique=False)[0]
            emit(_row(step, i, len(texts), s, accepted=i == best_i, fallback=race.fallback[i],
                      incumbent_accuracy=inc.accuracy, gradient=race.gradient,
                      questions_per_rung=list(race.reached.get(i, [n]))))
        if best_i is not None:
            log.info("reward search step %d: accepted candidate %d (%.3f > %.3f)", step, best_i,
                     scorer.score([texts[best_i]], critique=False)[0].accuracy, current.accuracy)
            optimal_reward = texts[best_i]
        steps_done = step
        bar.set_postfix(acc=f"{scorer.score([optimal_reward], critique=False)[0].accuracy:.3f}")
    bar.close()

    best_accuracy = _trace_accuracy(trace, optimal_reward)
    generations = int(getattr(scorer, "generations", 0)) - generations_before
    return RewardSearchResult(optimal_reward, best_accuracy, initial_accuracy, trace, steps_done, generations)


def _propose(
    step: int,
    optimal_reward: str,
    current: CandidateScore,
    variable: Any,
    optimizer: Any,
    critic: ProtocolTextGradEngine,
    cfg: RewardSearchConfig,
    templates: Templates,
    sizes: list[int],
) -> _Race:
    """Loss on the real validation results, gradient on t*, K candidates from the same t* and gradient."""
    variable.set_value(optimal_reward)
    optimizer.zero_grad()
    loss_fn = tg.TextLoss(build_loss_text(templates, current, cfg.failures_in_feedback), engine=critic)
    loss = loss_fn(variable)
    run_backward(loss, critic, variable)
    gradient = variable.get_gradient_text()
    proposals = propose_variants(optimizer, variable, cfg.candidates_per_step, cfg.max_tag_retries)
    variable.set_value(optimal_reward)
    texts = list(proposals.texts)
    fallback = [i >= len(texts) - proposals.kept_incumbent for i in range(len(texts))]
    return _new_race(texts, fallback, gradient, optimal_reward, sizes)


def _new_race(texts: list[str], fallback: list[bool], gradient: str, optimal_reward: str, sizes: list[int]) -> _Race:
    # The challengers: real proposals that differ from t* and from every earlier proposal.
    alive = [i for i, t in enumerate(texts) if not fallback[i] and t != optimal_reward and t not in texts[:i]]
    first = 0 if len(alive) > 1 else len(sizes) - 1  # a lone challenger goes straight to the full set
    return _Race(texts, fallback, gradient, alive, first, {})


def pick_candidate(
    candidates: Sequence[str], optimal_reward: str, scorer: RewardScorer, racing: RacingConfig
) -> tuple[int | None, dict[int, list[int]]]:
    """Score ``candidates`` against the current ``optimal_reward`` as one search step does (racing or not).

    Returns the accepted index (None: keep t*) and, per raced candidate, the
    question counts of the rungs it ran. Used by ``bench/racing.py``.
    """
    sizes = rung_sizes(scorer.n, racing)
    race = _new_race(list(candidates), [False] * len(candidates), "", optimal_reward, sizes)
    best = _run_race(0, race, optimal_reward, scorer, sizes, racing, lambda row: None)
    return best, race.reached


def _run_race(
    step: int,
    race: _Race,
    optimal_reward: str,
    scorer: RewardScorer,
    sizes: list[int],
    racing: RacingConfig,
    emit: Callable[[dict[str, Any]], None],
) -> int | None:
    """Score the challengers rung by rung; return the accepted index (None: keep t*).

    Each rung is ONE :meth:`RewardScorer.score` call holding t* and every surviving
    challenger on the rung's questions. After every rung but the last a rung row is
    emitted so an interrupted race resumes there.
    """
    while race.alive:
        n = sizes[race.next_rung]
        before = {i: _rows_scored(scorer, race.texts[i]) for i in race.alive}
        inc, *scores = scorer.score([optimal_reward] + [race.texts[i] for i in race.alive], n=n, critique=False)
        for i in race.alive:
            race.reached.setdefault(i, []).append(n)
        if n >= scorer.n:  # the full set: the best challenger must beat t*'s summed score
            best = None
            for i, s in zip(race.alive, scores, strict=True):
                if s.total > inc.total + SCORE_TOLERANCE and (best is None or s.total > best[1] + SCORE_TOLERANCE):
                    best = (i, s.total)
            return None if best is None else best[0]
        kept = survivors({i: s.total for i, s in zip(race.alive, scores, strict=True)}, racing.keep_fraction)
        log.info("reward search step %d rung %d: %d questions, kept %s of %s (t* %.3f/%d)", step,
                 race.next_rung + 1, n, kept, race.alive, inc.total, inc.n)
        new_rows = {str(i): {"start": before[i], "rows": _rows_of(scorer, race.texts[i])[before[i]:n]}
                    for i in race.alive}
        race.alive = kept
        race.next_rung = len(sizes) - 1 if len(kept) == 1 else race.next_rung + 1
        emit({"kind": RUNG, "step": step, "rung": max(len(v) for v in race.reached.values()), "n": n,
              "candidates": race.texts, "fallback": race.fallback, "gradient": race.gradient,
              "alive": race.alive, "next_rung": race.next_rung,
              "reached": {str(i): v for i, v in race.reached.items()}, "new_rows": new_rows,
              "incumbent_correct": inc.correct, "incumbent_score": inc.total})
    return None


def _rows_scored(scorer: RewardScorer, text: str) -> int:
    fn = getattr(scorer, "rows_scored", None)
    return int(fn(text)) if fn is not None else 0


def _rows_of(scorer: RewardScorer, text: str) -> list[dict[str, Any]]:
    fn = getattr(scorer, "rows", None)
    return list(fn(text)) if callable(fn) else []


def _pending_race(trace: Sequence[dict[str, Any]], step: int, scorer: RewardScorer) -> _Race | None:
    """The interrupted race of ``step`` from its rung rows (None: there is none); scored rows go back to the scorer."""
    rungs = [r for r in trace if r.get("kind") == RUNG and int(r["step"]) == step]
    if not rungs:
        return None
    last = rungs[-1]
    texts = [str(t) for t in last["candidates"]]
    rows: dict[int, list[dict[str, Any]]] = {}
    for r in rungs:
        for key, delta in r.get("new_rows", {}).items():
            i = int(key)
            have = rows.setdefault(i, [])
            if int(delta["start"]) == len(have):
                have.extend(delta["rows"])
    restore = getattr(scorer, "restore", None)
    if restore is not None:
        for i, rs in rows.items():
            restore(texts[i], rs)
    return _Race(texts, [bool(f) for f in last["fallback"]], str(last["gradient"]), [int(i) for i in last["alive"]],
                 int(last["next_rung"]), {int(k): [int(x) for x in v] for k, v in last["reached"].items()})


def _trace_accuracy(trace: Sequence[dict[str, Any]], text: str) -> float:
    """Accuracy of ``text`` in its trace row with the most questions (the latest such row)."""
    rows = [r for r in trace if r["text"] == text]
    if not rows:
        raise KeyError("the optimal reward is not in the trace")
    most = max(int(r.get("n", 0)) for r in rows)
    return float([r for r in rows if int(r.get("n", 0)) == most][-1]["accuracy"])


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
    questions_per_rung: list[int],
) -> dict[str, Any]:
    return {
        "step": step,
        "index": index,
        "candidates_in_step": count,
        "text": score.optimal_reward,
        "accuracy": score.accuracy,
        "correct": score.correct,
        "n": score.n,
        "accepted": accepted,
        "fallback": fallback,
        "incumbent_accuracy": incumbent_accuracy,
        "gradient": gradient,
        "questions_per_rung": questions_per_rung,
    }
