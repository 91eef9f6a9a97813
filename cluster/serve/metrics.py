"""Ray custom metrics of the Serve app and the per-replica engine counters that /v1/info reports."""

from __future__ import annotations

import logging
from collections import Counter as TallyCounter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("trprompt.serve")


LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


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
