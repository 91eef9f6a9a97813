"""Ray Serve application that turns a finished TRPrompt run into an HTTP service.

The service writes a query-aware instruction for every question it receives, using
the run's prompt model Π (base model + the run's best LoRA adapter) conditioned on
the run's optimal textual reward t*; ``/v1/solve`` also hands question + instruction
to the target model and extracts the final answer.

Deployments (names as they appear in ``serve status``):

* ``PromptModel``: one engine (built with :func:`trprompt.engines.factory.build_engine`
  from the run's ``models.prompt_model``, so HF on CPU and vLLM on GPUs alike) with the
  run's adapter loaded under a versioned adapter id. Concurrent requests are merged by
  ``@serve.batch`` into one engine call (behind a :class:`BatchGate`, so that requests
  arriving during a long engine call form one next batch rather than many small ones).
  When the target model has the same settings and the run shares engines, this
  deployment answers target requests as well.
* ``TargetModel`` (optional): the run's ``models.target_model`` behind the same batching.
* ``Ingress``: FastAPI (``/docs`` has the OpenAPI page); validates every request
  before anything reaches an engine and turns every failure into a JSON error body.

Hot swap: ``POST /v1/admin/reload`` goes to one ``PromptModel`` replica, which loads
the new adapter under a new id, swaps its active version with a single assignment,
and unloads the old adapter once the last batch that started with it has finished.
It then publishes the new version to a deployment-scoped actor (``versions``); the
other replicas poll it and swap the same way, and replicas started later (autoscaling,
restarts after a crash) start from the published version rather than the original one.

Build the application with :func:`build_app` (also usable as a Serve app builder:
``serve run cluster.serve_app:build_app run_dir=runs/cpu-demo``) or run
``python jobs/serve.py --run-dir runs/cpu-demo``. See ``docs/serving.md``.
"""

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import Counter as TallyCounter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import ray
import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.config import DeploymentActorConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from trprompt.config import DATASETS, ModelConfig, TRPromptConfig, config_from_dict
from trprompt.engines.base import ChatRequest, ChatResult, Message, SamplingParams
from trprompt.evaluation import clean_instruction
from trprompt.templates import TEMPLATES_VERSION, Templates

log = logging.getLogger("trprompt.serve")

VERSION_STORE = "versions"
"""Name of the deployment-scoped actor that holds the published prompt-model version."""

HARD_MAX_BODY_BYTES = 1 << 20
"""Bodies above this size are refused by FastAPI itself (413) whatever the settings say."""

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


class ServeArgs(BaseModel):
    """Everything :func:`build_app` accepts (``serve run ... key=value`` strings are coerced)."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="Finished run directory (config.yaml, best.json, templates.json).")
    with_target: bool = Field(True, description="Deploy the target model too (needed by /v1/solve).")
    share_engines: bool | None = Field(
        None, description="Let the prompt deployment answer target requests when both models have the same "
        "settings (None: the run config's models.share_engines)."
    )
    batching: bool = Field(True, description="Merge concurrent requests into one engine call (@serve.batch).")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Largest merged batch.")
    batch_wait_timeout_s: float = Field(0.02, ge=0.0, le=10.0, description="How long a batch waits to fill up.")
    min_replicas: int = Field(1, ge=0, le=1024, description="Fewest replicas per model deployment.")
    max_replicas: int = Field(1, ge=1, le=1024, description="Most replicas per model deployment (> min: autoscale).")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Autoscaling target of ongoing requests per replica (None: max_batch_size)."
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Requests one model replica accepts at once (None: 4 x max_batch_size, >= 32)."
    )
    ingress_max_ongoing_requests: int = Field(512, ge=1, description="Requests one ingress replica accepts.")
    num_cpus: float | None = Field(None, ge=0, description="CPUs per model replica (None: the run config's).")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per model replica (None: the run config's).")
    ingress_num_cpus: float = Field(0.1, ge=0, description="CPUs per ingress replica.")
    max_question_chars: int = Field(4000, ge=1, le=200_000, description="Longest accepted question.")
    request_timeout_s: float = Field(120.0, gt=0, description="Per-request deadline inside the ingress (-> 504).")
    health_check_period_s: float = Field(5.0, gt=0, description="How often Serve health-checks a model replica.")
    sync_interval_s: float = Field(1.0, gt=0, description="How often replicas look for a newly published version.")
    engine_factory: Any = Field(
        None, description="Builds each model replica's engine instead of trprompt.engines.factory.build_engine: a "
        "callable(ModelConfig) -> Engine or a 'module:function' import path (engine wrappers, custom backends, tests)."
    )
    enable_admin: bool = Field(True, description="Expose POST /v1/admin/reload.")
    admin_token: str | None = Field(None, description="If set, /v1/admin/* needs 'Authorization: Bearer <token>'.")

    @property
    def max_body_bytes(self) -> int:
        """Largest accepted request body: room for a maximal question written as JSON escapes."""
        return min(HARD_MAX_BODY_BYTES, max(64 * 1024, 12 * self.max_question_chars + 4096))

    @property
    def replica_max_ongoing(self) -> int:
        """Effective ``max_ongoing_requests`` of a model replica."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return max(32, 4 * self.max_batch_size)


# ----------------------------------------------------------------------------------------------
# What is being served: a run directory, resolved
# ----------------------------------------------------------------------------------------------


class RunDirError(ValueError):
    """A run directory (or an adapter path) cannot be served; the message says why."""


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def reward_hash(text: str) -> str:
    """The version tag of an optimal reward text (first 12 hex digits of its SHA-256)."""
    return _short_hash(text.encode("utf-8"))


def adapter_fingerprint(path: Path) -> str:
    """A content hash of a peft adapter folder (its config and weight files)."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in path.iterdir() if p.is_file()):
        if name.startswith("adapter_") or name.endswith((".safetensors", ".bin")):
            h.update(name.encode())
            h.update((path / name).read_bytes())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class RunSpec:
    """A servable version: the run's config and templates, plus the adapter and t* to use.

    ``adapter_path`` is ``None`` for the base model. ``adapter_version`` is
    ``<adapter name>@<content hash>`` (or ``base``); ``reward_version`` is the hash of t*.
    """

    run_dir: str
    run_id: str
    config: TRPromptConfig
    templates: Templates
    optimal_reward: str
    adapter_name: str | None
    adapter_path: str | None
    adapter_version: str
    reward_version: str
    iteration: int | None = None
    phase: str | None = None
    val_accuracy: float | None = None

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> "RunSpec":
        """Read ``config.yaml``, ``best.json`` and ``templates.json`` of a finished run."""
        root = Path(run_dir).expanduser().resolve()
        if not root.is_dir():
            raise RunDirError(f"run directory not found: {run_dir}")
        cfg_path, best_path = root / "config.yaml", root / "best.json"
        if not cfg_path.is_file():
            raise RunDirError(f"{root}: no config.yaml (not a TRPrompt run directory)")
        if not best_path.is_file():
            raise RunDirError(f"{root}: no best.json (the run has not finished)")
        try:
            raw = yaml.safe_load(cfg_path.read_text()) or {}
            if not isinstance(raw, dict):
                raise RunDirError(f"{cfg_path}: not a mapping")
            raw["templates_file"] = None  # the resolved texts are in templates.json
            config = config_from_dict(raw)
            best = json.loads(best_path.read_text())
        except (ValueError, yaml.YAMLError, OSError) as e:
            raise RunDirError(f"{root}: unreadable run artifacts: {e}") from e
        if not isinstance(best, dict):
            raise RunDirError(f"{best_path}: not a JSON object")
        templates = _read_templates(root / "templates.json")
        reward = best.get("optimal_reward") or templates.initial_optimal_reward
        if not isinstance(reward, str):
            raise RunDirError(f"{best_path}: optimal_reward must be a string")
        adapter_name = best.get("adapter")
        adapter_path = _locate_adapter(root, best) if adapter_name else None
        acc = best.get("accuracy")
        return cls(
            run_dir=str(root),
            run_id=f"{root.name}@{config.hash()}",
            config=config,
            templates=templates,
            optimal_reward=reward,
            adapter_name=str(adapter_name) if adapter_name else None,
            adapter_path=str(adapter_path) if adapter_path else None,
            adapter_version=f"{adapter_name}@{adapter_fingerprint(adapter_path)}" if adapter_path else "base",
            reward_version=reward_hash(reward),
            iteration=best.get("iteration"),
            phase=best.get("phase"),
            val_accuracy=float(acc) if isinstance(acc, (int, float)) else None,
        )

    def with_overrides(self, adapter_path: str | None = None, optimal_reward: str | None = None) -> "RunSpec":
        """A copy with another adapter folder and/or another t* (for a reload without a run dir)."""
        spec = self
        if adapter_path is not None:
            p = Path(adapter_path).expanduser().resolve()
            _check_adapter_dir(p)
            spec = dataclasses.replace(spec, adapter_name=p.name if p.name != "adapter" else p.parent.name,
                                       adapter_path=str(p), adapter_version=f"{p.parent.name}/{p.name}@"
                                       f"{adapter_fingerprint(p)}")
        if optimal_reward is not None:
            spec = dataclasses.replace(spec, optimal_reward=optimal_reward, reward_version=reward_hash(optimal_reward))
        return spec

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (what /v1/info reports)."""
        return {
            "run_id": self.run_id,
            "run_dir": self.run_dir,
            "adapter": self.adapter_name,
            "adapter_path": self.adapter_path,
            "adapter_version": self.adapter_version,
            "optimal_reward": self.optimal_reward,
            "optimal_reward_version": self.reward_version,
            "best_iteration": self.iteration,
            "best_phase": self.phase,
            "validation_accuracy": self.val_accuracy,
            "dataset": self.config.dataset.name,
        }


def _read_templates(path: Path) -> Templates:
    if not path.is_file():
        return Templates()
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise RunDirError(f"{path}: unreadable: {e}") from e
    names = {f.name for f in dataclasses.fields(Templates)}
    version = data.get("version")
    if version not in (None, TEMPLATES_VERSION):
        log.warning("%s has templates version %s; this code has %s", path, version, TEMPLATES_VERSION)
    return Templates(**{k: v for k, v in data.items() if k in names and isinstance(v, str)})


def _check_adapter_dir(p: Path) -> None:
    if not (p / "adapter_config.json").is_file():
        raise RunDirError(f"{p}: not a peft adapter folder (no adapter_config.json)")


def _locate_adapter(root: Path, best: dict[str, Any]) -> Path:
    """The adapter folder of ``best.json``: inside the run dir first (runs may be moved), then as recorded."""
    candidates = []
    if isinstance(best.get("iteration"), int):
        candidates.append(root / f"iter_{best['iteration']}" / "adapter")
    recorded = best.get("adapter_path")
    if isinstance(recorded, str) and recorded:
        rp = Path(recorded).expanduser()
        candidates += [rp] if rp.is_absolute() else [root.parent / rp, root / rp, Path.cwd() / rp]
    for c in candidates:
        if (c / "adapter_config.json").is_file():
            return c.resolve()
    raise RunDirError(f"{root}: best.json names adapter {best.get('adapter')!r} but none of "
                      f"{[str(c) for c in candidates]} holds a peft adapter")


def write_base_run(
    run_dir: str | Path,
    prompt_model: ModelConfig | dict[str, Any],
    target_model: ModelConfig | dict[str, Any] | None = None,
    optimal_reward: str | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Fabricate a servable run directory with no adapter (the base prompt model and default t*).

    Useful to serve an untrained prompt model (a baseline) or for benchmarks. The
    directory gets ``config.yaml``, ``templates.json`` and a ``best.json`` at iteration 0.
    """
    from trprompt.config import dump_config

    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    pm = dataclasses.asdict(prompt_model) if isinstance(prompt_model, ModelConfig) else dict(prompt_model)
    tm = target_model if target_model is not None else pm
    tm = dataclasses.asdict(tm) if isinstance(tm, ModelConfig) else dict(tm)
    data: dict[str, Any] = {"run_dir": str(root), "models": {"prompt_model": pm, "target_model": tm,
                                                             "reward_model": tm}}
    for k, v in (extra_config or {}).items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    cfg = config_from_dict(data)
    templates = Templates()
    reward = optimal_reward if optimal_reward is not None else templates.initial_optimal_reward
    (root / "config.yaml").write_text(dump_config(cfg))
    (root / "templates.json").write_text(json.dumps({"version": TEMPLATES_VERSION,
                                                     **dataclasses.asdict(templates)}, indent=2))
    entry = {"iteration": 0, "phase": "initial", "accuracy": None, "adapter": None, "adapter_path": None,
             "optimal_reward": reward}
    (root / "best.json").write_text(json.dumps({**entry, "history": [entry]}, indent=2))
    return root


# ----------------------------------------------------------------------------------------------
# Messages between the deployments
# ----------------------------------------------------------------------------------------------


@dataclass
class PromptJob:
    """One /v1/prompt request after validation."""

    question: str
    n: int = 1
    temperature: float | None = None


@dataclass
class PromptOutcome:
    """Π's instructions for one question, with the version that wrote them."""

    prompts: list[str]
    prompt_tokens: int
    completion_tokens: int
    run_id: str
    adapter_version: str
    adapter_id: str | None
    reward_version: str
    epoch: int
    replica: str
    target_messages: list[Message]
    target_sampling: SamplingParams
    batch_size: int


@dataclass
class AnswerJob:
    """One target-model request."""

    messages: list[Message]
    sampling: SamplingParams


@dataclass
class AnswerOutcome:
    """The target model's answer."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    replica: str
    batch_size: int


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


class _Metrics:
    """Ray custom metrics of this process, created lazily; every call is best-effort."""

    def __init__(self) -> None:
        self._m: dict[str, Any] | None = None

    def _get(self) -> dict[str, Any] | None:
        if self._m is None:
            try:
                from ray.util.metrics import Counter, Histogram

                self._m = {
                    "requests": Counter("trprompt_serve_requests_total", "HTTP requests by route and status.",
                                        tag_keys=("route", "status")),
                    "latency": Histogram("trprompt_serve_request_latency_s", "HTTP request latency in seconds.",
                                         boundaries=LATENCY_BOUNDARIES, tag_keys=("route",)),
                    "batch": Histogram("trprompt_serve_batch_size", "Requests merged into one engine call.",
                                       boundaries=BATCH_BOUNDARIES, tag_keys=("deployment",)),
                    "calls": Counter("trprompt_serve_engine_calls_total", "Engine generate() calls.",
                                     tag_keys=("deployment",)),
                    "tokens": Counter("trprompt_serve_tokens_total", "Tokens by model role and kind.",
                                      tag_keys=("role", "kind")),
                    "engine_latency": Histogram("trprompt_serve_engine_latency_s", "Seconds per engine call.",
                                                boundaries=LATENCY_BOUNDARIES, tag_keys=("deployment",)),
                }
            except Exception as e:  # metrics must never break serving
                log.debug("metrics unavailable: %s", e)
                self._m = {}
        return self._m

    def request(self, route: str, status: int, seconds: float) -> None:
        """Count one HTTP request."""
        m = self._get()
        if m:
            m["requests"].inc(1, {"route": route, "status": str(status)})
            m["latency"].observe(seconds, {"route": route})

    def batch(self, deployment: str, role: str, size: int, seconds: float, prompt: int, completion: int) -> None:
        """Record one engine call."""
        m = self._get()
        if m:
            m["batch"].observe(size, {"deployment": deployment})
            m["calls"].inc(1, {"deployment": deployment})
            m["engine_latency"].observe(seconds, {"deployment": deployment})
            if prompt:
                m["tokens"].inc(prompt, {"role": role, "kind": "prompt"})
            if completion:
                m["tokens"].inc(completion, {"role": role, "kind": "completion"})


METRICS = _Metrics()


@dataclass
class EngineStats:
    """Counters of one replica's engine use (reported by /v1/info; the test of batching reads them).

    ``engine_seconds`` is the wall time of the engine calls; unbatched calls that overlap
    wait for the engine's lock, and that wait is included.
    """

    engine_calls: int = 0
    requests: int = 0
    batch_sizes: TallyCounter[int] = field(default_factory=TallyCounter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "engine_calls": self.engine_calls,
            "requests": self.requests,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "max_batch_size_seen": max(self.batch_sizes, default=0),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "engine_seconds": round(self.engine_seconds, 4),
        }


# ----------------------------------------------------------------------------------------------
# The published version (a deployment-scoped actor shared by the PromptModel replicas)
# ----------------------------------------------------------------------------------------------


class VersionStore:
    """Holds the prompt-model version every replica should serve, with a growing epoch number."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.epoch = 0
        self.next_epoch = 1

    def reserve(self, at_least: int = 1) -> int:
        """A fresh epoch number (>= ``at_least``) for a reload about to be attempted.

        ``at_least`` lets a replica push the counter past its own epoch, should this
        actor have been recreated (and restarted counting) since that epoch was published.
        """
        e = max(self.next_epoch, at_least)
        self.next_epoch = e + 1
        return e

    def publish(self, spec: RunSpec, epoch: int) -> bool:
        """Make ``spec`` current if ``epoch`` is newer than the current one."""
        if epoch <= self.epoch:
            return False
        self.spec, self.epoch = spec, epoch
        return True

    def current(self) -> tuple[int, RunSpec]:
        """The current epoch and spec."""
        return self.epoch, self.spec


VersionStoreActor = ray.remote(num_cpus=0, max_concurrency=64)(VersionStore)


# ----------------------------------------------------------------------------------------------
# Model deployments
# ----------------------------------------------------------------------------------------------


@dataclass
class _Active:
    """The version a replica serves now, and how many engine calls still use it."""

    spec: RunSpec
    epoch: int
    adapter_id: str | None
    inflight: int = 0
    retired: bool = False
    unloaded: bool = False


class BatchGate:
    """Holds new requests while an engine call of one batch queue runs.

    Serve's batcher forms the next batch as soon as the previous one has been handed
    over, from whatever arrived within ``batch_wait_timeout_s``, and queues it behind
    the running call. With engine calls that take seconds, that turns a steady stream
    of requests into many small batches. Requests that wait here instead enter the
    batcher together when the running call ends, so they become one batch (up to
    ``max_batch_size``).
    """

    def __init__(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait(self) -> None:
        """Return when no engine call of this queue is running."""
        await self._idle.wait()

    def busy(self) -> None:
        """An engine call starts."""
        self._idle.clear()

    def idle(self) -> None:
        """The engine call ended: let the waiting requests in."""
        self._idle.set()


def resolve_engine_factory(spec: Any) -> Any:
    """The engine builder named by ``ServeArgs.engine_factory`` (default: ``build_engine``)."""
    if spec is None:
        from trprompt.engines.factory import build_engine

        return build_engine
    if callable(spec):
        return spec
    if isinstance(spec, str) and ":" in spec:
        import importlib

        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)
    raise ValueError(f"engine_factory must be a callable or 'module:function', got {spec!r}")


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"local-{os.getpid()}"


class _EngineServer:
    """Shared part of the model deployments: one engine, batched and counted."""

    deployment_name = "engine"

    def _setup(self, model_cfg: ModelConfig, settings: ServeArgs) -> None:
        self.settings = settings
        self.model_cfg = model_cfg
        self.engine = resolve_engine_factory(settings.engine_factory)(model_cfg)
        self.replica = _replica_name()
        self.started = time.time()
        self.stats: dict[str, EngineStats] = {"prompt": EngineStats(), "target": EngineStats()}
        self.gates = {"prompt": BatchGate(), "target": BatchGate()}
        if settings.batching:
            for method in (self._answer_batch, self._prompt_batch):
                method.set_max_batch_size(settings.max_batch_size)
                method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def _generate(self, requests: list[ChatRequest], role: str) -> list[ChatResult]:
        """One engine call in a worker thread (the event loop keeps accepting requests meanwhile)."""
        t0 = time.perf_counter()
        results = await asyncio.to_thread(self.engine.generate, requests)
        dt = time.perf_counter() - t0
        if len(results) != len(requests):
            raise RuntimeError(f"engine returned {len(results)} results for {len(requests)} requests")
        st = self.stats[role]
        st.engine_calls += 1
        st.requests += len(requests)
        st.batch_sizes[len(requests)] += 1
        p = sum(r.prompt_tokens for r in results)
        c = sum(r.completion_tokens for r in results)
        st.prompt_tokens += p
        st.completion_tokens += c
        st.engine_seconds += dt
        METRICS.batch(self.deployment_name, f"{role}_model", len(requests), dt, p, c)
        return results

    # --- target requests (TargetModel, or PromptModel when the engines are shared)
    async def answer(self, job: AnswerJob) -> AnswerOutcome:
        """Answer one target request (merged with concurrent ones when batching is on)."""
        if self.settings.batching:
            await self.gates["target"].wait()
            return await self._answer_batch(job)
        return (await self._run_answers([job]))[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _answer_batch(self, jobs: list[AnswerJob]) -> list[AnswerOutcome]:
        self.gates["target"].busy()
        try:
            return await self._run_answers(jobs)
        finally:
            self.gates["target"].idle()

    async def _run_answers(self, jobs: list[AnswerJob]) -> list[AnswerOutcome]:
        reqs = [ChatRequest(list(j.messages), j.sampling) for j in jobs]
        results = await self._generate(reqs, "target")
        return [AnswerOutcome(r.text, r.prompt_tokens, r.completion_tokens, self.replica, len(jobs))
                for r in results]

    # --- prompt requests (PromptModel only)
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _prompt_batch(self, jobs: list[PromptJob]) -> list[PromptOutcome]:
        self.gates["prompt"].busy()
        try:
            return await self._run_prompts(jobs)
        finally:
            self.gates["prompt"].idle()

    async def _run_prompts(self, jobs: list[PromptJob]) -> list[PromptOutcome]:
        """Overridden by :class:`PromptModel`; a target-only replica never hosts Π."""
        raise RuntimeError(f"{type(self).__name__} does not host the prompt model; send prompt jobs to PromptModel")

    def ping(self) -> dict[str, Any]:
        """Liveness answer for /healthz."""
        return {"replica": self.replica, "uptime_s": round(time.time() - self.started, 3)}

    def check_health(self) -> None:
        """Serve's periodic health check: the engine object must exist."""
        if getattr(self, "engine", None) is None:
            raise RuntimeError("engine not loaded")


class PromptModel(_EngineServer):
    """Π with the run's LoRA adapter and t*; answers target requests too when engines are shared."""

    deployment_name = "PromptModel"

    async def __init__(self, spec: RunSpec, settings: dict[str, Any], serves_target: bool) -> None:
        cfg = ServeArgs.model_validate(settings)
        await asyncio.to_thread(self._setup, spec.config.models.prompt_model, cfg)
        self.serves_target = serves_target
        self._active: _Active | None = None
        self._swap_lock = asyncio.Lock()
        self._loaded_ids: set[str] = set()
        self._store: Any = None
        epoch, current = 0, spec
        store = self._version_store()
        if store is not None:  # a restarted or added replica starts from the published version
            try:
                epoch, current = await store.current.remote()
            except Exception as e:
                log.warning("version store unreachable at start, serving the deployed version: %s", e)
        await self._swap_to(current, epoch)
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())

    # --- the version store
    def _version_store(self) -> Any:
        if self._store is None:
            try:
                self._store = serve.get_deployment_actor(VERSION_STORE)
            except Exception as e:  # not inside Serve, or the actor is being recreated
                log.debug("version store not available: %s", e)
        return self._store

    async def _sync_loop(self) -> None:
        """Adopt versions that another replica published."""
        while True:
            await asyncio.sleep(self.settings.sync_interval_s)
            store = self._version_store()
            if store is None:
                continue
            try:
                epoch, spec = await store.current.remote()
            except Exception as e:
                log.debug("version store poll failed: %s", e)
                self._store = None
                continue
            if self._active is not None and epoch > self._active.epoch:
                try:
                    await self._swap_to(spec, epoch)
                except Exception:
                    log.exception("could not adopt published version %s", epoch)

    # --- hot swap
    async def _swap_to(self, spec: RunSpec, epoch: int) -> bool:
        """Load ``spec``'s adapter under a new id, switch to it, retire the old version."""
        async with self._swap_lock:
            if self._active is not None and epoch <= self._active.epoch:
                return False
            new_id = None
            if spec.adapter_path is not None:
                # a fresh id per load (torch module names allow no dots): never reuse a live adapter's id
                stem = re.sub(r"[^A-Za-z0-9_-]", "_", spec.adapter_name or "adapter")[:40]
                new_id = f"{stem}_e{epoch}_{uuid.uuid4().hex[:6]}"
                await asyncio.to_thread(self.engine.load_adapter, new_id, spec.adapter_path)
                self._loaded_ids.add(new_id)
            old, self._active = self._active, _Active(spec, epoch, new_id)
            log.info("serving epoch %d: adapter %s (%s), t* %s", epoch, new_id, spec.adapter_version,
                     spec.reward_version)
            if old is not None:
                old.retired = True
                await self._maybe_unload(old)
            return True

    async def _maybe_unload(self, version: _Active) -> None:
        if not version.retired or version.inflight > 0 or version.unloaded:
            return
        version.unloaded = True
        if version.adapter_id is not None:
            try:
                await asyncio.to_thread(self.engine.unload_adapter, version.adapter_id)
            except Exception:
                log.exception("unloading adapter %s failed", version.adapter_id)
            self._loaded_ids.discard(version.adapter_id)

    async def reload(self, spec: RunSpec) -> dict[str, Any]:
        """Swap this replica to ``spec`` now, then publish it for the other replicas."""
        assert self._active is not None
        mine = self._active.epoch + 1
        store = self._version_store()
        epoch = int(await store.reserve.remote(mine)) if store is not None else mine
        previous = self._active.spec.summary()
        if not await self._swap_to(spec, epoch):
            raise RuntimeError(f"epoch {epoch} is not newer than the served epoch {self._active.epoch}")
        published = False
        if store is not None:
            published = bool(await store.publish.remote(spec, epoch))
        return {"epoch": epoch, "published": published, "replica": self.replica, "previous": previous,
                "current": self._active.spec.summary()}

    # --- prompts
    async def prompts(self, job: PromptJob) -> PromptOutcome:
        """Π's instructions for one question (merged with concurrent ones when batching is on)."""
        if self.settings.batching:
            await self.gates["prompt"].wait()
            return await self._prompt_batch(job)
        return (await self._run_prompts([job]))[0]

    async def _run_prompts(self, jobs: list[PromptJob]) -> list[PromptOutcome]:
        active = self._active
        assert active is not None
        spec, gen = active.spec, active.spec.config.generation
        active.inflight += 1
        try:
            reqs = []
            for j in jobs:
                temp = gen.prompt_eval_temperature if j.temperature is None else j.temperature
                sp = SamplingParams(temperature=temp, max_tokens=gen.prompt_max_tokens, n=j.n,
                                    seed=spec.config.seed if temp == 0 else None)
                reqs.append(ChatRequest(spec.templates.prompt_model_messages(j.question, spec.optimal_reward), sp,
                                        adapter=active.adapter_id))
            results = await self._generate(reqs, "prompt")
        finally:
            active.inflight -= 1
            await self._maybe_unload(active)
        target_sp = SamplingParams(temperature=gen.target_temperature, max_tokens=gen.target_max_tokens,
                                   seed=spec.config.seed)
        out = []
        for j, r in zip(jobs, results, strict=True):
            prompts = [clean_instruction(t) for t in r.texts]
            out.append(PromptOutcome(
                prompts=prompts, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                run_id=spec.run_id, adapter_version=spec.adapter_version, adapter_id=active.adapter_id,
                reward_version=spec.reward_version, epoch=active.epoch, replica=self.replica,
                target_messages=spec.templates.target_messages(j.question, prompts[0]), target_sampling=target_sp,
                batch_size=len(jobs),
            ))
        return out

    def current_spec(self) -> RunSpec:
        """The version this replica serves now."""
        assert self._active is not None
        return self._active.spec

    async def info(self) -> dict[str, Any]:
        """The version, model and engine counters of this replica."""
        a = self._active
        return {
            "replica": self.replica,
            "epoch": a.epoch if a else None,
            "adapter_id": a.adapter_id if a else None,
            "loaded_adapters": sorted(self._loaded_ids),
            "version": a.spec.summary() if a else None,
            "model": {"model": self.model_cfg.model, "engine": self.model_cfg.engine},
            "serves_target": self.serves_target,
            "stats": {k: v.as_dict() for k, v in self.stats.items()},
        }


class TargetModel(_EngineServer):
    """The frozen target model behind the same batching."""

    deployment_name = "TargetModel"

    async def __init__(self, model_cfg: ModelConfig, settings: dict[str, Any]) -> None:
        await asyncio.to_thread(self._setup, model_cfg, ServeArgs.model_validate(settings))

    async def info(self) -> dict[str, Any]:
        """The model and engine counters of this replica."""
        return {"replica": self.replica, "model": {"model": self.model_cfg.model, "engine": self.model_cfg.engine},
                "stats": self.stats["target"].as_dict()}


# ----------------------------------------------------------------------------------------------
# HTTP API
# ----------------------------------------------------------------------------------------------


def _valid_text(v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from e
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


DatasetHint = Annotated[str | None, Field(None, max_length=32, description=f"Benchmark hint: one of {DATASETS}.")]


class _QuestionBody(_Strict):
    question: str = Field(description="The problem (not empty; at most the server's max_question_chars).")
    dataset: DatasetHint = None

    @field_validator("question")
    @classmethod
    def _question(cls, v: str) -> str:
        _valid_text(v)
        if not v.strip():
            raise ValueError("question must not be empty or whitespace")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str | None) -> str | None:
        if v is not None and v not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}")
        return v


class PromptRequest(_QuestionBody):
    """Body of ``POST /v1/prompt``."""

    n: int = Field(1, ge=1, le=8, description="How many instructions to sample.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False,
                                      description="Sampling temperature (default: the run's evaluation one).")


class SolveRequest(_QuestionBody):
    """Body of ``POST /v1/solve``."""


class ReloadRequest(_Strict):
    """Body of ``POST /v1/admin/reload``: a run directory, or an adapter folder and/or a t* text."""

    run_dir: str | None = Field(None, min_length=1, max_length=4096, description="Finished run directory.")
    adapter_path: str | None = Field(None, min_length=1, max_length=4096, description="A peft adapter folder.")
    optimal_reward: str | None = Field(None, min_length=1, max_length=20_000, description="A t* text.")

    @field_validator("run_dir", "adapter_path", "optimal_reward")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return None if v is None else _valid_text(v)


class TokenCounts(BaseModel):
    """Tokens spent by a request."""

    prompt: int
    completion: int


class PromptResponse(BaseModel):
    """Reply of ``POST /v1/prompt``."""

    prompts: list[str]
    prompt: str
    run_id: str
    adapter_version: str
    optimal_reward_version: str
    epoch: int
    dataset: str | None = None
    warning: str | None = None
    tokens: TokenCounts


class SolveResponse(BaseModel):
    """Reply of ``POST /v1/solve``."""

    prompt: str
    answer: str
    extracted: str | None
    run_id: str
    adapter_version: str
    optimal_reward_version: str
    tokens: TokenCounts
    tokens_by_role: dict[str, TokenCounts]


class ErrorResponse(BaseModel):
    """Every error body."""

    error: str
    message: str
    details: list[dict[str, Any]] | None = None


class InputError(Exception):
    """Bad input found after schema validation (e.g. a question over the length limit)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_json(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error response (``{"error", "message", "details"?}``)."""
    body: dict[str, Any] = {"error": code, "message": _safe_text(message, 2000)}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def _safe_text(value: Any, limit: int = 200) -> str:
    """``value`` as a short string that is always encodable as UTF-8."""
    s = str(value)
    if len(s) > limit:
        s = s[:limit] + "..."
    return s.encode("utf-8", "replace").decode("utf-8")


def clean_validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors without the offending input (which may be huge or unencodable)."""
    out = []
    for e in list(errors)[:20]:
        if not isinstance(e, dict):
            out.append({"msg": _safe_text(e)})
            continue
        loc = [x if isinstance(x, int) and not isinstance(x, bool) else _safe_text(x, 80) for x in e.get("loc", ())]
        out.append({"loc": loc, "msg": _safe_text(e.get("msg", ""), 300), "type": _safe_text(e.get("type", ""), 60)})
    return out


def map_exception(exc: BaseException) -> JSONResponse:
    """The JSON response for a failure while serving a valid request."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    if isinstance(exc, InputError):
        return error_json(exc.status, exc.code, exc.message)
    if isinstance(exc, RunDirError):
        return error_json(422, "invalid_run", str(exc))
    if isinstance(exc, BackPressureError):
        return error_json(503, "overloaded", "too many requests queued; retry later", headers={"Retry-After": "1"})
    if isinstance(exc, TimeoutError):
        return error_json(504, "timeout", "the model did not answer in time; retry later",
                          headers={"Retry-After": "1"})
    if isinstance(exc, (RayActorError, DeploymentUnavailableError, RequestCancelledError)):
        return error_json(503, "replica_unavailable", f"a model replica is unavailable ({type(exc).__name__}); "
                          "retry shortly", headers={"Retry-After": "1"})
    if isinstance(exc, RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return error_json(500, "engine_error", f"{type(cause).__name__}: {_safe_text(cause, 500)}")
    return error_json(500, "internal_error", f"{type(exc).__name__}: {_safe_text(exc, 500)}")


async def _as_awaitable(response: Any) -> Any:
    return await response


app = FastAPI(
    title="TRPrompt query-aware prompts",
    description="Query-aware instructions from a TRPrompt run (prompt model + LoRA adapter + optimal reward t*).",
    version="1",
    max_body_size=HARD_MAX_BODY_BYTES,
)

_LIMITS: dict[str, int] = {"max_body_bytes": 64 * 1024}
"""Set by the ingress replica of this process (one per process) from its settings."""


def set_body_limit(max_body_bytes: int) -> None:
    """Set the body-size limit the middleware of this process enforces.

    A module-level function on purpose: Serve pickles the ingress class by value, so
    it must reach this module's state through a by-reference function.
    """
    _LIMITS["max_body_bytes"] = int(max_body_bytes)


@app.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = clean_validation_errors(exc.errors())
    code = "invalid_json" if any(d.get("type") == "json_invalid" for d in details) else "invalid_request"
    return error_json(422 if code == "invalid_request" else 400, code, "the request body is not valid", details)


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
            413: "body_too_large"}.get(exc.status_code, "http_error")
    return error_json(exc.status_code, code, _safe_text(exc.detail, 500), headers=getattr(exc, "headers", None))


@app.exception_handler(InputError)
async def _on_input_error(request: Request, exc: InputError) -> JSONResponse:
    return error_json(exc.status, exc.code, exc.message)


@app.middleware("http")
async def _guard(request: Request, call_next: Any) -> Any:
    """Body-size limit, metrics, and a last-resort JSON 500 for anything unexpected."""
    t0 = time.perf_counter()
    response: Any
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > _LIMITS["max_body_bytes"]):
        bad = not length.isdigit()
        response = error_json(400 if bad else 413, "bad_request" if bad else "body_too_large",
                              "invalid Content-Length" if bad else f"body over {_LIMITS['max_body_bytes']} bytes")
    else:
        try:
            response = await call_next(request)
        except Exception as e:  # pragma: no cover - routes catch their own errors
            log.exception("unhandled error on %s", request.url.path)
            response = map_exception(e)
    route = request.scope.get("route")
    METRICS.request(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - t0)
    return response


@serve.ingress(app)
class Ingress:
    """HTTP front: validation, routing to the model deployments, JSON errors."""

    def __init__(self, prompt_model: Any, target_model: Any | None, spec: RunSpec, settings: dict[str, Any],
                 shared: bool) -> None:
        self.settings = ServeArgs.model_validate(settings)
        set_body_limit(self.settings.max_body_bytes)
        self.prompt_model = prompt_model
        self.target_model = target_model
        self.spec = spec
        self.shared = shared
        self._reload_lock = asyncio.Lock()

    async def _call(self, response: Any) -> Any:
        """Await a deployment response under the per-request deadline (cancelled when it passes)."""
        try:
            return await asyncio.wait_for(_as_awaitable(response), timeout=self.settings.request_timeout_s)
        except TimeoutError:
            try:
                response.cancel()
            except Exception:
                pass
            raise

    def _check_question(self, question: str) -> None:
        if len(question) > self.settings.max_question_chars:
            limit = self.settings.max_question_chars
            raise InputError(422, "question_too_long", f"question has {len(question)} characters; the limit is {limit}")

    def _warning(self, dataset: str | None) -> str | None:
        trained = self.spec.config.dataset.name
        if dataset is not None and dataset != trained:
            return f"this prompt model was trained on {trained}, not {dataset}"
        return None

    @app.post("/v1/prompt", response_model=PromptResponse, responses={400: {"model": ErrorResponse},
              422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}})
    async def prompt(self, body: PromptRequest) -> Any:
        """Query-aware instruction(s) Π(question, t*) from the served run."""
        self._check_question(body.question)
        try:
            out: PromptOutcome = await self._call(self.prompt_model.prompts.remote(
                PromptJob(body.question, body.n, body.temperature)))
        except Exception as e:
            return map_exception(e)
        return PromptResponse(
            prompts=out.prompts, prompt=out.prompts[0], run_id=out.run_id, adapter_version=out.adapter_version,
            optimal_reward_version=out.reward_version, epoch=out.epoch, dataset=body.dataset,
            warning=self._warning(body.dataset),
            tokens=TokenCounts(prompt=out.prompt_tokens, completion=out.completion_tokens),
        )

    @app.post("/v1/solve", response_model=SolveResponse, responses={400: {"model": ErrorResponse},
              404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def solve(self, body: SolveRequest) -> Any:
        """Instruction from Π, answer from the target model, and the extracted final answer."""
        from trprompt.grading import extract_answer

        self._check_question(body.question)
        if self.target_model is None:
            return error_json(404, "no_target", "this deployment has no target model (started with --no-target)")
        try:
            p: PromptOutcome = await self._call(self.prompt_model.prompts.remote(PromptJob(body.question)))
            a: AnswerOutcome = await self._call(self.target_model.answer.remote(
                AnswerJob(p.target_messages, p.target_sampling)))
        except Exception as e:
            return map_exception(e)
        by_role = {"prompt_model": TokenCounts(prompt=p.prompt_tokens, completion=p.completion_tokens),
                   "target_model": TokenCounts(prompt=a.prompt_tokens, completion=a.completion_tokens)}
        return SolveResponse(
            prompt=p.prompts[0], answer=a.text, extracted=extract_answer(a.text), run_id=p.run_id,
            adapter_version=p.adapter_version, optimal_reward_version=p.reward_version,
            tokens=TokenCounts(prompt=p.prompt_tokens + a.prompt_tokens,
                               completion=p.completion_tokens + a.completion_tokens),
            tokens_by_role=by_role,
        )

    @app.get("/healthz")
    async def healthz(self) -> Any:
        """200 when a prompt-model replica answers within 5 s, else 503."""
        try:
            r = await asyncio.wait_for(_as_awaitable(self.prompt_model.ping.remote()), timeout=5.0)
        except Exception as e:
            return error_json(503, "unhealthy", f"prompt model not answering ({type(e).__name__})")
        return {"status": "ok", "prompt_model": r}

    @app.get("/v1/info")
    async def info(self) -> Any:
        """Run id, models, t*, validation accuracy, adapter version, batching settings and engine counters."""
        try:
            p = await self._call(self.prompt_model.info.remote())
            t = None
            if self.target_model is not None and not self.shared:
                t = await self._call(self.target_model.info.remote())
        except Exception as e:
            return map_exception(e)
        version = p["version"] or {}
        models = self.spec.config.models
        s = self.settings
        return {
            **version,
            "epoch": p["epoch"],
            "adapter_id": p["adapter_id"],
            "loaded_adapters": p["loaded_adapters"],
            "models": {
                "prompt_model": {"model": models.prompt_model.model, "engine": models.prompt_model.engine},
                "target_model": ({"model": models.target_model.model, "engine": models.target_model.engine,
                                  "shared_with_prompt_model": self.shared} if self.target_model is not None
                                 else None),
            },
            "batching": {"enabled": s.batching, "max_batch_size": s.max_batch_size,
                         "batch_wait_timeout_s": s.batch_wait_timeout_s},
            "limits": {"max_question_chars": s.max_question_chars, "max_body_bytes": s.max_body_bytes,
                       "request_timeout_s": s.request_timeout_s},
            "replicas": {"prompt_model": p["replica"], "target_model": t["replica"] if t else None},
            "stats": {"prompt_model": p["stats"]["prompt"],
                      "target_model": t["stats"] if t else (p["stats"]["target"] if self.shared else None)},
        }

    @app.post("/v1/admin/reload", responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
              409: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})
    async def reload(self, body: ReloadRequest, request: Request) -> Any:
        """Hot-swap the adapter and t*: load under a new id, switch, unload the old one; no request is dropped."""
        s = self.settings
        if not s.enable_admin:
            return error_json(404, "not_found", "admin routes are disabled")
        if s.admin_token and request.headers.get("authorization") != f"Bearer {s.admin_token}":
            return error_json(401, "unauthorized", "admin token required")
        if body.run_dir is None and body.adapter_path is None and body.optimal_reward is None:
            return error_json(422, "invalid_request", "give run_dir, or adapter_path and/or optimal_reward")
        if body.run_dir is not None and (body.adapter_path is not None or body.optimal_reward is not None):
            return error_json(422, "invalid_request", "give either run_dir or adapter_path/optimal_reward, not both")
        async with self._reload_lock:
            try:
                if body.run_dir is not None:
                    spec = await asyncio.to_thread(RunSpec.from_run_dir, body.run_dir)
                else:
                    current: RunSpec = await self._call(self.prompt_model.current_spec.remote())
                    spec = await asyncio.to_thread(current.with_overrides, body.adapter_path, body.optimal_reward)
            except Exception as e:
                return map_exception(e)
            old, new = self.spec.config.models.prompt_model, spec.config.models.prompt_model
            if (old.model, old.engine) != (new.model, new.engine):
                return error_json(409, "base_model_mismatch", f"served prompt model is {old.engine}:{old.model}; "
                                  f"the new run uses {new.engine}:{new.model} (redeploy instead)")
            try:
                result = await self._call(self.prompt_model.reload.remote(spec))
            except RayTaskError as e:  # the adapter did not load: the old version keeps serving
                cause = e.cause if getattr(e, "cause", None) is not None else e
                return error_json(422, "reload_failed", f"{type(cause).__name__}: {_safe_text(cause, 500)}")
            except Exception as e:
                return map_exception(e)
        return {"status": "ok", **result}


# ----------------------------------------------------------------------------------------------
# Building the application
# ----------------------------------------------------------------------------------------------


def _deployment_options(s: ServeArgs, model_cfg: ModelConfig) -> dict[str, Any]:
    actor = {"num_cpus": model_cfg.num_cpus if s.num_cpus is None else s.num_cpus,
             "num_gpus": model_cfg.num_gpus if s.num_gpus is None else s.num_gpus}
    opts: dict[str, Any] = {
        "ray_actor_options": actor,
        "max_ongoing_requests": s.replica_max_ongoing,
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": max(30.0, 3 * s.health_check_period_s),
        "graceful_shutdown_timeout_s": max(5.0, min(60.0, s.request_timeout_s)),
    }
    if s.max_replicas > max(1, s.min_replicas):
        opts["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "initial_replicas": max(1, s.min_replicas),
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests or float(s.max_batch_size),
        }
    else:
        opts["num_replicas"] = max(1, s.min_replicas)
    return opts


def build_app(args: dict[str, Any] | ServeArgs) -> serve.Application:
    """The Serve application for a finished run (a Serve app builder: ``key=value`` args, see :class:`ServeArgs`).

    Raises :class:`RunDirError` if the run directory cannot be served and
    ``pydantic.ValidationError`` for bad arguments.
    """
    s = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(dict(args))
    spec = RunSpec.from_run_dir(s.run_dir)
    models = spec.config.models
    share = models.share_engines if s.share_engines is None else s.share_engines
    shared = s.with_target and share and models.prompt_model.pool_key() == models.target_model.pool_key()
    settings = s.model_dump()
    prompt = serve.deployment(PromptModel, name="PromptModel").options(
        **_deployment_options(s, models.prompt_model),
        deployment_actors=[DeploymentActorConfig(name=VERSION_STORE, actor_class=VersionStoreActor,
                                                 init_kwargs={"spec": spec}, actor_options={"num_cpus": 0})],
    ).bind(spec, settings, shared)
    target = None
    if s.with_target:
        target = prompt if shared else serve.deployment(TargetModel, name="TargetModel").options(
            **_deployment_options(s, models.target_model)).bind(models.target_model, settings)
    ingress = serve.deployment(Ingress, name="Ingress").options(
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
        max_ongoing_requests=s.ingress_max_ongoing_requests,
    )
    return ingress.bind(prompt, target, spec, settings, shared)

