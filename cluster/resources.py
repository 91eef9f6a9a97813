"""One engine per role of the paper, and where their actors are placed.

The four roles are the prompt model Π, the frozen target model, the reward
model R and TextGrad's optimizer model (which falls back to the reward model's
settings when unset). :func:`build_role_engines` turns a
:class:`~trprompt.config.ModelsConfig` into ``{role: Engine}``:

* ``local=True``: engines are built in this process, without Ray (the CLI's
  single-process mode and unit tests);
* ``local=False``: each distinct engine is an :class:`~actors.pool.EnginePool`.

With ``share_engines`` on, roles whose :meth:`~trprompt.config.ModelConfig.pool_key`
is equal share one engine object, e.g. one set of SmolLM2 actors serves the
prompt, target and reward roles (Π adds its LoRA adapter on the same base).

Placement lives here only: :func:`placement_group_for` reserves one bundle per
engine actor (``{"CPU": num_cpus, "GPU": num_gpus}``) in a single placement
group, and the pools pin actor ``i`` to its own bundle. Multi-GPU layouts (for
example tensor-parallel vLLM engines that need several GPUs per actor) can be
added by changing :func:`bundles_for`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from trprompt.config import ModelConfig, ModelsConfig
from trprompt.engines.base import Engine
from trprompt.roles import ROLES

Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
EngineBuilder = Callable[[ModelConfig], Engine]

_MIN_CPU = 0.01
"""Ray rejects empty bundles; an actor that asks for nothing reserves this much CPU."""


def role_configs(models_cfg: ModelsConfig) -> dict[str, ModelConfig]:
    """The model config of every role, with the optimizer falling back to the reward model's."""
    return {role: getattr(models_cfg, role) or models_cfg.reward_model for role in ROLES}


@dataclass
class PoolPlan:
    """One engine to build: its config, the roles it serves, its actors' bundle indices."""

    cfg: ModelConfig
    roles: list[str]
    bundle_indices: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A readable label: the roles it serves joined with ``+``."""
        return "+".join(r.removesuffix("_model") for r in self.roles)


def plan_pools(models_cfg: ModelsConfig) -> list[PoolPlan]:
    """Group the roles into engines (sharing equal configs when ``share_engines``) and number their bundles."""
    plans: list[PoolPlan] = []
    by_key: dict[str, PoolPlan] = {}
    for role, cfg in role_configs(models_cfg).items():
        key = cfg.pool_key()
        if models_cfg.share_engines and key in by_key:
            by_key[key].roles.append(role)
            continue
        plan = PoolPlan(cfg=cfg, roles=[role])
        by_key.setdefault(key, plan)
        plans.append(plan)
    next_bundle = 0
    for plan in plans:
        plan.bundle_indices = list(range(next_bundle, next_bundle + plan.cfg.num_actors))
        next_bundle += plan.cfg.num_actors
    return plans


def bundle_for(cfg: ModelConfig) -> dict[str, float]:
    """The resources one engine actor of ``cfg`` reserves (zero entries left out)."""
    bundle = {k: float(v) for k, v in (("CPU", cfg.num_cpus), ("GPU", cfg.num_gpus)) if v > 0}
    return bundle or {"CPU": _MIN_CPU}


def bundles_for(models_cfg: ModelsConfig) -> list[dict[str, float]]:
    """One bundle per engine actor, in the bundle order of :func:`plan_pools`."""
    return [bundle_for(p.cfg) for p in plan_pools(models_cfg) for _ in p.bundle_indices]


def placement_group_for(
    models_cfg: ModelsConfig,
    strategy: Strategy = "PACK",
    name: str = "",
    timeout_s: float | None = 120.0,
) -> Any:
    """Reserve one placement group holding a bundle per engine actor and wait until it is placed.

    ``PACK`` keeps the actors on as few nodes as possible; ``SPREAD`` spreads
    them over nodes. Raises ``TimeoutError`` (and releases the group) when the
    cluster cannot fit it within ``timeout_s`` seconds.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = bundles_for(models_cfg)
    pg = placement_group(bundles, strategy=strategy, name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        remove_placement_group(pg)
        raise TimeoutError(
            f"placement group of {len(bundles)} bundles {bundles} ({strategy}) did not fit within {timeout_s}s; "
            f"cluster resources: {ray.available_resources()}"
        ) from err
    return pg


class RoleEngines(dict[str, Engine]):
    """``{role: engine}`` as returned by :func:`build_role_engines`, plus clean-up.

    Shared engines appear under several roles but are one object.
    ``placement_group`` is the group the pools were placed in (``None`` when local).
    """

    placement_group: Any = None

    def unique(self) -> list[Engine]:
        """Each distinct engine once, in role order."""
        seen: dict[int, Engine] = {}
        for engine in self.values():
            seen.setdefault(id(engine), engine)
        return list(seen.values())

    def close(self) -> None:
        """Close every engine that can be closed and release the placement group."""
        for engine in self.unique():
            close = getattr(engine, "close", None)
            if callable(close):
                close()
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None


def build_role_engines(
    models_cfg: ModelsConfig,
    local: bool = False,
    *,
    strategy: Strategy = "PACK",
    use_placement_group: bool = True,
    engine_builder: EngineBuilder | None = None,
    pool_kwargs: dict[str, Any] | None = None,
) -> RoleEngines:
    """Build one engine per role (see the module docstring).

    ``engine_builder`` (default ``trprompt.engines.factory.build_engine``) turns
    a config into an engine; for pools it must be picklable, and each actor
    calls it. With ``use_placement_group`` the pools' actors are pinned to the
    bundles of :func:`placement_group_for` (``strategy``); otherwise Ray places
    them freely. ``pool_kwargs`` go to every :class:`~actors.pool.EnginePool`
    (e.g. ``max_attempts``, ``runtime_env``, ``balance``).
    """
    plans = plan_pools(models_cfg)
    out = RoleEngines()
    if local:
        if engine_builder is None:
            from trprompt.engines.factory import build_engine

            engine_builder = build_engine
        for plan in plans:
            engine = engine_builder(plan.cfg)
            for role in plan.roles:
                out[role] = engine
        return out

    from actors.pool import EnginePool

    pg = placement_group_for(models_cfg, strategy=strategy) if use_placement_group else None
    out.placement_group = pg
    try:
        for plan in plans:
            factory = functools.partial(engine_builder, plan.cfg) if engine_builder is not None else None
            pool = EnginePool.from_config(
                plan.name,
                plan.cfg,
                factory=factory,
                placement_group=pg,
                bundle_indices=plan.bundle_indices if pg is not None else None,
                **(pool_kwargs or {}),
            )
            for role in plan.roles:
                out[role] = pool
    except BaseException:
        out.close()
        raise
    return out
