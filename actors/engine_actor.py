"""A Ray actor that hosts one engine.

:class:`EngineActor` is a plain class: it builds a single engine in its
constructor (from a :class:`~trprompt.config.ModelConfig` through
``trprompt.engines.factory.build_engine``, or from a zero-argument factory for
tests and custom backends) and serves batched ``generate`` calls.
:func:`make_engine_actor` turns it into a restartable Ray actor.

Restart policy: Ray restarts a crashed actor up to ``max_restarts`` times by
re-running the constructor, so a restarted actor starts with no LoRA adapters.
Ray never re-runs a call itself (``max_task_retries=0``); the
:class:`~actors.pool.EnginePool` retries failed sub-batches, which keeps rows
from being generated twice. The pool also sends its adapter table with every
``generate`` call and the actor brings its own adapters in line before it
serves, so a restarted actor is whole again before it answers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from trprompt.config import ModelConfig
from trprompt.engines.base import ChatRequest, ChatResult, Engine, Usage

EngineFactory = Callable[[], Engine]
"""A zero-argument, picklable callable that returns a ready engine."""

DEFAULT_MAX_RESTARTS = 3


class EngineActor:
    """Hosts one engine and serves whole sub-batches (one remote call per sub-batch).

    Exactly one of ``model_cfg`` and ``factory`` is used: ``factory`` wins when
    both are given. ``name`` labels the actor in :meth:`ping` (usually the pool's
    name plus the actor's index).
    """

    def __init__(
        self,
        model_cfg: ModelConfig | None = None,
        factory: EngineFactory | None = None,
        name: str = "engine",
    ) -> None:
        if factory is None and model_cfg is None:
            raise ValueError("EngineActor needs a model_cfg or a factory")
        if factory is not None:
            self.engine: Engine = factory()
        else:
            from trprompt.engines.factory import build_engine  # late: keeps heavy backends out of the driver

            self.engine = build_engine(model_cfg)
        self.model = model_cfg.model if model_cfg is not None else type(self.engine).__name__
        self.name = name
        self._adapters: dict[str, str] = {}
        self._usage = Usage()

    # -- serving ---------------------------------------------------------------------------

    def generate(self, requests: Sequence[ChatRequest], adapters: Mapping[str, str] | None = None) -> list[ChatResult]:
        """Complete ``requests`` in order.

        ``adapters`` (id -> path) is the set of LoRA adapters the caller expects
        to be loaded; when given, missing or changed ones are loaded and extra
        ones unloaded first (see :meth:`sync_adapters`).
        """
        if adapters is not None:
            self.sync_adapters(adapters)
        requests = list(requests)
        if not requests:
            return []
        results = self.engine.generate(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"{self.name}: engine returned {len(results)} results for {len(requests)} requests")
        self._usage.add(
            Usage(
                calls=1,
                requests=len(requests),
                prompt_tokens=sum(r.prompt_tokens for r in results),
                completion_tokens=sum(r.completion_tokens for r in results),
            )
        )
        return results

    # -- adapters --------------------------------------------------------------------------

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Load the LoRA adapter at ``path`` under ``adapter_id`` (replacing one of that id).

        ``path`` may be a storage URI (``s3://…``): it is downloaded once into a local cache first.
        """
        from trprompt.storage import localize

        self.engine.load_adapter(adapter_id, localize(path))
        self._adapters[adapter_id] = path

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget ``adapter_id`` (no error if it is not loaded here)."""
        if adapter_id in self._adapters:
            self.engine.unload_adapter(adapter_id)
            del self._adapters[adapter_id]

    def sync_adapters(self, wanted: Mapping[str, str]) -> list[str]:
        """Make the loaded adapters equal ``wanted`` (id -> path). Returns the ids it (re)loaded."""
        for adapter_id in [a for a in self._adapters if a not in wanted]:
            self.unload_adapter(adapter_id)
        loaded = []
        for adapter_id, path in wanted.items():
            if self._adapters.get(adapter_id) != path:
                self.load_adapter(adapter_id, path)
                loaded.append(adapter_id)
        return loaded

    def adapters(self) -> list[str]:
        """Ids of the adapters loaded in this process, sorted."""
        return sorted(self._adapters)

    # -- introspection ---------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        """Liveness and identity: pid, model, node id, host name, actor name, adapters."""
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {
            "pid": os.getpid(),
            "model": self.model,
            "node": node,
            "host": socket.gethostname(),
            "name": self.name,
            "adapters": self.adapters(),
        }

    def usage(self) -> dict[str, int]:
        """Calls, requests and tokens this process has served since it (re)started."""
        return self._usage.as_dict()


RemoteEngineActor = ray.remote(EngineActor)
"""``EngineActor`` as a Ray actor class; prefer :func:`make_engine_actor`, which sets the options."""


def make_engine_actor(
    model_cfg: ModelConfig | None = None,
    factory: EngineFactory | None = None,
    *,
    name: str = "engine",
    num_cpus: float = 0.5,
    num_gpus: float = 0.0,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    placement_group: Any | None = None,
    bundle_index: int = -1,
    runtime_env: dict[str, Any] | None = None,
) -> ray.actor.ActorHandle:
    """Start one restartable :class:`EngineActor` and return its handle (construction is asynchronous).

    ``max_task_retries`` is always 0: a call that was running when the actor
    died fails, and the caller decides where to re-run it. With a
    ``placement_group`` the actor runs in bundle ``bundle_index`` (-1: any).
    """
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_restarts": max_restarts,
        "max_task_retries": 0,
    }
    if placement_group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group,
            placement_group_bundle_index=bundle_index,
        )
    if runtime_env is not None:
        options["runtime_env"] = runtime_env
    return RemoteEngineActor.options(**options).remote(model_cfg, factory, name)
