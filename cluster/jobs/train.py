"""Run TRPrompt's Algorithm 1 on Ray: the job behind ``python jobs/train.py`` and ``trprompt train``.

Local (starts a Ray instance itself)::

    python jobs/train.py --config configs/cpu-demo.yaml

On a running cluster (``ray start --head`` or ``ray up ray_cluster.yaml``)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config configs/cpu-demo.yaml

Re-running with the same ``run_dir`` resumes from the last finished stage. A relative
``run_dir`` resolves under the storage root (``--storage``, ``$TRPROMPT_STORAGE``, the
config's ``storage``; inside a ``ray job submit --working-dir`` job the default is
``~/trprompt_runs``, so the run outlives Ray's copy of the code and an edited re-submit
resumes it). The root may be a URI such as ``s3://bucket/runs`` (see ``trprompt.storage``).
``--local`` runs everything in this process without Ray (for debugging).
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
    p = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, "cpu-demo.yaml", set_example="loop.iterations=1", run_dir_key="run_dir")
    add_task_args(p)
    p.add_argument("--storage", default=None,
                   help="storage root for a relative run_dir: a folder or a URI such as s3://bucket/runs "
                        "(default: $TRPROMPT_STORAGE, the config's storage, ~/trprompt_runs in a Ray job)")
    p.add_argument("--staging", default=None, help="local working folder of a run stored at a URI")
    add_ray_args(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="print which stages of the run directory would be reused or recomputed, and why; run nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load and validate the config, build engines on Ray, run the loop, print the summary."""
    args = parse_args(argv)
    from trprompt.config import ConfigError, load_config

    try:
        cfg = load_job_config(lambda overrides: load_config(args.config, overrides), args, "run_dir")
    except ConfigError as e:  # fail before anything expensive starts
        return config_error(e)
    if (status := check_task(cfg)) is not None:
        return status

    from trprompt.storage import (
        HookChain,
        RunStorage,
        StorageAdapterEngine,
        StorageError,
        StorageSFTRunner,
        StorageSyncHooks,
        resolve_run_location,
        resolve_storage_root,
    )

    root, source = resolve_storage_root(args.storage, cfg.storage)
    try:
        location = resolve_run_location(cfg.run_dir, root, source, staging=args.staging)
        storage = RunStorage(location)
        pulled = storage.pull()
    except StorageError as e:
        print(f"storage error: {e}", file=sys.stderr)
        return 2
    cfg.run_dir = str(location.local_dir)
    print(f"[trprompt] run directory: {location.run_dir} (storage root: {root or Path.cwd()}, from {source})",
          flush=True)
    if location.remote:
        print(f"[trprompt] working copy: {location.local_dir} ({pulled} files pulled from storage)", flush=True)

    from trprompt.engines.model_store import prompt_model_path
    from trprompt.loop import LoopHooks, TRPromptTrainer

    if args.dry_run:
        plan = TRPromptTrainer(cfg, None, None, cfg.models.prompt_model.model, progress=False).stage_plan()
        for decision in plan:
            print(decision.line())
        redo = sum(not d.reuse for d in plan)
        print(f"[trprompt] dry run: {len(plan) - redo} stages reused, {redo} recomputed")
        return 0

    from trprompt.config import check_api_keys

    try:
        check_api_keys(cfg.models)  # before any model loads
    except ConfigError as e:
        return config_error(e)
    base_model = prompt_model_path(cfg.models.prompt_model)
    engines, runner = engines_and_sft(cfg.models, local=args.local, address=args.address, tag="trprompt")
    if args.local:
        hooks: LoopHooks | HookChain = LoopHooks()
    else:
        from cluster.metrics import RunMetrics

        hooks = RunMetrics()
    role_engines = dict(engines)
    if location.remote:
        role_engines["prompt_model"] = StorageAdapterEngine(role_engines["prompt_model"], storage)
        if not args.local:  # Ray Train checkpoints through the storage, so SFT workers may run on any node
            from cluster.sft_trainer import RayTrainSFT

            runner = StorageSFTRunner(RayTrainSFT(storage_path=location.path("ray_train")), storage)
    from trprompt.tracking import TrackingError, tracker_for

    try:
        tracker = tracker_for(cfg)
    except TrackingError as e:
        print(f"tracking error: {e}", file=sys.stderr)
        return 2
    if tracker is not None:
        print(f"[trprompt] MLflow run {tracker.run_id} at {tracker.tracking_uri}", flush=True)
    hooks = HookChain(hooks, StorageSyncHooks(storage), tracker)
    _exit_on_sigterm()
    trainer = TRPromptTrainer(cfg, role_engines, runner, base_model, hooks=hooks, progress=not args.no_progress)
    status = "FAILED"
    try:
        summary = trainer.run()
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            try:
                tracker.finish(status, log_artifacts=status == "FINISHED")
            except Exception as err:  # tracking must not hide the run's own outcome
                print(f"[trprompt] MLflow logging failed: {err}", file=sys.stderr)
        storage.push()  # also after a failure or `ray job stop`: what finished is kept
    print(f"[trprompt] done. best iteration {summary.best_iteration}, validation "
          f"{summary.best_val_accuracy * 100:.2f}%")
    for name, s in summary.test.items():
        print(f"[trprompt] test {name}: {s['accuracy'] * 100:.2f}% ({s['correct']}/{s['n']})")
    print(f"[trprompt] run directory: {location.run_dir}")
    print(f"[trprompt] report: {location.path('report.md')}")
    print(f"[trprompt] open it with: {location.open_hint('report.md')}")
    return 0


def _exit_on_sigterm() -> None:
    """Turn SIGTERM (``ray job stop``) into SystemExit so the final push to storage runs."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        print("[trprompt] stopped (SIGTERM); saving what finished", file=sys.stderr, flush=True)
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
