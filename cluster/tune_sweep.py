"""Hyperparameter sweeps on Ray Tune: each trial is a real (small) TRPrompt training run.

:func:`run_sweep` takes a :class:`~trprompt.experiments.sweep.SweepSpec` and

1. validates every trial config the search can produce (before anything starts);
2. builds the engine pools ONCE in the driver (:func:`~cluster.resources.build_role_engines`
   on the base config) plus a tiny :class:`AdapterRegistry` actor;
3. runs a ``tune.Tuner`` whose trainable, :func:`sweep_trial`, resolves the trial's run
   config (``run_dir = <sweep>/trials/<trial_id>``) and runs
   :class:`~trprompt.loop.TRPromptTrainer` with :class:`~trprompt.experiments.sweep.SweepHooks`, which
   call ``tune.report`` after every finished iteration with the validation accuracies and
   the tokens spent so far (per role and in total);
4. writes the ranked table, the best config and the plot (:func:`~trprompt.experiments.sweep.write_sweep_outputs`).

Sharing engines between trials
------------------------------
An :class:`~actors.pool.EnginePool` holds a ``threading.Lock`` and so does not pickle.
:class:`SharedEnginePool` adopts a driver pool's actor handles and settings, drops the lock
when pickled (a fresh one is made on the other side) and keeps the adapter table in the
registry actor, one table per pool: every trial's ``generate`` sends the union of all trials'
adapters of that pool, so the actors (which make their adapter set equal to the table they are
sent) never drop another trial's adapter, a restarted actor still reloads everything before it
serves, and a frozen role's pool (an ``engine: openai`` target, a different base model) is never
sent Π's adapters. Adapter
ids stay apart through :class:`~trprompt.engines.wrappers.AdapterNamespace` (``iter1`` of trial ``X``
becomes ``tX__iter1``). Roles whose model settings differ from the base config's (e.g. a
searched ``models.target_model.model``) get a private pool for that trial only.

SFT in trials
-------------
SFT runs in the trial's own process (:class:`~cluster.sft_trainer.LocalSFT`): the trial
already holds ``resources_per_trial`` (CPU fractions here, ``{CPU: 1, GPU: 1}`` on a GPU
cluster, where Tune sets ``CUDA_VISIBLE_DEVICES`` for it), and a nested Ray Train run would
need a second reservation that Tune's placement groups do not provide. Tests inject a fake.

Budget and early stopping
-------------------------
``num_samples`` (times the grid) caps the number of trials, ``time_budget_s`` goes to Tune,
and :class:`TokenBudgetStopper` stops the whole sweep once the tokens reported by all trials
add up to ``max_total_tokens``. With ``scheduler.type: asha`` an
:class:`AsyncHyperBandScheduler` (time attribute: the loop iteration) stops poor trials at a
report; the trial's run_dir keeps every finished stage, and :class:`RecordingASHA` leaves an
``early_stopped.json`` marker so the table can tell early stops from budget stops.

Resume: when ``<sweep>/tune`` holds a saved experiment, ``run_sweep`` calls
``Tuner.restore(..., resume_errored=True)``; finished trials are not run again, unfinished
ones restart and their loops resume from their run directories. Only a sweep saved under
the same settings resumes: ``fingerprint.json`` records what the results depend on
(:func:`~trprompt.experiments.sweep.spec.sweep_inputs`: base config, grader and templates
versions, search, ...); when it differs, the old trials and Tune state move to
``superseded/<fingerprint>/`` and the sweep starts afresh.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from actors.pool import EnginePool
from cluster.resources import RoleEngines, build_role_engines, role_configs
from trprompt import artifacts
from trprompt.config import ModelConfig, ModelsConfig, TRPromptConfig, config_from_dict
from trprompt.engines.base import ChatRequest, ChatResult, Engine
from trprompt.engines.model_store import prompt_model_path
from trprompt.engines.wrappers import AdapterNamespace
from trprompt.experiments.sweep.results import write_sweep_outputs
from trprompt.experiments.sweep.spec import SUPERSEDED_DIR, SweepSpec, prepare_sweep_dir, write_spec
from trprompt.experiments.sweep.trials import (
    EARLY_STOP_FILE,
    STATUS_FILE,
    SweepHooks,
    TokenLedger,
    TrialProgress,
    adapter_prefix,
    check_trial_configs,
    resolve_trial_config,
    write_template_variants,
)

EngineBuilder = Callable[[ModelConfig], Engine]


# ------------------------------------------------------------------ shared engine pools


class AdapterRegistry:
    """The adapters that trials loaded into the shared pools, per pool (pool -> id -> path); a zero-CPU actor.

    Kept per pool: only the pool that hosts Π gets adapters, and a frozen role's pool (e.g. an
    ``engine: openai`` target, which cannot load a LoRA adapter) must never be sent them.
    """

    def __init__(self) -> None:
        self._tables: dict[str, dict[str, str]] = {}

    def set(self, adapter_id: str, path: str, pool: str = "") -> None:
        """Record an adapter of ``pool``."""
        self._tables.setdefault(pool, {})[adapter_id] = path

    def remove(self, adapter_id: str, pool: str = "") -> None:
        """Forget an adapter of ``pool`` (no error if unknown)."""
        self._tables.get(pool, {}).pop(adapter_id, None)

    def table(self, pool: str = "") -> dict[str, str]:
        """Every adapter recorded for ``pool``."""
        return dict(self._tables.get(pool, {}))


class SharedEnginePool(EnginePool):
    """A picklable client of an existing pool's actors, for use inside Tune trials.

    Same batching and retries as :class:`~actors.pool.EnginePool` (it is one); the
    differences: it never creates or kills actors (:meth:`close` is a no-op: the
    driver owns them), it pickles (the lock is rebuilt on unpickling), and its
    adapter table is the registry's (all trials) plus its own.
    """

    registry: Any = None

    @classmethod
    def adopt(cls, pool: EnginePool, registry: Any) -> SharedEnginePool:
        """A client for ``pool``'s actors that keeps adapters in ``registry`` (an AdapterRegistry handle)."""
        new = cls.__new__(cls)
        new.__dict__.update(pool.__dict__)
        new._lock = threading.Lock()
        new._adapters = {}
        new._deaths = list(pool._deaths)
        new._dead = set(pool._dead)
        new._rotation = itertools.count()
        new._own = {}
        new.registry = registry
        return new

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state.pop("_rotation", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._rotation = itertools.count()

    def _refresh(self) -> None:
        table = ray.get(self.registry.table.remote(self.name)) if self.registry is not None else {}
        with self._lock:
            self._adapters = {**table, **self._own}

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Refresh the adapter table from the registry, then generate as a normal pool."""
        self._refresh()
        return super().generate(requests)

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Register the adapter (so other trials' calls keep it), then load it on every actor."""
        if self.registry is not None:
            ray.get(self.registry.set.remote(adapter_id, path, self.name))
        with self._lock:
            self._own[adapter_id] = path
        self._refresh()
        try:
            super().load_adapter(adapter_id, path)
        except BaseException:
            self._forget(adapter_id)
            raise

    def unload_adapter(self, adapter_id: str) -> None:
        """Drop the adapter from the registry and from the actors."""
        self._forget(adapter_id)
        super().unload_adapter(adapter_id)

    def _forget(self, adapter_id: str) -> None:
        with self._lock:
            self._own.pop(adapter_id, None)
        if self.registry is not None:
            ray.get(self.registry.remove.remote(adapter_id, self.name))

    def close(self) -> None:
        """Nothing: the driver owns (and closes) the actors."""


@dataclass
class SharedEngines:
    """The driver's pools as trials see them: ``role -> pool`` and each role's model key."""

    pools: dict[str, SharedEnginePool] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    share_engines: bool = True

    @classmethod
    def from_role_engines(cls, engines: RoleEngines, models_cfg: ModelsConfig, registry: Any) -> SharedEngines:
        """Wrap each distinct pool of ``engines`` once (roles sharing a pool keep sharing it)."""
        adopted: dict[int, SharedEnginePool] = {}
        pools = {}
        for role, engine in engines.items():
            if not isinstance(engine, EnginePool):
                raise TypeError(f"{role}: shared sweep engines must be EnginePools, got {type(engine).__name__}")
            pools[role] = adopted.setdefault(id(engine), SharedEnginePool.adopt(engine, registry))
        keys = {role: mc.pool_key() for role, mc in role_configs(models_cfg).items()}
        return cls(pools, keys, models_cfg.share_engines)

    def for_trial(
        self, cfg: TRPromptConfig, prefix: str, engine_builder: EngineBuilder | None = None
    ) -> tuple[dict[str, Engine], list[AdapterNamespace], list[EnginePool]]:
        """Engines for one trial: the shared pool where the role's model settings match the base
        config, else a private pool; each distinct pool wrapped once in an
        :class:`~trprompt.engines.wrappers.AdapterNamespace` (adapter ids ``<prefix>__<id>``).

        Returns ``(engines by role, wrappers, private pools)``; the caller releases the
        wrappers' adapters and closes the private pools when the trial ends.
        """
        wrappers: dict[int, AdapterNamespace] = {}
        private: dict[str, EnginePool] = {}
        engines: dict[str, Engine] = {}
        for role, mc in role_configs(cfg.models).items():
            key = mc.pool_key()
            inner: Any = self.pools[role] if self.keys.get(role) == key and role in self.pools else None
            if inner is None and cfg.models.share_engines:
                inner = next((self.pools[r] for r, k in self.keys.items() if k == key and r in self.pools), None)
            if inner is None:
                slot = key if cfg.models.share_engines else role
                if slot not in private:
                    factory = functools.partial(engine_builder, mc) if engine_builder is not None else None
                    private[slot] = EnginePool.from_config(f"{prefix}-{role}", mc, factory=factory)
                inner = private[slot]
            engines[role] = wrappers.setdefault(id(inner), AdapterNamespace(inner, f"{prefix}__"))
        return engines, list(wrappers.values()), list(private.values())


# ------------------------------------------------------------------------ the trainable


@dataclass
class TrialSetup:
    """Everything a trial needs besides the engines (pickled once into the object store).

    ``sft_runner``: a picklable SFT runner (None: :class:`~cluster.sft_trainer.LocalSFT`).
    ``engine_builder``: builds engines for private pools (None: the default factory).
    """

    spec: SweepSpec
    sft_runner: Any = None
    engine_builder: EngineBuilder | None = None


def sweep_trial(config: dict[str, Any], setup: TrialSetup, shared: SharedEngines | None = None) -> None:
    """The Tune trainable: one TRPrompt run with the trial's settings, reporting after each iteration."""
    from trprompt.loop import TRPromptTrainer

    spec = setup.spec
    trial_id = tune.get_context().get_trial_id()
    run_dir = spec.trials_dir / trial_id
    params = {d.key: config[d.key] for d in spec.search}
    cfg = resolve_trial_config(spec, params, run_dir)
    progress = TrialProgress.load(run_dir) or TrialProgress(trial_id, params, cfg.loop.iterations)
    progress.attempts += 1
    progress.save(run_dir)
    engines, wrappers, private = (shared or SharedEngines()).for_trial(
        cfg, adapter_prefix(trial_id), setup.engine_builder
    )
    try:
        if setup.sft_runner is not None:
            runner = setup.sft_runner
        else:
            from cluster.sft_trainer import LocalSFT

            runner = LocalSFT()
        hooks = SweepHooks(run_dir, progress, tune.report)
        trainer = TRPromptTrainer(cfg, engines, runner, prompt_model_path(cfg.models.prompt_model), hooks=hooks,
                                  progress=False)
        hooks.attach(trainer)
        hooks.replay()
        trainer.run()
        hooks.finish()
    finally:
        for w in wrappers:
            w.release()
        for p in private:
            p.close()


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


# ------------------------------------------------------------- stopping and scheduling


class TokenBudgetStopper(tune.Stopper):
    """Stops the whole sweep once all trials together have reported ``max_total_tokens`` tokens."""

    def __init__(self, trials_dir: str | Path, max_total_tokens: int | None) -> None:
        self.ledger = TokenLedger(trials_dir, max_total_tokens)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Record the trial's running total; never stops a single trial."""
        if "total_tokens" in result:
            self.ledger.record(trial_id, int(result["total_tokens"]))
        return False

    def stop_all(self) -> bool:
        """True once the cap is reached."""
        return self.ledger.exhausted()


class RecordingASHA(AsyncHyperBandScheduler):
    """ASHA that leaves ``early_stopped.json`` in the run_dir of every trial it stops before ``max_t``."""

    def __init__(self, trials_dir: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trials_dir = str(trials_dir)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        """ASHA's decision, recorded when it is an early stop."""
        action = super().on_trial_result(tune_controller, trial, result)
        at = result.get(self._time_attr)
        if action == TrialScheduler.STOP and at is not None and at < self._max_t:
            artifacts.write_json(Path(self.trials_dir) / trial.trial_id / EARLY_STOP_FILE, {
                "iteration": at,
                "metric": self._metric,
                "value": result.get(self._metric),
                "time": time.time(),
            })
        return action


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The Tune search space: one entry per searched dotted key."""
    makers: dict[str, Callable[..., Any]] = {
        "uniform": tune.uniform,
        "loguniform": tune.loguniform,
        "randint": tune.randint,
        "lograndint": tune.lograndint,
    }
    out: dict[str, Any] = {}
    for d in spec.search:
        if d.kind == "grid":
            out[d.key] = tune.grid_search(list(d.values))
        elif d.kind == "choice":
            out[d.key] = tune.choice(list(d.values))
        else:
            out[d.key] = makers[d.kind](d.low, d.high)
    return out


def make_scheduler(spec: SweepSpec) -> TrialScheduler | None:
    """ASHA over loop iterations (``iteration`` is the time attribute), or None for FIFO."""
    s = spec.scheduler
    if s.type != "asha":
        return None
    return RecordingASHA(
        spec.trials_dir,
        time_attr="iteration",
        max_t=s.max_t or spec.max_iterations(),
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


# ------------------------------------------------------------------------- the driver


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` did: the summary (``best.json``) with the ranked rows, and run facts."""

    spec: SweepSpec
    summary: dict[str, Any]
    restored: bool
    engine_requests: int
    wall_s: float

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The ranked trial table."""
        return self.summary["rows"]


def run_sweep(
    spec: SweepSpec,
    *,
    engine_builder: EngineBuilder | None = None,
    sft_runner: Any = None,
    verbose: int = 1,
    use_placement_group: bool = True,
    pool_kwargs: dict[str, Any] | None = None,
) -> SweepOutcome:
    """Run (or resume) the sweep ``spec`` on the connected Ray cluster; write its outputs.

    ``engine_builder`` (picklable, ModelConfig -> Engine) and ``sft_runner`` replace the
    default engines and :class:`~cluster.sft_trainer.LocalSFT`; tests pass fakes here, the
    trial code path is the same.
    """
    t0 = time.perf_counter()
    check_trial_configs(spec)
    changed = prepare_sweep_dir(spec)
    if changed is not None:
        print(f"[sweep] settings changed since the saved sweep ({', '.join(changed) or 'format'}): its trials were "
              f"moved to {spec.sweep_dir / SUPERSEDED_DIR} and the sweep starts afresh", flush=True)
    write_spec(spec)
    write_template_variants(spec)
    if not ray.is_initialized():
        ray.init()
    base_cfg = config_from_dict({**spec.base, "run_dir": str(spec.sweep_dir / "base")})
    prompt_model_path(base_cfg.models.prompt_model)  # convert registered models once here, not in every trial
    engines = build_role_engines(base_cfg.models, local=False, engine_builder=engine_builder,
                                 use_placement_group=use_placement_group, pool_kwargs=pool_kwargs)
    registry = ray.remote(num_cpus=0)(AdapterRegistry).remote()
    restored = tune.Tuner.can_restore(str(spec.tune_dir))
    try:
        shared = SharedEngines.from_role_engines(engines, base_cfg.models, registry)
        setup = TrialSetup(spec, sft_runner=sft_runner, engine_builder=engine_builder)
        trainable = tune.with_resources(tune.with_parameters(sweep_trial, setup=setup, shared=shared),
                                        dict(spec.resources_per_trial))
        if restored:
            tuner = tune.Tuner.restore(str(spec.tune_dir), trainable, resume_errored=True)
        else:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            tuner = tune.Tuner(
                trainable,
                param_space=param_space(spec),
                tune_config=tune.TuneConfig(
                    metric=spec.metric,
                    mode=spec.mode,
                    scheduler=make_scheduler(spec),
                    # max_concurrent_trials goes to the generator: Tune ignores it next to a SearchGenerator
                    search_alg=BasicVariantGenerator(max_concurrent=spec.max_concurrent_trials or 0,
                                                     random_state=spec.seed),
                    num_samples=spec.num_samples,
                    time_budget_s=spec.budget.time_budget_s,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    callbacks=_tracking_callbacks(spec, base_cfg),
                    name=spec.tune_dir.name,
                    storage_path=str(spec.tune_dir.parent),
                    stop=TokenBudgetStopper(spec.trials_dir, spec.budget.max_total_tokens),
                    failure_config=tune.FailureConfig(max_failures=0),
                    verbose=verbose,
                ),
            )
        grid = tuner.fit()
        engine_requests = sum(p.total_usage().requests for p in engines.unique() if isinstance(p, EnginePool))
    finally:
        engines.close()
        ray.kill(registry)
    _record_statuses(spec, grid)
    ledger = TokenLedger(spec.trials_dir, spec.budget.max_total_tokens)
    summary = write_sweep_outputs(spec, extra={
        "restored": restored,
        "token_cap_reached": ledger.exhausted(),
        "max_total_tokens": spec.budget.max_total_tokens,
        "errors": len(grid.errors),
    })
    return SweepOutcome(spec, summary, restored, engine_requests, time.perf_counter() - t0)


def _tracking_callbacks(spec: SweepSpec, base_cfg: Any) -> list[Any]:
    """Ray Tune's MLflow logger (one MLflow run per trial) when the base config has ``tracking: mlflow``.

    The default store is ``<sweep run_dir>/mlruns`` (see :mod:`trprompt.tracking`); the experiment is
    ``sweep/<name>``.
    """
    if base_cfg.tracking != "mlflow":
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from trprompt.tracking import default_tracking_uri, prepare_experiment

    uri = base_cfg.tracking_uri or default_tracking_uri(spec.sweep_dir)
    name = prepare_experiment(uri, f"sweep/{spec.name}")
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=name, save_artifact=False,
                                 tags={"trprompt.sweep": spec.name})]


def _record_statuses(spec: SweepSpec, grid: Any) -> None:
    """Write each trial's final Tune status into its run_dir (``tune_status.json``)."""
    for result in grid:
        tid = (result.metrics or {}).get("trial_id") or (Path(result.path).name if result.path else None)
        d = spec.trials_dir / str(tid)
        if tid is None or not d.is_dir():
            continue
        err = result.error
        artifacts.write_json(d / STATUS_FILE, {
            "status": "ERROR" if err is not None else "TERMINATED",
            "error": None if err is None else f"{type(err).__name__}: {err}"[:2000],
        })
