"""The comparison's results and its report: ``comparison.md``, ``comparison.json`` and two plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trprompt import artifacts
from trprompt.config import TRPromptConfig
from trprompt.experiments.compare.config import CompareConfig
from trprompt.templates import TEMPLATES_VERSION


@dataclass
class MethodResult:
    """One method's fit and test evaluations."""

    name: str
    key: str
    fit: dict[str, Any] | None = None
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Test summaries by data set name (the main test set and any transfer sets)."""
    error: str | None = None
    computed: list[str] = field(default_factory=list)
    """What this invocation computed (``fit``, ``test:<dataset>``), the rest came from the cache."""

    def optimisation_totals(self) -> dict[str, int]:
        """Requests and tokens over all roles while fitting."""
        usage = (self.fit or {}).get("usage", {})
        return {k: sum(int(u.get(k, 0)) for u in usage.values())
                for k in ("calls", "requests", "prompt_tokens", "completion_tokens", "total_tokens")}

    def best_val_accuracy(self) -> float | None:
        """The best validation accuracy the method recorded (``None`` without a history)."""
        hist = (self.fit or {}).get("history") or []
        return max((float(h["val_accuracy"]) for h in hist), default=None)


@dataclass
class ComparisonResult:
    """All methods' results plus where the report was written."""

    run_dir: Path
    test_dataset: str
    results: list[MethodResult]
    transfer: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, MethodResult]:
        """Results keyed by method name."""
        return {r.name: r for r in self.results}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _short(text: str, n: int = 160) -> str:
    t = " ".join(str(text).split())
    t = t.replace("|", "\\|")
    return t if len(t) <= n else t[: n - 1] + "…"


def budget_text(budget: Mapping[str, Any] | None) -> str:
    """A fit's budget in words, e.g. ``≤400 target calls, spend all`` (``none`` without a cap)."""
    if not budget:
        return "—"
    parts = []
    for key, unit in (("max_metric_calls", "target calls"), ("max_llm_requests", "LLM requests"),
                      ("max_tokens", "tokens")):
        if budget.get(key) is not None:
            parts.append(f"≤{budget[key]} {unit}")
    if not parts:
        return "none"
    return ", ".join(parts) + (", spend all" if budget.get("exhaust") else "")


def comparison_rows(result: ComparisonResult) -> list[dict[str, Any]]:
    """One flat row per method with the headline numbers of the report."""
    rows = []
    for r in result.results:
        test = r.tests.get(result.test_dataset) or {}
        tot = r.optimisation_totals()
        rows.append({
            "method": r.name,
            "status": "ok" if r.error is None else f"error: {r.error}",
            "test_accuracy": test.get("accuracy"),
            "ci95_low": test.get("ci95_low"),
            "ci95_high": test.get("ci95_high"),
            "correct": test.get("correct"),
            "n": test.get("n"),
            "best_val_accuracy": r.best_val_accuracy(),
            "opt_llm_requests": tot["requests"],
            "opt_tokens": tot["total_tokens"],
            "opt_metric_calls": (r.fit or {}).get("usage", {}).get("target_model", {}).get("requests", 0),
            "test_requests_per_question": test.get("requests_per_question"),
            "test_tokens_per_question": test.get("tokens_per_question"),
            "fit_wall_s": (r.fit or {}).get("wall_s"),
            "test_wall_s": test.get("wall_s"),
            "cached": not r.computed,
            "budget": budget_text((r.fit or {}).get("budget")),
        })
    return rows


def write_report(result: ComparisonResult, run: TRPromptConfig, cmp: CompareConfig, plots: bool = True) -> Path:
    """Write ``comparison.md``, ``comparison.json`` and (with ``plots``) the two PNG plots into the run dir."""
    d = result.run_dir
    rows = comparison_rows(result)
    artifacts.write_json(d / "comparison.json", {"test_dataset": result.test_dataset, "rows": rows,
                                                 "transfer": _transfer_table(result)})
    if plots:
        plot_validation_curves(result, d / "val_accuracy.png")
        plot_accuracy_vs_tokens(rows, d / "test_vs_tokens.png", result.test_dataset)
    lines = [
        f"# Prompt-optimisation comparison on {result.test_dataset}",
        "",
        f"Run directory: `{d}`. Optimisation data: {run.dataset.name} (train {run.dataset.train_limit or 'all'}, "
        f"validation {run.dataset.val_limit or 'all'} questions), seed {run.seed}, templates v{TEMPLATES_VERSION}.",
        f"Target model: `{run.models.target_model.model}` ({run.models.target_model.engine}); "
        f"prompt/reward/optimizer: `{run.models.prompt_model.model}` / `{run.models.reward_model.model}` / "
        f"`{(run.models.optimizer_model or run.models.reward_model).model}`.",
        "",
        "Opt. = spent while optimising (all roles); metric calls = target requests while optimising "
        "(one problem scored under one instruction). Test cost per question counts the prompt model "
        "(query-aware methods) and the target. 95% CI: Wilson interval.",
        "",
        *_matched_lines(rows, cmp),
        "| method | test acc. (%) | 95% CI | correct/n | best val. acc. (%) | opt. LLM requests | opt. tokens "
        "| opt. metric calls | test requests/q | test tokens/q | fit wall (s) | test wall (s) | status | budget |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ci = "—" if r["ci95_low"] is None else f"{_pct(r['ci95_low'])}–{_pct(r['ci95_high'])}"
        cn = "—" if r["n"] is None else f"{r['correct']}/{r['n']}"
        rq = "—" if r["test_requests_per_question"] is None else f"{r['test_requests_per_question']:.2f}"
        tq = "—" if r["test_tokens_per_question"] is None else f"{r['test_tokens_per_question']:.0f}"
        fw = "—" if r["fit_wall_s"] is None else f"{r['fit_wall_s']:.0f}"
        tw = "—" if r["test_wall_s"] is None else f"{r['test_wall_s']:.0f}"
        status = _short(r["status"], 80) + (" (cached)" if r["cached"] and r["status"] == "ok" else "")
        lines.append(
            f"| {r['method']} | {_pct(r['test_accuracy'])} | {ci} | {cn} | {_pct(r['best_val_accuracy'])} | "
            f"{r['opt_llm_requests']} | {r['opt_tokens']} | {r['opt_metric_calls']} | {rq} | {tq} | {fw} | {tw} | "
            f"{status} | {r['budget']} |"
        )
    lines += ["", "## Optimisation cost per role", "",
              "| method | role | requests | prompt tokens | completion tokens |", "|---|---|---:|---:|---:|"]
    for r in result.results:
        for role, u in sorted(((r.fit or {}).get("usage") or {}).items()):
            if u.get("requests"):
                lines.append(f"| {r.name} | {role} | {u['requests']} | {u['prompt_tokens']} | "
                             f"{u['completion_tokens']} |")
    lines += ["", "## Budgets and settings", ""]
    for r in result.results:
        fit = r.fit or {}
        lines.append(f"- **{r.name}**: budget {fit.get('budget', '—')}, settings {fit.get('settings', '—')}, "
                     f"cache key `{r.key}`")
    lines += ["", "## What each method found", ""]
    for r in result.results:
        spec = (r.fit or {}).get("policy")
        if spec is None:
            continue
        if spec["kind"] == "fixed":
            lines.append(f"- **{r.name}**: instruction “{_short(spec['instruction'], 400)}”")
        else:
            lines.append(f"- **{r.name}**: query-aware Π with adapter `{spec.get('adapter')}`, "
                         f"t* “{_short(spec['optimal_reward'], 400)}”")
    transfer = _transfer_table(result)
    if result.transfer:
        names = [result.test_dataset, *result.transfer]
        lines += ["", "## Transfer (test accuracy % on other data sets, paper Table 4)", "",
                  "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for method, accs in transfer.items():
            cells = [("—" if accs.get(n) is None else f"{_pct(accs[n]['accuracy'])} (n={accs[n]['n']})")
                     for n in names]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if plots:
        lines += ["", "## Plots", "", "![validation accuracy](val_accuracy.png)", "",
                  "![test accuracy vs optimisation tokens](test_vs_tokens.png)"]
    path = artifacts.write_text(d / "comparison.md", "\n".join(lines) + "\n")
    return path


def _matched_lines(rows: Sequence[Mapping[str, Any]], cmp: CompareConfig) -> list[str]:
    """The budget-matched mode's paragraph: the shared budget and what each optimising method spent of it."""
    m = cmp.budget_match
    if m is None:
        return []
    key = "opt_metric_calls" if m.unit == "target_calls" else "opt_tokens"
    spent = ", ".join(f"{r['method']} {r[key]}" for r in rows if r["budget"] not in ("—", "none"))
    return [f"**Budget-matched**: every optimising method had {m.describe()} for optimisation "
            f"(TextGrad, OPRO and GEPA step until the next step no longer fits; TRPrompt variants spend what their "
            f"loop config asks for, under the same cap). Spent: {spent or '—'}.", ""]


def _transfer_table(result: ComparisonResult) -> dict[str, dict[str, dict[str, Any] | None]]:
    names = [result.test_dataset, *result.transfer]
    return {r.name: {n: ({"accuracy": r.tests[n]["accuracy"], "n": r.tests[n]["n"]} if n in r.tests else None)
                     for n in names} for r in result.results}


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def plot_validation_curves(result: ComparisonResult, path: str | Path) -> Path:
    """Best validation accuracy so far after each step/iteration, one line per optimising method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.2))
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    drawn = 0
    for r in result.results:
        hist = (r.fit or {}).get("history") or []
        if not hist:
            continue
        last: dict[int, float] = {}
        for h in hist:
            last[int(h["step"])] = 100 * float(h["incumbent_accuracy"])
        steps = sorted(last)
        ax.plot(steps, [last[s] for s in steps], marker=markers[drawn % len(markers)],
                linestyle=styles[drawn % len(styles)], drawstyle="steps-post", label=r.name, alpha=0.85)
        drawn += 1
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step (TextGrad/OPRO), iteration (GEPA, TRPrompt)")
    ax.set_ylabel("best validation accuracy so far (%)")
    ax.set_title("Validation accuracy during optimisation")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    return path


def plot_accuracy_vs_tokens(rows: Sequence[Mapping[str, Any]], path: str | Path, dataset: str) -> Path:
    """Test accuracy (with its 95% CI) against the tokens each method spent optimising."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    drawn = 0
    for i, r in enumerate(rows):
        if r["test_accuracy"] is None:
            continue
        drawn += 1
        x = max(1, int(r["opt_tokens"]))
        y = 100 * r["test_accuracy"]
        err = [[y - 100 * r["ci95_low"]], [100 * r["ci95_high"] - y]]
        ax.errorbar([x], [y], yerr=err, fmt=markers[i % len(markers)], capsize=3, label=r["method"], alpha=0.85)
    ax.set_xscale("log")
    ax.set_xlabel("tokens spent optimising, all roles (log scale; 1 = none)")
    ax.set_ylabel(f"{dataset} test accuracy (%) with 95% CI")
    ax.set_title("Test accuracy vs optimisation cost")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    _save(fig, path)
    return path
