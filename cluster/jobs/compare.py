"""Compare TRPrompt, its ablations and the baselines (plain, CoT, TextGrad, OPRO, GEPA) on one test set.

The job behind ``python jobs/compare.py`` and ``trprompt compare`` (both call :func:`main`).

Local (starts a Ray instance itself)::

    python jobs/compare.py --config configs/compare-svamp.yaml

On a running cluster::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/compare.py --config configs/compare-svamp.yaml

``--methods plain,cot,opro`` runs a subset; ``--transfer`` also evaluates each trained
policy on the other data sets' test splits (paper Table 4). Results are cached per
(method, config hash) in the run directory: re-running only computes what changed.
``--budget target_calls=400`` (or ``tokens=N``) is the budget-matched mode: every optimising
method gets and spends the same optimisation budget, and the report says which. ``--local``
runs everything in this process without Ray.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.jobs.common import (
    add_config_args,
    add_ray_args,
    add_task_args,
    check_task,
    config_error,
    engines_and_sft,
    load_job_config,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="jobs/compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, "compare-svamp.yaml", set_example="compare.opro.steps=2 or --set run.seed=1",
                    run_dir_key="run.run_dir")
    p.add_argument("--storage", default=None,
                   help="local storage root for a relative run_dir (default: $TRPROMPT_STORAGE, the run config's "
                        "storage, ~/trprompt_runs in a Ray working-dir job, else the current folder)")
    add_task_args(p, "run.")
    p.add_argument("--methods", default=None, help="comma-separated subset of compare.methods to run")
    p.add_argument("--transfer", action="store_true", help="also evaluate on the other data sets' test splits")
    p.add_argument("--budget", default=None, metavar="UNIT=N",
                   help="budget-matched mode: every optimising method gets and spends the same budget, "
                        "target_calls=N (target-model calls) or tokens=N (all roles); sets compare.budget_match")
    add_ray_args(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load and validate the config, build the engines, run the comparison, print the table's path."""
    args = parse_args(argv)
    from trprompt.config import ConfigError, check_api_keys
    from trprompt.experiments.compare.config import load_compare_config, parse_budget_flag
    from trprompt.experiments.compare.runner import Comparison

    try:
        budget = parse_budget_flag(args.budget) if args.budget else []
        run, cmp = load_job_config(lambda overrides: load_compare_config(args.config, overrides + budget), args,
                                   "run.run_dir")
        from trprompt.storage import StorageError, local_run_dir

        try:
            where = local_run_dir(run.run_dir, args.storage, run.storage)
        except StorageError as e:
            raise ConfigError(str(e)) from e
        if where.run_dir != run.run_dir:
            run, cmp = load_job_config(
                lambda overrides: load_compare_config(args.config, [*overrides, *budget,
                                                                    f"run.run_dir={where.run_dir}"]), args,
                "run.run_dir")
        methods = None
        if args.methods:
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            bad = [m for m in methods if m not in cmp.methods]
            if bad:
                raise ConfigError(f"--methods: {bad} not in compare.methods {cmp.methods}")
        check_api_keys(run.models)
    except ConfigError as e:  # fail before anything expensive starts
        return config_error(e)
    if (status := check_task(run)) is not None:
        return status

    from trprompt.engines.model_store import prompt_model_path

    needs_sft = any(m.startswith("trprompt") for m in (methods or cmp.methods))
    base_model = prompt_model_path(run.models.prompt_model) if needs_sft else run.models.prompt_model.model
    engines, runner = engines_and_sft(run.models, local=args.local, address=args.address, tag="compare")
    try:
        comparison = Comparison(run, cmp, engines, sft_runner=runner, base_model_path=base_model,
                                progress=not args.no_progress)
        result = comparison.run_all(methods, transfer=args.transfer)
    finally:
        close = getattr(engines, "close", None)
        if callable(close):
            close()
    for r in result.results:
        test = r.tests.get(result.test_dataset)
        acc = "—" if test is None else f"{test['accuracy'] * 100:.2f}% ({test['correct']}/{test['n']})"
        print(f"[compare] {r.name}: {acc}" + (f"  [{r.error}]" if r.error else ""))
    if run.tracking == "mlflow":  # one MLflow run per method
        from trprompt.tracking import default_tracking_uri, log_comparison

        ids = log_comparison(comparison, result, run.tracking_uri)
        print(f"[compare] MLflow: {len(ids)} runs at {run.tracking_uri or default_tracking_uri(result.run_dir)}")
    print(f"[compare] report: {Path(result.run_dir).resolve() / 'comparison.md'}")
    return 0 if all(r.error is None for r in result.results) else 1


if __name__ == "__main__":
    sys.exit(main())
