"""Building the Serve application: :func:`build_app` (also a ``serve run`` app builder)."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import DeploymentActorConfig

from cluster.serve.args import ServeArgs, default_admin_token_file
from cluster.serve.deployments import PromptModel, TargetModel
from cluster.serve.ingress import Ingress
from cluster.serve.run_spec import RunSpec, check_servable
from cluster.serve.security import new_token, token_digest, write_token_file
from cluster.serve.versions import VERSION_STORE, VersionStoreActor
from trprompt.config import ModelConfig


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


def with_secrets_hashed(s: ServeArgs) -> ServeArgs:
    """``s`` with the admin token and API key replaced by their SHA-256 (the replicas never see them).

    With the admin routes on and no token configured, a random token is generated and
    written to ``admin_token_file`` (mode 0600); its path is printed.
    """
    update: dict[str, Any] = {"admin_token": None, "api_key": None}
    if s.api_key:
        update["api_key_sha256"] = token_digest(s.api_key)
    if s.enable_admin and not s.admin_token_sha256:
        token = s.admin_token
        if token is None:
            token = new_token()
            path = write_token_file(s.admin_token_file or default_admin_token_file(), token)
            print(f"[trprompt] admin token for /v1/admin/* written to {path} (readable by its owner only)",
                  flush=True)
        update["admin_token_sha256"] = token_digest(token)
    return s.model_copy(update=update)


def build_app(args: dict[str, Any] | ServeArgs) -> serve.Application:
    """The Serve application for a finished run (a Serve app builder: ``key=value`` args, see :class:`ServeArgs`).

    Raises :class:`RunDirError` if the run directory cannot be served and
    ``pydantic.ValidationError`` for bad arguments.
    """
    s = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(dict(args))
    spec = RunSpec.from_run_dir(s.run_dir)
    check_servable(spec, s.max_reward_chars)
    s = with_secrets_hashed(s)
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
