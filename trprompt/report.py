"""Human-readable results: the run report (Markdown) and its plots (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trprompt import artifacts


def _entry(h: Any) -> dict[str, Any]:
    """A history entry as a dict (accepts :class:`~trprompt.run_dir.HistoryEntry` or a plain dict)."""
    return h if isinstance(h, dict) else h.to_json()


def plot_validation(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Validation accuracy after each SFT and each reward search, per iteration (the paper's Figs. 4 and 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, labels = [], [], []
    for h in map(_entry, history):
        x = h["iteration"] + (0.5 if h["phase"] == "reward_search" else 0.0)
        xs.append(x)
        ys.append(h["accuracy"] * 100)
        labels.append(h["phase"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(xs, ys, color="0.6", zorder=1)
    colours = {"initial": "tab:gray", "sft": "tab:blue", "reward_search": "tab:orange"}
    names = {"initial": "initial (Π₀, t*₀)", "sft": "after SFT", "reward_search": "after reward search"}
    for phase, c in colours.items():
        px = [x for x, lab in zip(xs, labels, strict=True) if lab == phase]
        py = [y for y, lab in zip(ys, labels, strict=True) if lab == phase]
        if px:
            ax.scatter(px, py, color=c, label=names[phase], zorder=2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title or "TRPrompt validation accuracy")
    ax.set_xticks(sorted({int(x) for x in xs}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f}%"


def _data_lines(run_dir: Path) -> list[str]:
    """The task, its grader and the rows dropped as bad (from ``data.json``, written by the loop)."""
    path = run_dir / "data.json"
    if not path.exists():
        return []
    data = artifacts.read_json(path)
    lines = ["## Data", "", f"- task: **{data['task']}**, grader: `{data['grader']}`; training pool "
             f"{data['train_pool']}, test {data['test']} questions",
             f"- description: {data['description']}"]
    if data.get("dropped"):
        why = ", ".join(f"{k}: {n}" for k, n in data.get("dropped_by_reason", {}).items())
        lines.append(f"- **{data['dropped']} bad rows dropped** (`skip_bad_rows`): {why}")
        lines += [f"  - {r}" for r in data.get("dropped_rows", [])[:20]]
        if data["dropped"] > 20:
            lines.append(f"  - ... {data['dropped'] - 20} more in data.json")
    else:
        lines.append("- no rows dropped")
    return [*lines, ""]


def write_run_report(run_dir: str | Path, history: list[dict[str, Any]], summary: Any) -> Path:
    """Write ``report.md`` and ``validation_accuracy.png`` into ``run_dir``."""
    run_dir = Path(run_dir)
    plot_validation(history, run_dir / "validation_accuracy.png")
    lines = ["# TRPrompt run report", "", f"Run directory: `{run_dir}`", ""]
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists():
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text())
        m = cfg["models"]
        lines += [
            f"- dataset: **{cfg['dataset']['name']}**, seed {cfg['seed']}",
            f"- prompt model: `{m['prompt_model']['model']}` ({m['prompt_model']['engine']}), target model: "
            f"`{m['target_model']['model']}`, reward model: `{m['reward_model']['model']}`",
            f"- K={cfg['loop']['iterations']}, N={cfg['loop']['synthetic_size']}, LoRA r={cfg['sft']['lora_r']} "
            f"alpha={cfg['sft']['lora_alpha']}, {cfg['sft']['epochs']} epochs, lr {cfg['sft']['learning_rate']}, "
            f"TextGrad {cfg['reward_search']['steps']} steps x {cfg['reward_search']['candidates_per_step']} "
            "candidates",
            "",
        ]
    lines += _data_lines(run_dir)
    lines += ["## Validation accuracy", "", "| iteration | phase | accuracy |", "|---|---|---|"]
    for h in map(_entry, history):
        lines.append(f"| {h['iteration']} | {h['phase']} | {_pct(h['accuracy'])} |")
    lines += [
        "",
        "![validation accuracy](validation_accuracy.png)",
        "",
        f"Best: iteration {summary.best_iteration}, validation accuracy {_pct(summary.best_val_accuracy)}.",
        "",
        "Optimal textual reward t* of the best iteration:",
        "",
        "> " + summary.optimal_reward.replace("\n", "\n> "),
        "",
    ]
    if summary.test:
        lines += ["## Test accuracy (same questions, same target model)", "",
                  "| method | accuracy | 95% CI | n | target tokens |", "|---|---|---|---|---|"]
        for name, s in summary.test.items():
            toks = s.get("target_prompt_tokens", 0) + s.get("target_completion_tokens", 0)
            lines.append(f"| {name} | {_pct(s['accuracy'])} | {_pct(s['ci95_low'])} – {_pct(s['ci95_high'])} | "
                         f"{s['n']} | {toks} |")
        lines.append("")
    lines += _reward_search_lines(run_dir)
    if summary.stage_seconds:
        lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        for k, v in summary.stage_seconds.items():
            lines.append(f"| {k} | {v:.1f} |")
        lines.append("")
    if summary.usage:
        lines += ["## LLM usage per role", "", "| role | calls | requests | prompt tokens | completion tokens |",
                  "|---|---|---|---|---|"]
        for role, u in summary.usage.items():
            lines.append(f"| {role} | {u['calls']} | {u['requests']} | {u['prompt_tokens']} | "
                         f"{u['completion_tokens']} |")
        lines.append("")
    stages = getattr(summary, "stages", None) or []
    if stages:
        lines += ["## Stages of this invocation", "",
                  "Reused stages had an unchanged settings fingerprint and no recomputed input.", "",
                  "| stage | reused | why |", "|---|---|---|"]
        for d in stages:
            lines.append(f"| {d.name} | {'yes' if d.reuse else 'no'} | {d.reason} |")
        lines.append("")
    lines += ["Stage times and usage cover only the stages run by the last invocation (reused stages are "
              "read from disk).", ""]
    return artifacts.write_text(run_dir / "report.md", "\n".join(lines))


def _reward_search_lines(run_dir: Path) -> list[str]:
    """Per iteration and search step: how many validation questions each candidate was scored on.

    With racing on, candidates dropped early were scored on fewer questions than the
    one that reached the whole validation set.
    """
    out: list[str] = []
    for path in sorted(run_dir.glob("iter_*/reward_search.json"), key=lambda p: int(p.parent.name[5:] or 0)):
        trace = artifacts.read_json(path).get("trace") or []
        steps: dict[int, list[dict[str, Any]]] = {}
        for row in trace:
            if row.get("kind") != "rung" and int(row.get("step", 0)) > 0:
                steps.setdefault(int(row["step"]), []).append(row)
        for step, rows in sorted(steps.items()):
            qs = ", ".join(str(r.get("n", "?")) for r in rows)
            accs = ", ".join(_pct(r.get("accuracy")) for r in rows)
            acc = next((str(r["index"]) for r in rows if r.get("accepted")), "—")
            out.append(f"| {path.parent.name[5:]} | {step} | {qs} | {accs} | {acc} |")
    if not out:
        return []
    return ["## Optimal-reward search", "", "Questions each candidate was scored on (racing drops weak candidates "
            "early), its accuracy on them, and the accepted candidate.", "",
            "| iteration | step | questions per candidate | accuracy per candidate | accepted |",
            "|---|---|---|---|---|", *out, ""]
