"""A sweep's outputs: the ranked trial table (parquet and Markdown), the best config and the plot.

:func:`write_sweep_outputs` reads every trial folder (accuracies from its run_dir,
cost and status from its ledgers) and writes ``results.parquet``, ``results.md``,
``best_config.yaml``, ``best.json`` and ``accuracy_vs_tokens.png`` in the sweep folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trprompt import artifacts
from trprompt.config import ConfigError, TRPromptConfig, dump_config, load_config
from trprompt.experiments.sweep.spec import SweepSpec
from trprompt.experiments.sweep.trials import (
    EARLY_STOP_FILE,
    STATUS_FILE,
    TrialProgress,
    initial_accuracy,
    iteration_record,
    read_iteration_metrics,
    resolve_trial_config,
)
from trprompt.roles import ROLES


def _best(values: list[float], mode: str) -> float | None:
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def collect_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial folder, read from its run_dir (accuracies) and ledgers (cost, status), ranked.

    Columns: ``rank``, ``trial_id``, the searched keys, ``score`` (the sweep metric, best
    over the trial's finished iterations), ``val_accuracy`` (best end-of-iteration
    validation accuracy), ``val_accuracy_last``, ``best_val_accuracy``,
    ``iterations_completed``, ``iterations_planned``, ``stopped_early`` (by the scheduler),
    ``stop_reason`` (completed, early_stopped, budget, error, unfinished), ``status``,
    ``total_tokens``, ``tokens_<role>``, ``requests``, ``wall_s``, ``config_hash``,
    ``run_dir``, ``error``.
    """
    rows: list[dict[str, Any]] = []
    if not spec.trials_dir.is_dir():
        return rows
    keys = [d.key for d in spec.search]
    for d in sorted(spec.trials_dir.iterdir()):
        prog = TrialProgress.load(d) if d.is_dir() else None
        if prog is None:
            continue
        status = artifacts.read_json(d / STATUS_FILE) if (d / STATUS_FILE).is_file() else {}
        iters = read_iteration_metrics(d)
        records = [iteration_record(d, k) for k in range(1, len(iters) + 1)]
        per_metric = [r[spec.metric] for r in records]
        early = (d / EARLY_STOP_FILE).is_file()
        done = len(iters) >= prog.iterations_planned
        state = status.get("status", "UNKNOWN")
        if state == "ERROR":
            reason = "error"
        elif done:
            reason = "completed"
        elif early:
            reason = "early_stopped"
        elif state == "TERMINATED":
            reason = "budget"
        else:
            reason = "unfinished"
        cfg_hash = None
        if (d / "config.yaml").is_file():
            try:
                cfg_hash = load_config(d / "config.yaml").hash()
            except ConfigError:
                cfg_hash = None
        rows.append({
            "rank": 0,
            "trial_id": prog.trial_id,
            **{k: prog.params.get(k) for k in keys},
            "score": _best(per_metric, spec.mode),
            "val_accuracy": _best([r["val_accuracy"] for r in records], "max"),
            "val_accuracy_last": records[-1]["val_accuracy"] if records else None,
            "best_val_accuracy": records[-1]["best_val_accuracy"] if records else initial_accuracy(d),
            "iterations_completed": len(iters),
            "iterations_planned": prog.iterations_planned,
            "stopped_early": reason == "early_stopped",
            "stop_reason": reason,
            "status": state,
            "total_tokens": prog.total_tokens,
            **{f"tokens_{r}": int(prog.tokens.get(r, 0)) for r in ROLES},
            "requests": prog.requests,
            "wall_s": round(prog.wall_s, 2),
            "attempts": prog.attempts,
            "config_hash": cfg_hash,
            "run_dir": str(d),
            "error": status.get("error"),
        })
    sign = -1.0 if spec.mode == "max" else 1.0
    rows.sort(key=lambda r: (r["score"] is None, sign * (r["score"] or 0.0), r["total_tokens"], r["trial_id"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _table_safe(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Searched columns whose values mix types (e.g. null and a number) become strings for parquet."""
    out = [dict(r) for r in rows]
    for k in keys:
        kinds = {type(r.get(k)) for r in out if r.get(k) is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            for r in out:
                r[k] = None if r.get(k) is None else str(r[k])
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str) and "/" in v:
        return Path(v).name
    return str(v)


def results_markdown(spec: SweepSpec, rows: list[dict[str, Any]], summary: Mapping[str, Any]) -> str:
    """The trial table as Markdown, best first, with a short header."""
    keys = [d.key for d in spec.search]
    lines = [
        f"# Sweep `{spec.name}`",
        "",
        f"- metric: `{spec.metric}` ({spec.mode}); score = best value over a trial's finished iterations",
        f"- trials: {len(rows)}; tokens spent: {summary.get('total_tokens', 0):,}; "
        f"token cap: {spec.budget.max_total_tokens or 'none'}; time budget: "
        f"{f'{spec.budget.time_budget_s:g} s' if spec.budget.time_budget_s else 'none'}",
        f"- best trial: `{summary.get('best_trial') or '-'}`; best config: `best_config.yaml`",
        "",
    ]
    cols = ["rank", "trial_id", *keys, "score", "val_accuracy", "iterations_completed", "iterations_planned",
            "stopped_early", "stop_reason", "total_tokens", "wall_s"]
    heads = ["rank", "trial", *keys, "score", "val acc", "iters", "K", "stopped early", "stop reason", "tokens",
             "wall s"]
    lines.append("| " + " | ".join(heads) + " |")
    lines.append("|" + "|".join("---" for _ in heads) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_tokens(spec: SweepSpec, rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Per trial, the sweep metric after each iteration against the tokens spent so far (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        prog = TrialProgress.load(r["run_dir"])
        reports = sorted(prog.reports, key=lambda x: x["iteration"]) if prog else []
        if not reports:
            continue
        xs = [x["total_tokens"] for x in reports]
        ys = [x.get(spec.metric) for x in reports]
        style = "--" if r["stop_reason"] != "completed" else "-"
        width = 2.5 if r["rank"] == 1 else 1.2
        ax.plot(xs, ys, style, marker="o", linewidth=width, label=f"#{r['rank']} {r['trial_id']}")
    ax.set_xlabel("tokens spent (all roles)")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"sweep {spec.name}: {spec.metric} vs tokens (dashed: stopped before K)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def best_trial_config(spec: SweepSpec, row: Mapping[str, Any]) -> TRPromptConfig:
    """The run config of a table row, rebuilt from its params (the trial's run_dir kept)."""
    prog = TrialProgress.load(row["run_dir"])
    params = prog.params if prog is not None else {d.key: row[d.key] for d in spec.search}
    return resolve_trial_config(spec, params, row["run_dir"])


def write_sweep_outputs(spec: SweepSpec, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the sweep's outputs and return its summary (also saved as ``best.json``).

    Outputs: ``results.parquet``, ``results.md``, ``best_config.yaml``, ``best.json`` and
    ``accuracy_vs_tokens.png`` in the sweep folder.
    """
    rows = collect_trials(spec)
    sd = spec.sweep_dir
    best = next((r for r in rows if r["score"] is not None), None)
    summary: dict[str, Any] = {
        "name": spec.name,
        "metric": spec.metric,
        "mode": spec.mode,
        "trials": len(rows),
        "total_tokens": sum(r["total_tokens"] for r in rows),
        "best_trial": best["trial_id"] if best else None,
        "best_score": best["score"] if best else None,
        "best_run_dir": best["run_dir"] if best else None,
        "best_params": {d.key: best[d.key] for d in spec.search} if best else None,
        "stop_reasons": {k: sum(r["stop_reason"] == k for r in rows) for k in sorted({r["stop_reason"] for r in rows})},
        **(extra or {}),
    }
    keys = [d.key for d in spec.search]
    artifacts.write_parquet(sd / "results.parquet", _table_safe(rows, keys))
    artifacts.write_text(sd / "results.md", results_markdown(spec, rows, summary))
    if best is not None:
        cfg = best_trial_config(spec, best)
        header = (f"# Best config of sweep {spec.name}: trial {best['trial_id']}, {spec.metric} = {best['score']}\n"
                  f"# run_dir is the trial's own: running it again resumes that run (e.g. with\n"
                  f"# --set eval.run_test=true to add the test evaluation); change run_dir for a fresh run.\n")
        artifacts.write_text(sd / "best_config.yaml", header + dump_config(cfg))
        summary["best_config"] = str(sd / "best_config.yaml")
    plot_accuracy_vs_tokens(spec, rows, sd / "accuracy_vs_tokens.png")
    artifacts.write_json(sd / "best.json", summary)
    summary["rows"] = rows
    return summary
