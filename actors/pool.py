"""A pool of engine actors that is itself an :class:`~trprompt.engines.base.Engine`.

``EnginePool.generate`` cuts a batch into contiguous sub-batches, one per actor,
sends them all at once (one remote call per sub-batch, never per request),
waits for all of them and puts the results back in request order.

Retry semantics
---------------
* Actors are created with ``max_restarts`` (Ray restarts a crashed actor by
  re-running its constructor) and ``max_task_retries=0`` (Ray never re-runs a
  call by itself).
* A sub-batch fails when its actor dies or becomes unreachable while working on
  it (``RayActorError`` and its subclasses ``ActorDiedError`` /
  ``ActorUnavailableError``), when its worker crashes, or when the engine raises.
  The pool then sends the *same* sub-batch again, preferring a live actor that
  has not tried it yet, else any live actor (a crashed actor is queued behind its
  restart). A sub-batch gets at most ``max_attempts`` tries; results of a failed
  try are never used, so every row comes back exactly once.
* Not retried: :class:`~trprompt.engines.base.AdapterNotFoundError` (asking again
  cannot help) and actors whose constructor failed (they are dead for good).
* An actor that has died more than ``max_restarts`` times is taken out of the
  pool; with no actor left, calls raise :class:`EnginePoolError`.
* Adapters: the pool keeps the table of adapters loaded through it and sends it
  with every ``generate`` call; an actor loads what it lacks (and drops what the
  pool unloaded) before serving. A restarted actor therefore reloads its
  adapters before it answers the first request that reaches it.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray.exceptions import (
    ActorUnavailableError,
    NodeDiedError,
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)

from actors.engine_actor import DEFAULT_MAX_RESTARTS, EngineFactory, make_engine_actor
from trprompt.config import ModelConfig
from trprompt.engines.base import AdapterNotFoundError, ChatRequest, ChatResult, Usage

log = logging.getLogger(__name__)

Balance = Literal["count", "length"]

_RETRYABLE = (RayActorError, RayTaskError, WorkerCrashedError, ObjectLostError, OutOfMemoryError, NodeDiedError)


class EnginePoolError(RuntimeError):
    """The pool could not complete a call (no live actor, or a sub-batch ran out of attempts)."""


def estimate_prompt_tokens(request: ChatRequest) -> int:
    """A cheap prompt-length estimate (about four characters per token), used for balancing."""
    chars = sum(len(m.get("content", "")) for m in request.messages)
    return 1 + chars // 4


def split_batch(weights: Sequence[float], parts: int) -> list[tuple[int, int]]:
    """Cut ``len(weights)`` items into at most ``parts`` contiguous, non-empty ``(start, end)`` ranges.

    Cuts are placed where the running weight is closest to an equal share, so
    with equal weights the range sizes differ by at most one.
    """
    n = len(weights)
    parts = min(parts, n)
    if parts <= 0:
        return []
    prefix = list(itertools.accumulate(weights, initial=0.0))
    total = prefix[-1]
    cuts = [0]
    for j in range(1, parts):
        lo, hi = cuts[-1] + 1, n - (parts - j)  # every range keeps at least one item
        target = total * j / parts
        c = bisect.bisect_left(prefix, target, lo, hi + 1)
        c = min(max(c, lo), hi)
        if c > lo and abs(prefix[c - 1] - target) <= abs(prefix[c] - target):
            c -= 1
        cuts.append(c)
    cuts.append(n)
    return list(itertools.pairwise(cuts))


@dataclass
class _Shard:
    start: int
    end: int
    actor: int
    attempt: int = 1
    tried: set[int] = field(default_factory=set)


class EnginePool:
    """``num_actors`` restartable :class:`~actors.engine_actor.EngineActor` s behind the Engine protocol.

    Each actor builds its engine from ``model_cfg`` (or from ``factory``, a
    zero-argument picklable callable, which takes precedence). ``num_actors``,
    ``num_cpus`` and ``num_gpus`` default to the values in ``model_cfg``. With a
    ``placement_group``, actor ``i`` runs in bundle ``bundle_indices[i]``.
    ``balance="length"`` sizes sub-batches by estimated prompt length instead of
    by count. Thread-safe: several threads may call ``generate`` at once.
    """

    def __init__(
        self,
        model_cfg: ModelConfig | None,
        num_actors: int | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        name: str = "engine",
        factory: EngineFactory | None = None,
        placement_group: Any | None = None,
        bundle_indices: Sequence[int] | None = None,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        max_attempts: int = 3,
        runtime_env: dict[str, Any] | None = None,
        balance: Balance = "count",
    ) -> None:
        if model_cfg is None and factory is None:
            raise ValueError("EnginePool needs a model_cfg or a factory")
        cfg = model_cfg or ModelConfig(engine="echo")
        self.num_actors = int(num_actors if num_actors is not None else cfg.num_actors)
        self.num_cpus = float(num_cpus if num_cpus is not None else cfg.num_cpus)
        self.num_gpus = float(num_gpus if num_gpus is not None else cfg.num_gpus)
        if self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if balance not in ("count", "length"):
            raise ValueError(f"balance must be 'count' or 'length', got {balance!r}")
        if bundle_indices is not None and len(bundle_indices) != self.num_actors:
            raise ValueError(f"bundle_indices has {len(bundle_indices)} entries for {self.num_actors} actors")
        self.model_cfg = model_cfg
        self.name = name
        self.max_restarts = max_restarts
        self.max_attempts = max_attempts
        self.balance: Balance = balance
        self.placement_group = placement_group
        self.bundle_indices = list(bundle_indices) if bundle_indices is not None else None
        self._lock = threading.Lock()
        self._adapters: dict[str, str] = {}
        self._deaths = [0] * self.num_actors
        self._dead: set[int] = set()
        self._rotation = itertools.count()
        self._closed = False
        self.retries = 0
        """Sub-batches re-sent after a failure, over the pool's lifetime."""
        self.actors = [
            make_engine_actor(
                model_cfg,
                factory,
                name=f"{name}-{i}",
                num_cpus=self.num_cpus,
                num_gpus=self.num_gpus,
                max_restarts=max_restarts,
                placement_group=placement_group,
                bundle_index=self.bundle_indices[i] if self.bundle_indices is not None else -1,
                runtime_env=runtime_env,
            )
            for i in range(self.num_actors)
        ]

    @classmethod
    def from_config(cls, role: str, model_cfg: ModelConfig, **kwargs: Any) -> EnginePool:
        """A pool for ``role`` sized by ``model_cfg`` (``num_actors``, ``num_cpus``, ``num_gpus``)."""
        kwargs.setdefault("num_actors", model_cfg.num_actors)
        kwargs.setdefault("num_cpus", model_cfg.num_cpus)
        kwargs.setdefault("num_gpus", model_cfg.num_gpus)
        return cls(model_cfg, name=role, **kwargs)

    # -- Engine protocol -------------------------------------------------------------------

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Complete every request across the actors; results are in request order."""
        requests = list(requests)
        if not requests:
            return []
        with self._lock:
            self._check_open()
            live = self._live()
            adapters = dict(self._adapters)
            first = next(self._rotation)
        if self.balance == "length":
            weights: list[float] = [float(estimate_prompt_tokens(r)) for r in requests]
        else:
            weights = [1.0] * len(requests)
        results: list[ChatResult | None] = [None] * len(requests)
        pending: dict[ray.ObjectRef, _Shard] = {}
        for k, (start, end) in enumerate(split_batch(weights, len(live))):
            actor = live[(first + k) % len(live)]
            shard = _Shard(start, end, actor, tried={actor})
            pending[self._submit(shard, requests, adapters)] = shard
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            shard = pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as err:
                retry = self._after_failure(shard, err)
                pending[self._submit(retry, requests, adapters)] = retry
                continue
            if len(out) != shard.end - shard.start:
                raise EnginePoolError(
                    f"{self.name}: actor {shard.actor} returned {len(out)} results "
                    f"for {shard.end - shard.start} requests"
                )
            results[shard.start : shard.end] = out
        return results  # type: ignore[return-value]  # every slot was filled above

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Load the adapter on every live actor and remember it for actors that restart later.

        An actor that is down at this moment gets the adapter before its next
        sub-batch. If an engine rejects the adapter, it is unloaded again
        everywhere and the error is raised.
        """
        with self._lock:
            self._check_open()
            live = self._live()
        refs = [(i, self.actors[i].load_adapter.remote(adapter_id, path)) for i in live]
        failure: BaseException | None = None
        for i, ref in refs:
            try:
                ray.get(ref)
            except RayActorError as err:
                self._note_actor_error(i, err)
                log.warning(
                    "%s: actor %d unavailable while loading %r; it will load it later", self.name, i, adapter_id
                )
            except Exception as err:
                failure = failure or err
        if failure is not None:
            self._broadcast_quietly("unload_adapter", adapter_id)
            raise failure
        with self._lock:
            self._adapters[adapter_id] = path

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget the adapter on every actor; later requests naming it fail."""
        with self._lock:
            self._check_open()
            self._adapters.pop(adapter_id, None)
        self._broadcast_quietly("unload_adapter", adapter_id)

    # -- management ------------------------------------------------------------------------

    def adapters(self) -> dict[str, str]:
        """The adapters loaded through this pool (id -> path)."""
        with self._lock:
            return dict(self._adapters)

    def live_actors(self) -> list[int]:
        """Indices of the actors still in service."""
        with self._lock:
            return [i for i in range(self.num_actors) if i not in self._dead]

    def ping(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Each actor's :meth:`~actors.engine_actor.EngineActor.ping`, or ``{"error": ...}`` if it does not answer."""
        return self._call_all("ping", timeout_s=timeout_s)

    def wait_ready(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Block until every live actor has built its engine; raise if one cannot."""
        live = self.live_actors()
        return ray.get([self.actors[i].ping.remote() for i in live], timeout=timeout_s)

    def usage(self) -> list[dict[str, Any]]:
        """Each actor's usage since it (re)started (``{"error": ...}`` if it does not answer)."""
        return self._call_all("usage")

    def total_usage(self) -> Usage:
        """The sum of :meth:`usage` over the actors that answered."""
        total = Usage()
        for u in self.usage():
            if "error" not in u:
                total.add(Usage(u["calls"], u["requests"], u["prompt_tokens"], u["completion_tokens"]))
        return total

    def close(self) -> None:
        """Kill every actor (no restart). Further calls raise :class:`EnginePoolError`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone, or Ray shut down
                pass

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        model = self.model_cfg.model if self.model_cfg is not None else "factory"
        return (
            f"EnginePool(name={self.name!r}, model={model!r}, actors={self.num_actors}, live={len(self.live_actors())})"
        )

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EnginePoolError(f"{self.name}: pool is closed")

    def _live(self) -> list[int]:
        live = [i for i in range(self.num_actors) if i not in self._dead]
        if not live:
            raise EnginePoolError(f"{self.name}: no live actors left")
        return live

    def _submit(self, shard: _Shard, requests: list[ChatRequest], adapters: dict[str, str]) -> ray.ObjectRef:
        return self.actors[shard.actor].generate.remote(requests[shard.start : shard.end], adapters)

    def _note_actor_error(self, actor: int, err: BaseException) -> None:
        """Count actor deaths; retire actors that cannot come back."""
        if not isinstance(err, RayActorError) or isinstance(err, ActorUnavailableError):
            return  # an engine error or a transient outage: the actor is still there
        with self._lock:
            self._deaths[actor] += 1
            if getattr(err, "actor_init_failed", False) or self._deaths[actor] > self.max_restarts:
                self._dead.add(actor)

    def _after_failure(self, shard: _Shard, err: BaseException) -> _Shard:
        """Decide where a failed sub-batch goes next, or raise if it may not be retried."""
        self._note_actor_error(shard.actor, err)
        rows = f"rows {shard.start}..{shard.end - 1}"
        if not isinstance(err, _RETRYABLE) or isinstance(getattr(err, "cause", None), AdapterNotFoundError):
            raise err
        if not self.live_actors():
            raise EnginePoolError(f"{self.name}: no live actors left after {rows} failed") from err
        if shard.attempt >= self.max_attempts:
            raise EnginePoolError(f"{self.name}: {rows} failed {shard.attempt} times; last error: {err}") from err
        with self._lock:
            live = self._live()
            fresh = [i for i in live if i not in shard.tried]
            target = fresh[0] if fresh else (shard.actor if shard.actor in live else live[0])
            self.retries += 1
        log.warning(
            "%s: %s failed on actor %d (%s); retrying on actor %d",
            self.name,
            rows,
            shard.actor,
            type(err).__name__,
            target,
        )
        if isinstance(err, RayActorError) and target == shard.actor:
            self._wait_for_restart(target)
        return _Shard(shard.start, shard.end, target, shard.attempt + 1, shard.tried | {target})

    def _wait_for_restart(self, actor: int, timeout_s: float = 300.0) -> None:
        """Block until a restarting actor answers ``ping`` (so a retry is not spent on the restart itself)."""
        deadline = time.monotonic() + timeout_s
        delay = 0.5
        while time.monotonic() < deadline:
            try:
                ray.get(self.actors[actor].ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except (ActorUnavailableError, ray.exceptions.GetTimeoutError):
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            except RayActorError:
                return  # died again or for good: the retry will say so

    def _call_all(self, method: str, timeout_s: float | None = None) -> list[dict[str, Any]]:
        refs = [getattr(a, method).remote() for a in self.actors]
        out: list[dict[str, Any]] = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=timeout_s))
            except Exception as err:
                out.append({"error": f"{type(err).__name__}: {err}"})
        return out

    def _broadcast_quietly(self, method: str, *args: Any) -> None:
        refs = [(i, getattr(self.actors[i], method).remote(*args)) for i in self.live_actors()]
        for i, ref in refs:
            try:
                ray.get(ref)
            except Exception as err:  # a down actor drops its adapters anyway
                log.warning("%s: actor %d: %s failed: %s", self.name, i, method, err)
