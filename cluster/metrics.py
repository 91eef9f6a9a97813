"""Run progress as Ray custom metrics, for the Ray dashboard / Prometheus.

:class:`RunMetrics` exports (Ray adds the ``ray_`` prefix):

* ``trprompt_iteration`` (gauge): the current outer iteration k;
* ``trprompt_stage`` (gauge, tag ``stage``): 1 for the stage running now, 0 for the others;
* ``trprompt_synthetic_accuracy`` (gauge, tag ``iteration``): accuracy on iteration k's synthetic set;
* ``trprompt_validation_accuracy`` (gauge, tags ``iteration``, ``phase``): validation accuracy;
* ``trprompt_tokens_total`` (counter, tags ``role``, ``kind`` = prompt/completion): tokens per role;
* ``trprompt_llm_calls_total`` / ``trprompt_llm_requests_total`` (counters, tag ``role``): engine calls
  and requests per role.

Every method is a no-op when Ray is not initialized and never raises, so the
library can call it from a progress callback whether or not it runs on Ray. The
last values are also kept in :attr:`RunMetrics.last` for logs and tests.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from trprompt.engines.base import Usage

log = logging.getLogger(__name__)

_METRICS: dict[str, Any] = {}
_METRICS_LOCK = threading.Lock()


def _ray_ready() -> bool:
    try:
        import ray

        return bool(ray.is_initialized())
    except Exception:
        return False


def _metrics() -> dict[str, Any]:
    """Create the metric objects once per process (Ray must be initialized)."""
    with _METRICS_LOCK:
        if not _METRICS:
            from ray.util.metrics import Counter, Gauge

            _METRICS.update(
                iteration=Gauge("trprompt_iteration", description="Current outer iteration k."),
                stage=Gauge("trprompt_stage", description="1 for the running stage, else 0.", tag_keys=("stage",)),
                synthetic=Gauge(
                    "trprompt_synthetic_accuracy",
                    description="Target accuracy on the synthetic set of iteration k.",
                    tag_keys=("iteration",),
                ),
                validation=Gauge(
                    "trprompt_validation_accuracy",
                    description="Validation accuracy of iteration k in a phase.",
                    tag_keys=("iteration", "phase"),
                ),
                tokens=Counter(
                    "trprompt_tokens_total", description="Tokens spent per role.", tag_keys=("role", "kind")
                ),
                calls=Counter("trprompt_llm_calls_total", description="Engine calls per role.", tag_keys=("role",)),
                requests=Counter(
                    "trprompt_llm_requests_total", description="Chat requests per role.", tag_keys=("role",)
                ),
            )
        return _METRICS


class RunMetrics:
    """Records one run's progress as Ray metrics; harmless without Ray."""

    def __init__(self) -> None:
        self.last: dict[str, Any] = {}
        """The latest value of each metric (keys like ``"synthetic_accuracy/2"``), kept even without Ray."""
        self._stage: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether values are exported (Ray is initialized in this process)."""
        return _ray_ready()

    def stage(self, iteration: int, name: str) -> None:
        """Mark stage ``name`` of ``iteration`` as the one running now."""
        previous, self._stage = self._stage, name
        self.last["iteration"] = iteration
        self.last["stage"] = name

        def emit(m: dict[str, Any]) -> None:
            m["iteration"].set(iteration)
            if previous is not None and previous != name:
                m["stage"].set(0, tags={"stage": previous})
            m["stage"].set(1, tags={"stage": name})

        self._emit(emit)

    def synthetic_accuracy(self, k: int, acc: float) -> None:
        """Accuracy of the target model on iteration ``k``'s synthetic set."""
        self.last[f"synthetic_accuracy/{k}"] = acc
        self._emit(lambda m: m["synthetic"].set(acc, tags={"iteration": str(k)}))

    def validation_accuracy(self, k: int, acc: float, phase: str = "val") -> None:
        """Validation accuracy of iteration ``k`` in ``phase`` (e.g. ``reward_search``, ``after_sft``)."""
        self.last[f"validation_accuracy/{k}/{phase}"] = acc
        self._emit(lambda m: m["validation"].set(acc, tags={"iteration": str(k), "phase": phase}))

    def usage(self, role: str, usage_delta: Usage | Mapping[str, int]) -> None:
        """Add the calls, requests and tokens ``role`` spent since the previous report."""
        if isinstance(usage_delta, Mapping):
            delta = Usage(
                calls=int(usage_delta.get("calls", 0)),
                requests=int(usage_delta.get("requests", 0)),
                prompt_tokens=int(usage_delta.get("prompt_tokens", 0)),
                completion_tokens=int(usage_delta.get("completion_tokens", 0)),
            )
        else:
            delta = usage_delta
        total = self.last.setdefault(f"usage/{role}", Usage())
        total.add(delta)

        def emit(m: dict[str, Any]) -> None:
            for counter, value, tags in (
                (m["calls"], delta.calls, {"role": role}),
                (m["requests"], delta.requests, {"role": role}),
                (m["tokens"], delta.prompt_tokens, {"role": role, "kind": "prompt"}),
                (m["tokens"], delta.completion_tokens, {"role": role, "kind": "completion"}),
            ):
                if value > 0:  # counters only go up
                    counter.inc(value, tags=tags)

        self._emit(emit)

    def _emit(self, fn: Callable[[dict[str, Any]], None]) -> None:
        if not _ray_ready():
            return
        try:
            fn(_metrics())
        except Exception as err:  # metrics must never break a run
            log.debug("metrics export failed: %s", err)
