"""What the comparison would cost at paper scale on GPUs, from the tokens a small run measured.

Reads a finished ``jobs/compare.py`` run directory (``comparison.json`` and each method's
``fit.json``): per method and role, how many requests it made per validation metric call and
how many prompt/completion tokens one request took. It scales those to a paper-scale setting
(Meta-Llama-3-8B-Instruct in every role, the same metric budget for every optimiser) and turns
tokens into GPU hours with stated throughputs. Nothing here is measured on a GPU.

Two bounds per method:

* **measured lengths**: every request as long as it was in the small run (SmolLM2 under the
  small run's ``max_tokens`` caps: a lower bound, Llama-3 writes longer reasoning);
* **paper caps**: every completion as long as the paper configs allow (target 512, Π 256,
  reward 384, optimizer 512 tokens): an upper bound.

    python bench/comparison_cost.py runs/compare-svamp                    # GSM-Hard sizes
    python bench/comparison_cost.py runs/compare-svamp --val 747 --test 1319 --out cost.md   # GSM8K
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from trprompt.roles import ROLES

PAPER_CAPS = {"prompt_model": 256, "target_model": 512, "reward_model": 384, "optimizer_model": 512}


@dataclass
class Scale:
    """The paper-scale setting the small run is extrapolated to."""

    val: int = 100  # validation questions (GSM-Hard: 100)
    test: int = 319  # test questions (GSM-Hard: 319)
    iterations: int = 4  # TRPrompt K
    synthetic: int = 800  # TRPrompt N
    steps: int = 10  # TextGrad steps per reward search
    candidates: int = 3  # candidates per step
    decode_tok_s: float = 3000.0  # one 8B bf16 vLLM engine on one H100 (assumed, docs/gpu_cluster.md)
    prefill_tok_s: float = 20000.0

    @property
    def metric_budget(self) -> int:
        """Target answers each optimiser may spend: one TRPrompt reward search (S x C x V)."""
        return self.steps * self.candidates * self.val


def load_methods(run_dir: Path) -> dict[str, dict]:
    """Per method: its fit.json (usage while optimising) and its comparison row (test usage)."""
    comparison = json.loads((run_dir / "comparison.json").read_text())
    rows = {r["method"]: r for r in comparison["rows"]}
    fits = {}
    for fit_path in sorted(run_dir.glob("methods/*/*/fit.json")):
        fit = json.loads(fit_path.read_text())
        if fit["method"] in rows:
            config_path = fit_path.parent / "work" / "run" / "config.yaml"
            config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
            fits[fit["method"]] = {"fit": fit, "row": rows[fit["method"]], "config": config}
    return fits


def per_request(usage: dict, role: str) -> tuple[float, float]:
    """Mean prompt and completion tokens of one request of ``role`` (0, 0 when it made none)."""
    u = usage.get(role) or {}
    n = u.get("requests", 0)
    return (u["prompt_tokens"] / n, u["completion_tokens"] / n) if n else (0.0, 0.0)


def paper_requests(method: str, m: dict, s: Scale) -> dict[str, float]:
    """Requests per role while optimising at paper scale.

    Baselines: the small run's requests per metric call, times the metric budget.
    TRPrompt variants: Algorithm 1's request counts per iteration (N synthetic, 2 V
    validations, S x C x V reward-search answers, up to ``failures_in_feedback``
    critiques per candidate) and the small run's optimizer requests per search step.
    """
    fit = m["fit"]
    usage = fit["usage"]
    if not method.startswith("trprompt"):
        calls = max(fit["metric_calls"], 1)
        return {role: usage.get(role, {}).get("requests", 0) / calls * s.metric_budget for role in ROLES}
    small = m.get("config") or {}
    small_k = small.get("loop", {}).get("iterations", 1)
    small_steps = small.get("reward_search", {}).get("steps", 1)
    failures = small.get("reward_search", {}).get("failures_in_feedback", 6)
    searches = fit["settings"].get("update_optimal_reward", True)
    textual = fit["settings"].get("textual_reward", True)
    search_answers = s.steps * s.candidates * s.val if searches else 0
    pi = s.iterations * (s.synthetic + 2 * s.val + search_answers)
    critiques = s.steps * s.candidates * failures if searches else 0
    optim = usage.get("optimizer_model", {}).get("requests", 0) / max(small_k * small_steps, 1)
    return {
        "prompt_model": pi,
        "target_model": pi,
        "reward_model": s.iterations * ((s.synthetic if textual else 0) + critiques),
        "optimizer_model": optim * s.steps * s.iterations if searches else 0,
    }


def estimate(methods: dict[str, dict], s: Scale) -> list[dict]:
    """One row per method: paper-scale requests, tokens (two bounds) and H100 hours."""
    out = []
    for name, m in methods.items():
        fit, row = m["fit"], m["row"]
        reqs = paper_requests(name, m, s)
        test_usage = row.get("usage") or {}
        test_reqs = {"prompt_model": s.test if name.startswith("trprompt") else 0, "target_model": s.test}
        low = high = hours_low = hours_high = 0.0
        for role in ROLES:
            p_tok, c_tok = per_request(fit["usage"], role)
            if not (p_tok or c_tok):
                p_tok, c_tok = per_request(test_usage, role)
            n = reqs.get(role, 0) + test_reqs.get(role, 0)
            cap = PAPER_CAPS[role]
            low += n * (p_tok + c_tok)
            high += n * (p_tok + cap)
            hours_low += (n * p_tok / s.prefill_tok_s + n * c_tok / s.decode_tok_s) / 3600
            hours_high += (n * p_tok / s.prefill_tok_s + n * cap / s.decode_tok_s) / 3600
        out.append({
            "method": name,
            "opt_requests": round(sum(reqs.values())),
            "test_requests": sum(test_reqs.values()),
            "tokens_low": low,
            "tokens_high": high,
            "h100_hours_low": hours_low,
            "h100_hours_high": hours_high,
            "small_run_test_accuracy": row.get("test_accuracy"),
        })
    return out


def markdown(rows: list[dict], s: Scale, run_dir: Path) -> str:
    """The estimate as a Markdown table with its assumptions."""
    lines = [
        f"# Paper-scale cost of the comparison, extrapolated from `{run_dir}`",
        "",
        f"Setting: V = {s.val} validation and {s.test} test questions; every optimiser gets "
        f"{s.metric_budget:,} validation metric calls (one TRPrompt reward search: {s.steps} steps x "
        f"{s.candidates} candidates x V); TRPrompt K = {s.iterations}, N = {s.synthetic}. Throughput assumed for one "
        f"8B bf16 vLLM engine on one H100: {s.decode_tok_s:,.0f} output and {s.prefill_tok_s:,.0f} prompt tokens/s "
        "(docs/gpu_cluster.md). Per-request token counts were measured in the small run; the upper bound lets "
        "every completion reach the paper configs' caps.",
        "",
        "| method | opt. requests | test requests | tokens (measured lengths – paper caps) | H100 GPU-hours |",
        "|---|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['opt_requests']:,} | {r['test_requests']:,} | "
            f"{r['tokens_low'] / 1e6:.1f} M – {r['tokens_high'] / 1e6:.1f} M | "
            f"{r['h100_hours_low']:.2f} – {r['h100_hours_high']:.2f} |"
        )
    lines += [
        "",
        "GPU-hours add the roles' engine time; with one GPU per role they overlap only across stages. TRPrompt "
        f"variants also run K = {s.iterations} LoRA SFTs (r = 256, ~3–4 min each on one H100, docs/gpu_cluster.md).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a finished jobs/compare.py run directory")
    ap.add_argument("--val", type=int, default=Scale.val)
    ap.add_argument("--test", type=int, default=Scale.test)
    ap.add_argument("--iterations", type=int, default=Scale.iterations)
    ap.add_argument("--synthetic", type=int, default=Scale.synthetic)
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = ap.parse_args(argv)
    if not (args.run_dir / "comparison.json").exists():
        print(f"error: {args.run_dir} has no comparison.json (run jobs/compare.py first)", file=sys.stderr)
        return 2
    s = Scale(val=args.val, test=args.test, iterations=args.iterations, synthetic=args.synthetic)
    text = markdown(estimate(load_methods(args.run_dir), s), s, args.run_dir)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
