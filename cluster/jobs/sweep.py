"""Hyperparameter sweep of TRPrompt settings with Ray Tune (one real training run per trial).

The job behind ``python jobs/sweep.py`` and ``trprompt sweep`` (both call :func:`main`).

Local (starts a Ray instance itself)::

    python jobs/sweep.py --config configs/sweep-cpu.yaml

On a running cluster::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sweep.py --config configs/sweep-cpu.yaml

Re-running with the same ``sweep.run_dir`` resumes an interrupted sweep (finished trials
are not run again). ``--dry-run`` validates the sweep file and every trial config it can
produce, prints the plan and exits without starting Ray. See ``docs/sweeps.md``.
"""

from __future__ import annotations

import argparse
import sys

from cluster.jobs.common import (
    add_config_args,
    add_ray_args,
    add_task_args,
    check_task,
    config_error,
    connect_ray,
    load_job_config,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="jobs/sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, "sweep-cpu.yaml", set_example="sweep.num_samples=2 or --set overrides.loop.synthetic_size=8",
                    run_dir_key="sweep.run_dir")
    add_ray_args(p, local=False)
    p.add_argument("--storage", default=None,
                   help="local storage root for a relative sweep.run_dir (default: $TRPROMPT_STORAGE, "
                        "~/trprompt_runs in a Ray working-dir job, else the current folder)")
    add_task_args(p, "overrides.")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; start nothing")
    p.add_argument("--verbose", type=int, default=1, help="Tune's console verbosity (0-3)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate the sweep, connect to Ray, run (or resume) it, print where the results are."""
    args = parse_args(argv)
    from trprompt.config import ConfigError, check_api_keys, config_from_dict
    from trprompt.experiments.sweep.spec import load_sweep_spec
    from trprompt.experiments.sweep.trials import check_trial_configs

    try:
        spec = load_job_config(lambda overrides: load_sweep_spec(args.config, overrides), args, "sweep.run_dir")
        from trprompt.storage import StorageError, local_run_dir

        try:
            where = local_run_dir(spec.run_dir, args.storage)
        except StorageError as e:
            raise ConfigError(str(e)) from e
        if where.run_dir != spec.run_dir:
            spec = load_job_config(
                lambda overrides: load_sweep_spec(args.config, [*overrides, f"sweep.run_dir={where.run_dir}"]),
                args, "sweep.run_dir")
        checked = check_trial_configs(spec)
    except ConfigError as e:  # fail before Ray or any model starts
        return config_error(e, "sweep config")
    try:
        base_run = config_from_dict({**spec.base, "run_dir": str(spec.sweep_dir / "base")})
    except ConfigError as e:
        return config_error(e, "sweep config")
    if (status := check_task(base_run, "sweep data")) is not None:
        return status
    print(f"[sweep] {spec.name}: {spec.trial_count()} trials (grid {spec.grid_size()} x num_samples "
          f"{spec.num_samples}), metric {spec.metric} ({spec.mode}), scheduler {spec.scheduler.type}; "
          f"{checked} trial configs validated", flush=True)
    for d in spec.search:
        print(f"[sweep]   {d.key}: {d.describe()}", flush=True)
    print(f"[sweep] output: {spec.sweep_dir}", flush=True)
    if args.dry_run:
        return 0
    try:  # before Ray or any model starts
        check_api_keys(config_from_dict({**spec.base, "run_dir": str(spec.sweep_dir / "base")}).models)
    except ConfigError as e:
        return config_error(e, "sweep config")

    from cluster.tune_sweep import run_sweep

    connect_ray(args.address, "sweep")
    out = run_sweep(spec, verbose=args.verbose)
    s = out.summary
    print(f"[sweep] done in {out.wall_s:.0f}s ({'resumed' if out.restored else 'new'}): {s['trials']} trials, "
          f"{s['total_tokens']:,} tokens, stop reasons {s['stop_reasons']}", flush=True)
    if s.get("best_trial"):
        print(f"[sweep] best: trial {s['best_trial']} {spec.metric}={s['best_score']} params {s['best_params']}")
        print(f"[sweep] best config: {s['best_config']}")
    print(f"[sweep] table: {spec.sweep_dir / 'results.md'}; plot: {spec.sweep_dir / 'accuracy_vs_tokens.png'}")
    return 1 if s.get("errors") and not s.get("best_trial") else 0


if __name__ == "__main__":
    sys.exit(main())
