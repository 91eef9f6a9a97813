"""Runners for step 2 of Algorithm 1 (LoRA SFT of Π): in-process or on Ray Train.

Both runners share one call signature (``trprompt.loop.SFTRunner``)::

    runner(examples, base_model, out_dir, cfg, templates, init_adapter=None, seed=0) -> metrics

* :class:`LocalSFT` calls :func:`trprompt.sft.train_lora` in this process.
* :class:`RayTrainSFT` runs the same function inside a ``ray.train.torch.TorchTrainer``
  (``cfg.num_workers`` workers of ``cfg.cpus_per_worker`` CPUs, plus one GPU each when
  ``cfg.use_gpu``; gloo on CPU). Each worker reports its step metrics with
  ``ray.train.report``; at the end rank 0 reports the adapter folder as a
  ``ray.train.Checkpoint``, and the runner copies that checkpoint onto ``out_dir``
  atomically.

The returned metrics are those of :func:`~trprompt.sft.train_lora` plus ``history``
(one record per optimizer step) and ``ray_train`` (True for the Ray runner).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trprompt.artifacts import publish_dir
from trprompt.config import SFTConfig
from trprompt.sft import SFTExample, train_lora
from trprompt.storage import filesystem, is_uri, localize
from trprompt.templates import Templates


class LocalSFT:
    """Train the adapter in this process (``--local`` runs and quick tests)."""

    def __init__(self, on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        """``on_step`` additionally receives every step record (see :func:`~trprompt.sft.train_lora`)."""
        self.on_step = on_step

    def __call__(
        self,
        examples: Sequence[SFTExample],
        base_model: str | Path,
        out_dir: str | Path,
        cfg: SFTConfig,
        templates: Templates,
        init_adapter: str | Path | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Train a LoRA adapter of ``base_model`` on ``examples`` into ``out_dir``; return its metrics."""
        history: list[dict[str, Any]] = []

        def record(step: dict[str, Any]) -> None:
            history.append(step)
            if self.on_step is not None:
                self.on_step(step)

        metrics = train_lora(
            list(examples), base_model, out_dir, cfg, templates, init_adapter=init_adapter, seed=seed, on_step=record
        )
        return {**metrics, "history": history, "ray_train": False}


def _train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker body: train with Ray's prepare hooks, report steps, checkpoint from rank 0."""
    import ray
    import ray.train
    import ray.train.torch

    if config["cfg"].threads:
        import torch

        torch.set_num_threads(config["cfg"].threads)  # Ray pins a worker with 0.5 CPUs to one thread
    rows = config["examples"]
    if isinstance(rows, ray.ObjectRef):
        rows = ray.get(rows)
    examples = [SFTExample(**r) for r in rows]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    report_every: int = config["report_every"]
    history: list[dict[str, Any]] = []

    def on_step(step: dict[str, Any]) -> None:
        history.append(step)
        # Every worker runs the same number of steps (DistributedSampler pads the shards),
        # so every worker reaches each report, as Ray Train requires.
        if step["step"] % report_every == 0 or step["epoch_end"]:
            ray.train.report({**step, "phase": "step"})

    workdir = Path(tempfile.mkdtemp(prefix="trprompt-sft-"))
    try:
        adapter_dir = workdir / "adapter"
        metrics = train_lora(
            examples,
            config["base_model"],
            adapter_dir,
            config["cfg"],
            config["templates"],
            init_adapter=localize(config["init_adapter"]) if config["init_adapter"] else None,
            seed=config["seed"],
            on_step=on_step,
            distributed=True,
            prepare_model=ray.train.torch.prepare_model,
            prepare_data_loader=ray.train.torch.prepare_data_loader,
        )
        final = {**metrics, "phase": "final", "adapter_dir": None}
        if rank == 0:
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(str(adapter_dir)))
        else:
            ray.train.report(final)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {**metrics, "history": history}


def _state_api_address() -> str:
    """Where this cluster's state API lives, for Ray Train's placement-group cleaner.

    Ray Train v2 starts a detached ``PlacementGroupCleaner`` that polls the state API to
    see whether the train controller is still alive, and removes the run's placement
    group (killing the workers) when the answer is "not found". Without an explicit
    address the state API falls back to ``127.0.0.1:8265``; with the dashboard off, or
    with several Ray instances on one machine, that can be *another* cluster's dashboard,
    which does not know our controller, so a healthy run gets torn down. Pointing the
    cleaner at our own dashboard (or, with none, at a closed port, which the cleaner
    treats as "state API unavailable, keep waiting") avoids that.
    """
    import os

    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return os.environ["RAY_API_SERVER_ADDRESS"]
    try:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
    except Exception:  # private API: treat any failure as "no dashboard"
        url = None
    if url:
        return url if "://" in url else f"http://{url}"
    return "http://127.0.0.1:9"


def _fit_and_publish(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the TorchTrainer described by ``spec``, copy its adapter checkpoint onto ``out_dir``, return metrics."""
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg: SFTConfig = spec["train_loop_config"]["cfg"]
    out_dir = Path(spec["out_dir"])
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=spec["train_loop_config"],
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=spec["name"],
            storage_path=spec["storage_path"],
            storage_filesystem=spec.get("storage_filesystem"),
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            worker_runtime_env=spec["worker_runtime_env"],
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall_s = time.perf_counter() - t0
    if result.error is not None:
        raise RuntimeError(f"Ray Train SFT failed: {result.error}") from result.error
    checkpoint: Checkpoint | None = result.checkpoint
    if checkpoint is None:
        raise RuntimeError("Ray Train SFT finished without a checkpoint of the adapter")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with checkpoint.as_directory() as src:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        publish_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    metrics = dict(result.return_value or {k: v for k, v in (result.metrics or {}).items() if k != "phase"})
    metrics.update(
        adapter_dir=str(out_dir),
        ray_train=True,
        ray_train_wall_s=wall_s,
        ray_train_run=str(result.path) if spec["keep_run_dir"] else None,
    )
    if not spec["keep_run_dir"] and result.path:
        if spec.get("storage_filesystem") is not None:  # a storage URI: delete Ray Train's copy there
            try:
                spec["storage_filesystem"].delete_dir(result.path)
            except OSError:
                pass
        else:
            shutil.rmtree(result.path, ignore_errors=True)
    return metrics


class RayTrainSFT:
    """Train the adapter with a ``ray.train.torch.TorchTrainer`` (starts a local Ray if none is running)."""

    def __init__(
        self,
        storage_path: str | Path | None = None,
        report_every: int = 1,
        keep_run_dir: bool = False,
        worker_runtime_env: dict[str, Any] | None = None,
        pin_state_api: bool = True,
    ) -> None:
        """Configure the runner.

        Args:
            storage_path: Ray Train's storage folder or URI (``s3://...``: the checkpoint goes through object
                storage, so workers on any node can train); default ``<out_dir parent>/ray_train``.
            report_every: Report step metrics to Ray Train every this many optimizer steps
                (epoch ends are always reported).
            keep_run_dir: Keep Ray Train's run folder (with its checkpoint copy) after the
                adapter has been copied to ``out_dir``.
            worker_runtime_env: Runtime environment for the training workers (e.g. to ship
                this repository to a multi-node cluster).
            pin_state_api: Run ``fit()`` from a zero-CPU task on this node whose environment
                points Ray Train's placement-group cleaner at this cluster's own state API
                (see :func:`_state_api_address`). False: call ``fit()`` in this process.

        """
        if report_every < 1:
            raise ValueError(f"report_every must be >= 1, got {report_every}")
        self.storage_path: str | Path | None = None
        if storage_path is not None:
            self.storage_path = str(storage_path) if is_uri(str(storage_path)) else Path(storage_path)
        self.report_every = report_every
        self.keep_run_dir = keep_run_dir
        self.worker_runtime_env = worker_runtime_env
        self.pin_state_api = pin_state_api

    def __call__(
        self,
        examples: Sequence[SFTExample],
        base_model: str | Path,
        out_dir: str | Path,
        cfg: SFTConfig,
        templates: Templates,
        init_adapter: str | Path | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Train a LoRA adapter of ``base_model`` on ``examples`` into ``out_dir``; return its metrics."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not examples:
            raise ValueError("RayTrainSFT needs at least one example")
        if not ray.is_initialized():
            ray.init()
        out_dir = Path(out_dir).resolve()
        storage_fs = None
        if isinstance(self.storage_path, str):  # a URI (s3://...): Ray Train writes its checkpoint there
            storage_fs, storage = filesystem(self.storage_path)
        else:
            storage = str((self.storage_path or out_dir.parent / "ray_train").resolve())
        stamp = time.strftime("%Y%m%d-%H%M%S")
        spec = {
            "out_dir": str(out_dir),
            "storage_path": storage,
            "storage_filesystem": storage_fs,
            "name": f"sft-{out_dir.parent.name}-{out_dir.name}-{stamp}-{uuid.uuid4().hex[:6]}",
            "keep_run_dir": self.keep_run_dir,
            "worker_runtime_env": self.worker_runtime_env,
            "train_loop_config": {
                "examples": ray.put([asdict(ex) for ex in examples]),
                "base_model": str(Path(base_model).resolve()),
                "cfg": cfg,
                "templates": templates,
                "init_adapter": None if init_adapter is None else (
                    str(init_adapter) if is_uri(str(init_adapter)) else str(Path(init_adapter).resolve())),
                "seed": seed,
                "report_every": self.report_every,
            },
        }
        if not self.pin_state_api:
            return _fit_and_publish(spec)
        task = ray.remote(num_cpus=0)(_fit_and_publish).options(
            runtime_env={"env_vars": {**((self.worker_runtime_env or {}).get("env_vars") or {}),
                                      "RAY_API_SERVER_ADDRESS": _state_api_address()}},
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        )
        return ray.get(task.remote(spec))
