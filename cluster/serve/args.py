"""What :func:`cluster.serve.app.build_app` accepts: :class:`ServeArgs` (``serve run ... key=value``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

HARD_MAX_BODY_BYTES = 1 << 20
"""Bodies above this size are refused by FastAPI itself (413) whatever the settings say."""


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
