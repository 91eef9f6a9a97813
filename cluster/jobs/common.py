"""The boilerplate every job shares: config arguments, ``--set`` overrides, the Ray connection, engines.

A job's ``main(argv)`` adds its arguments with :func:`add_config_args` /
:func:`add_ray_args`, loads its config through :func:`load_job_config` (a bad value
fails before anything expensive starts, exit status 2), and gets its role engines
and SFT runner from :func:`engines_and_sft` (in this process with ``--local``, else
as Ray actor pools after :func:`connect_ray`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from trprompt.config import ConfigError, ModelsConfig

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this code runs from (the default config files live in its ``configs/``)."""

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def add_config_args(p: argparse.ArgumentParser, default_config: str, *, set_example: str, run_dir_key: str) -> None:
    """``--config``, ``--set KEY=VALUE`` (repeatable) and ``--run-dir`` (sets ``run_dir_key``)."""
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / default_config), help="YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config field, e.g. --set {set_example} (repeatable)")
    p.add_argument("--run-dir", default=None, help=f"override {run_dir_key}")


def add_task_args(p: argparse.ArgumentParser, key_prefix: str = "") -> None:
    """``--dataset`` and ``--grader``: the task (overriding ``<key_prefix>dataset.name`` and ``task.grader``)."""
    p.add_argument("--dataset", default=None, help="a built-in task (gsm8k, gsm_hard, math, svamp) or a "
                   "JSONL/CSV/Parquet file or a folder with train.*/test.* (overrides dataset.name)")
    p.add_argument("--grader", default=None, help="numeric, math, exact, choice, contains or "
                   "'python: package.module:function' (overrides task.grader)")
    p.set_defaults(task_key_prefix=key_prefix)


def task_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set``-style overrides of :func:`add_task_args`' flags."""
    prefix = getattr(args, "task_key_prefix", "")
    out = []
    if getattr(args, "dataset", None):
        out.append(f"{prefix}dataset.name={args.dataset}")
    if getattr(args, "grader", None):
        out.append(f"{prefix}task.grader={args.grader}")
    return out


def check_task(run: Any, what: str = "data") -> int | None:
    """Read and check every row of the run's task before any model loads; the exit status 2 on bad data."""
    from trprompt.data import task_from_config

    try:
        task = task_from_config(run)
    except ValueError as e:
        print(f"{what} error: {e}", file=sys.stderr)
        return 2
    if task.dropped:
        print(f"[trprompt] {task.name}: {len(task.dropped)} bad rows dropped (skip_bad_rows): "
              f"{task.dropped_counts()}", flush=True)
    return None


def add_ray_args(p: argparse.ArgumentParser, *, local: bool = True) -> None:
    """``--address`` (and ``--local``: no Ray, everything in this process)."""
    if local:
        p.add_argument("--local", action="store_true", help="no Ray: engines and SFT in this process")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local instance)")


def load_job_config(load: Callable[[list[str]], T], args: argparse.Namespace, run_dir_key: str) -> T:
    """``load(overrides)`` with ``--set`` overrides plus ``--run-dir`` as ``run_dir_key=...`` (raises ConfigError)."""
    overrides = [*args.overrides, *task_overrides(args)]
    if args.run_dir:
        overrides.append(f"{run_dir_key}={args.run_dir}")
    return load(overrides)


def config_error(e: ConfigError, what: str = "config") -> int:
    """Print a config error (before anything expensive started) and return the exit status 2."""
    print(f"{what} error: {e}", file=sys.stderr)
    return 2


def connect_ray(address: str | None, tag: str) -> None:
    """Attach to ``address`` (else ``RAY_ADDRESS``, else a new local instance) and print its resources."""
    import ray

    from cluster.runtime import init_ray

    init_ray(address, log_to_driver=True)
    print(f"[{tag}] Ray: {ray.cluster_resources()}", flush=True)


def engines_and_sft(models: ModelsConfig, *, local: bool, address: str | None, tag: str) -> tuple[Any, Any]:
    """``(role engines, SFT runner)``: in-process with ``local``, else Ray actor pools and Ray Train."""
    from cluster.resources import build_role_engines

    if local:
        from cluster.sft_trainer import LocalSFT

        return build_role_engines(models, local=True), LocalSFT()
    from cluster.sft_trainer import RayTrainSFT

    connect_ray(address, tag)
    return build_role_engines(models, local=False), RayTrainSFT()
