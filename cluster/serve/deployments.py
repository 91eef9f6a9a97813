"""The model deployments: ``PromptModel`` (Π + adapter + t*, hot swap) and ``TargetModel``."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from typing import Any

from ray import serve

from cluster.serve.args import ServeArgs
from cluster.serve.batching import BatchGate
from cluster.serve.messages import AnswerJob, AnswerOutcome, PromptJob, PromptOutcome
from cluster.serve.metrics import METRICS, EngineStats
from cluster.serve.run_spec import SAMPLE_QUESTION, RunSpec, check_servable
from cluster.serve.versions import VERSION_STORE, ActiveVersion
from trprompt.config import ModelConfig
from trprompt.engines.base import ChatRequest, ChatResult, SamplingParams
from trprompt.evaluation import target_seed
from trprompt.policies import clean_instruction, eval_sampling, prompt_model_request

log = logging.getLogger("trprompt.serve")


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


def _finish_reason(result: ChatResult, sampling: SamplingParams) -> str:
    """OpenAI's finish reason of a result: the engine's, else ``length`` when it used every allowed token."""
    if result.finish_reasons:
        return "length" if result.finish_reasons[0] == "length" else "stop"
    return "length" if result.completion_tokens >= sampling.max_tokens * max(1, sampling.n) else "stop"


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
        return [AnswerOutcome(r.text, r.prompt_tokens, r.completion_tokens, self.replica, len(jobs),
                              _finish_reason(r, j.sampling)) for r, j in zip(results, jobs, strict=True)]

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
        """Readiness answer for /healthz: ``ready`` is False when this replica cannot serve a request."""
        reason = None if getattr(self, "engine", None) is not None else "engine not loaded"
        return {"replica": self.replica, "uptime_s": round(time.time() - self.started, 3), "ready": reason is None,
                "reason": reason}

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
        self._active: ActiveVersion | None = None
        self._swap_lock = asyncio.Lock()
        self._loaded_ids: set[str] = set()
        self._store: Any = None
        self._adopt_error: str | None = None
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
                except Exception as e:
                    self._adopt_error = f"could not adopt published version {epoch}: {type(e).__name__}"
                    log.exception("could not adopt published version %s", epoch)

    # --- hot swap
    async def _swap_to(self, spec: RunSpec, epoch: int) -> bool:
        """Load ``spec``'s adapter under a new id, try it on one question, switch to it, retire the old version.

        If the version does not render, its adapter does not load, or the trial
        generation fails, the new adapter is unloaded and the old version keeps serving.
        """
        async with self._swap_lock:
            if self._active is not None and epoch <= self._active.epoch:
                return False
            check_servable(spec, self.settings.max_reward_chars)
            new_id = None
            if spec.adapter_path is not None:
                # a fresh id per load (torch module names allow no dots): never reuse a live adapter's id
                stem = re.sub(r"[^A-Za-z0-9_-]", "_", spec.adapter_name or "adapter")[:40]
                new_id = f"{stem}_e{epoch}_{uuid.uuid4().hex[:6]}"
                await asyncio.to_thread(self.engine.load_adapter, new_id, spec.adapter_path)
                self._loaded_ids.add(new_id)
            try:
                await asyncio.to_thread(self._trial, spec, new_id)
            except Exception:
                if new_id is not None:
                    self._loaded_ids.discard(new_id)
                    try:
                        await asyncio.to_thread(self.engine.unload_adapter, new_id)
                    except Exception:
                        log.exception("unloading the rejected adapter %s failed", new_id)
                raise
            old, self._active = self._active, ActiveVersion(spec, epoch, new_id)
            self._adopt_error = None
            log.info("serving epoch %d: adapter %s (%s), t* %s", epoch, new_id, spec.adapter_version,
                     spec.reward_version)
            if old is not None:
                old.retired = True
                await self._maybe_unload(old)
            return True

    def _trial(self, spec: RunSpec, adapter_id: str | None) -> None:
        """Generate one short instruction with ``spec`` (the version must produce a prompt before it serves)."""
        gen = spec.config.generation
        sp = SamplingParams(temperature=0.0, max_tokens=max(1, min(8, gen.prompt_max_tokens)), seed=spec.config.seed)
        req = prompt_model_request(spec.templates, SAMPLE_QUESTION, spec.optimal_reward, sp, adapter=adapter_id)
        results = self.engine.generate([req])
        if len(results) != 1 or not results[0].texts:
            raise RuntimeError("the trial generation returned no text")

    async def _maybe_unload(self, version: ActiveVersion) -> None:
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
                sp = eval_sampling(gen, seed=spec.config.seed if temp == 0 else None, temperature=temp, n=j.n)
                reqs.append(prompt_model_request(spec.templates, j.question, spec.optimal_reward, sp,
                                                 adapter=active.adapter_id))
            results = await self._generate(reqs, "prompt")
        finally:
            active.inflight -= 1
            await self._maybe_unload(active)
        out = []
        for j, r in zip(jobs, results, strict=True):
            prompts = [clean_instruction(t) for t in r.texts]
            out.append(PromptOutcome(
                prompts=prompts, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                run_id=spec.run_id, adapter_version=spec.adapter_version, adapter_id=active.adapter_id,
                reward_version=spec.reward_version, epoch=active.epoch, replica=self.replica,
                target_messages=spec.templates.target_messages(j.question, prompts[0]),
                target_sampling=SamplingParams(temperature=gen.target_temperature, max_tokens=gen.target_max_tokens,
                                               seed=target_seed(spec.config.seed, j.question)),
                batch_size=len(jobs),
            ))
        return out

    def ping(self) -> dict[str, Any]:
        """Readiness: an engine, a served version that renders, and no published version it failed to adopt."""
        out = super().ping()
        reason = out["reason"]
        if reason is None and self._active is None:
            reason = "no version loaded"
        if reason is None and self._adopt_error is not None:
            reason = self._adopt_error
        if reason is None:
            try:
                check_servable(self._active.spec, self.settings.max_reward_chars)  # type: ignore[union-attr]
            except Exception as e:
                reason = f"the served version cannot render a request ({type(e).__name__})"
        return {**out, "ready": reason is None, "reason": reason,
                "epoch": self._active.epoch if self._active else None}

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
