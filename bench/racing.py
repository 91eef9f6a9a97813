"""Racing (successive halving) vs full scoring of the optimal-reward candidates: who picks the best, at what cost.

Two parts:

``scripted`` (default, seconds): candidates of known true accuracy, ``--spread``
points apart around the current t*, answer each validation question right or wrong
at random: with probability ``--rho`` through a per-question difficulty shared by
all candidates (real candidates fail on the same hard questions), otherwise on their
own. Over ``--trials`` seeded trials, both rules score the same sampled answers
(:func:`trprompt.reward_search.pick_candidate`, the code one search step runs) and
the table gives how often each picks the truly best text (a challenger, or t* when
none is better), the mean accuracy points lost against the best, and the fraction
of the challengers' (candidate x question) generations spent. ``diff`` is racing
minus full in picks of the best, with a 95% interval (paired: same answers).

``embedded`` (minutes): the real SmolLM2 engine scores ``--candidates`` optimal
rewards on ``--questions`` validation questions once (every candidate on every
question; greedy decoding, so racing would see the same answers); then the same
comparison is replayed on bootstrap resamples of the questions, the "best" being the
candidate most accurate on all of them.

    python bench/racing.py --trials 4000
    python bench/racing.py embedded --questions 48 --candidates 4 --dtype auto --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trprompt.config import RacingConfig  # noqa: E402
from trprompt.reward_search import CandidateScore, pick_candidate  # noqa: E402


class MatrixScorer:
    """A :class:`~trprompt.reward_search.RewardScorer` over a fixed right/wrong matrix (one row per text)."""

    def __init__(self, correct: dict[str, np.ndarray]) -> None:
        self.correct = correct
        self._n = len(next(iter(correct.values())))
        self.scored: dict[str, int] = {}
        self.generations = 0

    @property
    def n(self) -> int:
        return self._n

    def rows_scored(self, text: str) -> int:
        return self.scored.get(text, 0)

    def score(self, candidates: Sequence[str], n: int | None = None, critique: bool = True) -> list[CandidateScore]:
        n = self._n if n is None else min(n, self._n)
        out = []
        for c in candidates:
            have = self.scored.get(c, 0)
            if have < n:
                self.generations += n - have
                self.scored[c] = n
            k = int(self.correct[c][:n].sum())
            out.append(CandidateScore(c, k / n, k, n, [], []))
        return out


@dataclass
class Rule:
    name: str
    racing: RacingConfig


def rules(first: Sequence[int], keeps: Sequence[float]) -> list[Rule]:
    out = [Rule("full", RacingConfig(enabled=False))]
    for f in first:
        for k in keeps:
            out.append(Rule(f"race {f}, keep {k:.2f}", RacingConfig(enabled=True, first_questions=f, keep_fraction=k)))
    return out


def decide(correct: dict[str, np.ndarray], incumbent: str, challengers: list[str], racing: RacingConfig
           ) -> tuple[str, int]:
    """The text one search step keeps and the challengers' generations it spent."""
    scorer = MatrixScorer(correct)
    scorer.score([incumbent])  # the current t* was scored on every question before the step
    scorer.generations = 0
    best, _ = pick_candidate(challengers, incumbent, scorer, racing)
    return (incumbent if best is None else challengers[best]), scorer.generations


def sample_answers(rng: np.random.Generator, p: np.ndarray, n: int, rho: float) -> np.ndarray:
    """Right/wrong per (text, question): shared difficulty with probability rho, else independent."""
    difficulty = rng.random(n)
    shared = rng.random((len(p), n)) < rho
    own = rng.random((len(p), n)) < p[:, None]
    return np.where(shared, difficulty[None, :] < p[:, None], own)


def summarize(picks: dict[str, list[float]], lost: dict[str, list[float]], gens: dict[str, list[float]],
              full_cost: int) -> list[dict[str, Any]]:
    base = np.array(picks["full"])
    out = []
    for name in picks:
        hit = np.array(picks[name])
        d = hit - base
        half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
        out.append({
            "rule": name,
            "picks_best": float(hit.mean()),
            "picks_best_ci95": 1.96 * math.sqrt(hit.mean() * (1 - hit.mean()) / len(hit)),
            "points_lost": float(np.mean(lost[name]) * 100),
            "generations": float(np.mean(gens[name]) / full_cost),
            "diff_vs_full": float(d.mean()),
            "diff_ci95": (float(d.mean() - half), float(d.mean() + half)),
        })
    return out


def table(rows: list[dict[str, Any]], title: str) -> str:
    lines = [title, "", "| rule | picks the best | points lost | generations | racing - full (95% CI) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["diff_ci95"]
        diff = "—" if r["rule"] == "full" else f"{r['diff_vs_full'] * 100:+.1f} ({lo * 100:+.1f} … {hi * 100:+.1f})"
        lines.append(f"| {r['rule']} | {r['picks_best'] * 100:.1f} % ± {r['picks_best_ci95'] * 100:.1f} | "
                     f"{r['points_lost']:.2f} | {r['generations'] * 100:.0f} % | {diff} |")
    return "\n".join(lines)


def scripted(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for k in args.k:
        rng = np.random.default_rng(args.seed + k)
        rs = rules(args.first, args.keep)
        picks: dict[str, list[float]] = {r.name: [] for r in rs}
        lost: dict[str, list[float]] = {r.name: [] for r in rs}
        gens: dict[str, list[float]] = {r.name: [] for r in rs}
        offsets = args.spread * (np.arange(k) - (k - 1) / 2)
        for _ in range(args.trials):
            p = np.concatenate([[args.accuracy], args.accuracy + args.shift + rng.permutation(offsets)]).clip(0, 1)
            texts = ["t*"] + [f"c{i}" for i in range(k)]
            answers = sample_answers(rng, p, args.questions, args.rho)
            correct = dict(zip(texts, answers, strict=True))
            true = dict(zip(texts, p, strict=True))
            best = max(true.values())
            for r in rs:
                kept, spent = decide(correct, "t*", texts[1:], r.racing)
                picks[r.name].append(float(true[kept] == best))
                lost[r.name].append(best - true[kept])
                gens[r.name].append(spent)
        rows = summarize(picks, lost, gens, k * args.questions)
        title = (f"K = {k} challengers, {args.questions} questions, t* at {args.accuracy * 100:.0f} %, challengers "
                 f"{args.spread * 100:.0f} points apart around {(args.accuracy + args.shift) * 100:.0f} %, "
                 f"rho = {args.rho}, {args.trials} trials")
        print(table(rows, title) + "\n")
        results[f"k{k}"] = {"title": title, "rows": rows}
    return results


def embedded(args: argparse.Namespace) -> dict[str, Any]:
    from bench.reward_search import candidates as bench_candidates
    from trprompt.config import GenerationConfig
    from trprompt.data import load_split
    from trprompt.engines.hf import HFEngine
    from trprompt.reward_search import FanOutRewardScorer
    from trprompt.templates import Templates

    tpl = Templates()
    problems = load_split(args.dataset, "val", seed=0, limit=args.questions)
    texts = bench_candidates(args.candidates + 1, tpl)
    gen = GenerationConfig(prompt_max_tokens=args.max_tokens, target_max_tokens=args.target_max_tokens,
                           reward_max_tokens=args.max_tokens, batch_size=64)
    t0 = time.perf_counter()
    engine = HFEngine(args.model, threads=args.threads, dtype=args.dtype, max_batch_size=32)
    scorer = FanOutRewardScorer(engine, engine, engine, problems, tpl, gen, failures_in_feedback=0, progress=True)
    t1 = time.perf_counter()
    scores = scorer.score(texts, critique=False)
    wall = time.perf_counter() - t1
    print(f"scored {len(texts)} texts x {len(problems)} questions in {wall:.0f}s (load {t1 - t0:.0f}s, "
          f"dtype {getattr(engine, 'dtype_name', args.dtype)})")
    correct = {s.optimal_reward: np.array([r["correct"] for r in s.rows]) for s in scores}
    for i, s in enumerate(scores):
        print(f"  text {i}: {s.correct}/{s.n}")
    # the real order of questions: one decision each way
    inc, chal = texts[0], texts[1:]
    rs = rules(args.first, args.keep)
    real = {r.name: decide(correct, inc, chal, r.racing) for r in rs}
    # bootstrap resamples of the questions: "best" is the text most accurate on all questions
    rng = np.random.default_rng(args.seed)
    overall = {t: float(v.mean()) for t, v in correct.items()}
    top = max(overall.values())
    picks: dict[str, list[float]] = {r.name: [] for r in rs}
    lost: dict[str, list[float]] = {r.name: [] for r in rs}
    gens: dict[str, list[float]] = {r.name: [] for r in rs}
    for _ in range(args.trials):
        idx = rng.integers(0, len(problems), len(problems))
        sample = {t: v[idx] for t, v in correct.items()}
        for r in rs:
            kept, spent = decide(sample, inc, chal, r.racing)
            picks[r.name].append(float(overall[kept] == top))
            lost[r.name].append(top - overall[kept])
            gens[r.name].append(spent)
    rows = summarize(picks, lost, gens, len(chal) * len(problems))
    title = (f"embedded {args.model} ({args.dtype}), {len(chal)} challengers + t*, {len(problems)} {args.dataset} "
             f"questions (accuracies {[round(v, 3) for v in overall.values()]}), {args.trials} bootstrap resamples")
    print(table(rows, title))
    print("decisions on the questions in their real order:",
          {k: (texts.index(v[0]), v[1]) for k, v in real.items()})
    return {"title": title, "rows": rows, "accuracies": overall, "scoring_wall_s": wall,
            "real_order": {k: {"kept": texts.index(v[0]), "generations": v[1]} for k, v in real.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", nargs="?", choices=["scripted", "embedded"], default="scripted")
    ap.add_argument("--trials", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--questions", type=int, default=64, help="validation questions (config default: 64)")
    ap.add_argument("--k", type=int, nargs="+", default=[3, 6], help="challengers per step (config default: 3)")
    ap.add_argument("--accuracy", type=float, default=0.35, help="true accuracy of the current t*")
    ap.add_argument("--shift", type=float, default=0.0, help="challengers' mean minus t*'s true accuracy")
    ap.add_argument("--spread", type=float, default=0.03, help="true accuracy gap between neighbouring challengers")
    ap.add_argument("--rho", type=float, default=0.5, help="share of answers decided by common question difficulty")
    ap.add_argument("--first", type=int, nargs="+", default=[8, 16, 32], help="racing: first-rung questions")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 1 / 3], help="racing: keep fractions")
    ap.add_argument("--candidates", type=int, default=4, help="embedded: challengers")
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=48, help="embedded: Π's max tokens")
    ap.add_argument("--target-max-tokens", type=int, default=160, help="embedded: the target's max tokens")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args()
    out = scripted(args) if args.part == "scripted" else embedded(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **out}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
