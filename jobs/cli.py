"""The ``trprompt`` command line (the console script; it sits in the top layer, above everything it runs).

``trprompt eval`` evaluates a prompting method, ``trprompt splits`` prints split sizes,
``trprompt grade-check`` checks the graders, and ``trprompt train|serve|compare|sweep ...``
run the jobs: the very ``main(argv)`` that ``python jobs/<verb>.py ...`` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

METHODS = ("plain", "cot", "fixed", "trprompt")
JOBS = {
    "train": "run Algorithm 1",
    "serve": "serve a finished run over HTTP (Ray Serve)",
    "compare": "compare TRPrompt, its ablations and the baselines",
    "sweep": "hyperparameter sweep with Ray Tune",
}
"""The jobs ``trprompt <verb> ...`` runs: the same ``main(argv)`` as ``python jobs/<verb>.py ...``."""


def job_main(verb: str) -> Callable[[list[str] | None], int]:
    """The ``main(argv)`` of job ``verb``."""
    if verb == "train":
        from cluster.jobs.train import main
    elif verb == "serve":
        from cluster.jobs.serve import main
    elif verb == "compare":
        from cluster.jobs.compare import main
    elif verb == "sweep":
        from cluster.jobs.sweep import main
    else:
        raise ValueError(f"unknown job {verb!r}; choose from {', '.join(JOBS)}")
    return main


def _eval_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a prompting method on a benchmark split",
        description="Evaluate plain / CoT / a fixed instruction / a trained TRPrompt policy with a target model.",
    )
    p.add_argument("--dataset", default=None, help="a built-in task (gsm8k, gsm_hard, math, svamp) or a "
                   "JSONL/CSV/Parquet file or a folder with train.*/test.* (default: the --run-dir run's task, "
                   "else gsm8k)")
    p.add_argument("--grader", default=None, help="numeric, math, exact, choice, contains or 'python: pkg.mod:fn' "
                   "(default: the built-in task's; numeric for files)")
    p.add_argument("--question-field", default="question", help="column holding the question (files)")
    p.add_argument("--answer-field", default="answer", help="column holding the gold answer (files)")
    p.add_argument("--solution-field", default=None, help="optional column with a reference solution (files)")
    p.add_argument("--choices-field", default=None, help="optional column with multiple-choice options (files)")
    p.add_argument("--id-field", default=None, help="optional column with unique ids (files)")
    p.add_argument("--test-file", default=None, help="separate test file for a single-file --dataset")
    p.add_argument("--test-size", type=float, default=None, help="rows held out as test from a single file "
                   "(count or fraction; default 0.2)")
    p.add_argument("--skip-bad-rows", action="store_true", help="drop rows that fail the checks (listed) "
                   "instead of stopping")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--method", default="cot", choices=METHODS)
    p.add_argument("--model", default="smollm2-135m-instruct", help="target model (registry name, HF id, path)")
    p.add_argument("--engine", default="hf", choices=["hf", "openai", "echo"],
                   help="engine for the target model (echo: tests and dry runs)")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible base URL (with --engine openai)")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the API key")
    p.add_argument("--prompt-file", default=None, help="instruction text file (with --method fixed)")
    p.add_argument("--run-dir", default=None, help="trained TRPrompt run directory (with --method trprompt)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split and of the target's sampling")
    p.add_argument("--batch-size", type=int, default=16, help="requests per engine call")
    p.add_argument("--max-tokens", type=int, default=256, help="longest target answer")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the HF engine")
    p.add_argument("--out", default=None, help="output folder (default runs/eval/<dataset>-<split>-<method>)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _build_target(args: argparse.Namespace) -> Any:
    from trprompt.config import ModelConfig
    from trprompt.engines.factory import build_engine

    if args.engine == "openai" and not args.base_url:
        raise SystemExit("error: --engine openai needs --base-url")
    mc = ModelConfig(model=args.model, engine=args.engine, base_url=args.base_url, api_key_env=args.api_key_env,
                     threads=args.threads, max_batch_size=max(1, args.batch_size))
    mc.validate("target")
    return build_engine(mc)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``trprompt eval``."""
    from trprompt import artifacts
    from trprompt.data import load_split
    from trprompt.evaluation import evaluate
    from trprompt.policies import QueryAwarePolicy, fixed_policy
    from trprompt.templates import load_templates

    if args.limit is not None and args.limit < 1:
        raise SystemExit("error: --limit must be >= 1")
    if args.batch_size < 1:
        raise SystemExit("error: --batch-size must be >= 1")
    if args.method == "fixed" and not args.prompt_file:
        raise SystemExit("error: --method fixed needs --prompt-file")
    if args.method == "trprompt" and not args.run_dir:
        raise SystemExit("error: --method trprompt needs --run-dir of a trained run")
    run: Any = None
    if args.method == "trprompt":
        from trprompt.run_dir import RunDirError, load_run

        try:
            run = load_run(args.run_dir)
        except RunDirError as e:
            raise SystemExit(f"error: {e}") from e
    from trprompt.data import Fields, load_task, task_from_config

    user_fields = Fields(args.question_field, args.answer_field, args.solution_field, args.choices_field,
                         args.id_field)
    try:  # read and check every row before any model loads
        if args.dataset is None and run is not None:  # the run's own task: same files, fields, splits, grader
            task = task_from_config(run.config)
        else:
            task = load_task(args.dataset or "gsm8k", fields=None if user_fields == Fields() else user_fields,
                             grader=args.grader, test_file=args.test_file, test_size=args.test_size,
                             skip_bad_rows=args.skip_bad_rows)
        problems = load_split(task, args.split, seed=args.seed, limit=args.limit)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if task.dropped:
        print(f"dropped {len(task.dropped)} bad rows: {task.dropped_counts()}", file=sys.stderr)
    target = _build_target(args)
    if args.method == "trprompt":
        templates = run.templates  # Π sees the texts it was trained with (the run's task wording)
        prompt_engine = target
        if run.base_model != args.model or args.engine != "hf":
            from trprompt.config import ModelConfig
            from trprompt.engines.factory import build_engine

            prompt_engine = build_engine(ModelConfig(model=run.base_model, engine="hf", threads=args.threads))
        if run.adapter_id:
            prompt_engine.load_adapter(run.adapter_id, str(run.adapter_path))
        policy: Any = QueryAwarePolicy.for_run(
            prompt_engine, templates, run.optimal_reward, run.config.generation, run.config.seed,
            adapter=run.adapter_id, chunk_size=args.batch_size,
        )
    else:
        templates = load_templates(None, task)
        policy = fixed_policy(args.method, templates, args.prompt_file)
    res = evaluate(policy, target, problems, templates, max_tokens=args.max_tokens, chunk_size=args.batch_size,
                   progress=not args.no_progress, seed=args.seed)
    out = Path(args.out or f"runs/eval/{task.name}-{args.split}-{args.method}")
    artifacts.write_parquet(out / "rows.parquet", res.rows)
    summary = {**res.summary(), "model": args.model, "engine": args.engine, "split": args.split,
               "grader": task.grader, "dropped_rows": len(task.dropped), "dropped_by_reason": task.dropped_counts()}
    artifacts.write_json(out / "summary.json", summary)
    lo, hi = res.ci95
    md = (f"# {args.method} on {task.name}/{args.split}\n\n| model | grader | n | accuracy | 95% CI | wall s |\n"
          f"|---|---|---|---|---|---|\n| `{args.model}` | `{task.grader}` | {res.n} | {res.accuracy * 100:.2f}% | "
          f"{lo * 100:.1f}–{hi * 100:.1f}% | {res.wall_s:.0f} |\n")
    if task.dropped:
        md += f"\n{len(task.dropped)} bad rows dropped (--skip-bad-rows): {task.dropped_counts()}\n"
    artifacts.write_text(out / "summary.md", md)
    print(res.summary_line())
    print(f"rows: {out / 'rows.parquet'}  summary: {out / 'summary.md'}")
    return 0


def cmd_splits(args: argparse.Namespace) -> int:
    """Print the split sizes of every built-in dataset, or check and describe one task (``--config``/``--dataset``)."""
    from trprompt.data import DATASETS, load_task, split_sizes, task_from_config

    if args.config is None and args.dataset is None:
        for d in DATASETS:
            print(d, split_sizes(d, seed=args.seed))
        return 0
    try:  # every row is read and checked, as a run does before any model loads
        if args.config is not None:
            from trprompt.config import ConfigError, load_config

            try:
                cfg = load_config(args.config, [f"dataset.name={args.dataset}"] if args.dataset else [])
            except ConfigError as e:
                raise SystemExit(f"config error: {e}") from None
            task, seed, val_fraction = task_from_config(cfg), cfg.seed, cfg.dataset.val_fraction
        else:
            task, seed, val_fraction = load_task(args.dataset), args.seed, 0.1
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{task.name}: {task.sizes(seed=seed, val_fraction=val_fraction)}, grader {task.grader}")
    print(f"description: {task.description}")
    if task.dropped:
        print(f"dropped {len(task.dropped)} bad rows: {task.dropped_counts()}")
        for issue in task.dropped[:20]:
            print(f"  {issue}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``trprompt`` command."""
    parser = argparse.ArgumentParser(prog="trprompt", description="Query-aware prompt optimization from textual "
                                     "rewards (TRPrompt), on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    _eval_parser(sub)
    for verb, what in JOBS.items():
        j = sub.add_parser(verb, help=f"{what} (same as python jobs/{verb}.py)", add_help=False)
        j.add_argument("rest", nargs=argparse.REMAINDER, help=f"arguments for jobs/{verb}.py (see --help there)")
    s = sub.add_parser("splits", help="print the split sizes of every dataset, or check one task's data")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dataset", default=None, help="a built-in task or a file/folder (default fields)")
    s.add_argument("--config", default=None, help="a run config: check its task (dataset and task sections)")
    from trprompt.grading import check as grade_check

    grade_check.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``trprompt`` console script."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in JOBS:  # everything after the verb belongs to the job's own parser
        return job_main(argv[0])(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "splits":
        return cmd_splits(args)
    if args.command == "grade-check":
        from trprompt.grading import check as grade_check

        return grade_check.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
