"""What :func:`cluster.serve.app.build_app` accepts: :class:`ServeArgs` (``serve run ... key=value``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

HARD_MAX_BODY_BYTES = 1 << 20
"""Bodies above this size are refused (JSON 413) whatever the settings say."""

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""The ``Host`` names accepted by default (loopback only: a DNS-rebinding page cannot reach the app)."""


def default_run_roots() -> list[str]:
    """Where reloads may come from by default: the runs storage root, else ``./runs``.

    The storage root is :func:`trprompt.storage.resolve_storage_root`'s (``$TRPROMPT_STORAGE``, or
    ``~/trprompt_runs`` inside a Ray working-dir job) when it is a local folder; runs then live under
    it. A URI root cannot be reloaded from directly; without a local root, ``./runs`` is the default.
    """
    from trprompt.storage import is_uri, resolve_storage_root

    root, _ = resolve_storage_root()
    if root and not is_uri(root):
        return [str(Path(root).expanduser().resolve())]
    return [str((Path.cwd() / "runs").resolve())]


def default_admin_token_file() -> str:
    """Where a generated admin token is written: ``~/.cache/trprompt/serve/admin-token-<pid>``."""
    return str(Path.home() / ".cache" / "trprompt" / "serve" / f"admin-token-{os.getpid()}")


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
    enable_admin: bool = Field(True, description="Expose POST /v1/admin/reload (always behind a bearer token).")
    admin_token: str | None = Field(
        None, min_length=16, description="Bearer token of /v1/admin/* (None: a random one is generated at start and "
        "written to admin_token_file, readable by its owner only).")
    admin_token_file: str | None = Field(None, description="Where a generated admin token is written "
                                         "(None: ~/.cache/trprompt/serve/admin-token-<pid>).")
    admin_token_sha256: str | None = Field(None, description="Set by build_app: the SHA-256 of the admin token "
                                           "(the replicas never see the token itself).")
    api_key: str | None = Field(None, min_length=1, description="If set, /v1/prompt, /v1/solve and the OpenAI routes "
                                "need 'Authorization: Bearer <api_key>' (None: open to whoever reaches the port).")
    api_key_sha256: str | None = Field(None, description="Set by build_app: the SHA-256 of api_key.")
    allowed_hosts: list[str] = Field(
        default_factory=lambda: list(LOOPBACK_HOSTS),
        description="Host header names accepted (port ignored; '*' accepts any). Default: loopback names only.")
    run_roots: list[str] = Field(
        default_factory=list, description="Folders a reload may load run directories and adapters from "
        "(empty: $TRPROMPT_STORAGE if it is a local folder, else ./runs).")
    allow_reward_text: bool = Field(False, description="Let a reload set a free-text optimal_reward.")
    max_reward_chars: int = Field(8000, ge=1, le=100_000, description="Longest t* a served version may have.")
    rate_limit_per_s: float = Field(20.0, ge=0, description="Requests per second per client address and ingress "
                                    "replica (token bucket; 0: no limit). Over it: 429 with Retry-After.")
    rate_limit_burst: int = Field(40, ge=1, description="Token-bucket size of the per-client rate limit.")
    max_pending_requests: int = Field(256, ge=1, description="Requests one ingress replica holds at once; more "
                                      "get 503 with Retry-After instead of waiting in an unbounded queue.")
    retry_budget_s: float | None = Field(None, gt=0, description="How long the ingress keeps retrying a prompt or "
                                         "solve request whose replica died (None: the request timeout).")

    @field_validator("allowed_hosts", "run_roots", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        """``serve run ... allowed_hosts=a,b`` gives one string: split it at commas."""
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    def resolved_run_roots(self) -> list[Path]:
        """The reload roots as absolute, symlink-free paths."""
        return [Path(os.path.realpath(Path(r).expanduser())) for r in (self.run_roots or default_run_roots())]

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
