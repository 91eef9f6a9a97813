"""Optional experiment tracking: a run's config, per-iteration metrics and artifacts in MLflow.

Off by default (``tracking: none``). With ``tracking: mlflow`` the job adds an :class:`MLflowTracker`
to the loop's hooks; the loop itself knows nothing about MLflow. The tracker logs

* the resolved config as params (``models.prompt_model.model``, ``loop.iterations``, …);
* per iteration ``k`` (the metric step): ``synthetic_accuracy``, ``validation_accuracy/<phase>``,
  ``tokens/<role>`` and ``calls/<role>`` (cumulative), the SFT summary (``sft/first_loss``,
  ``sft/mean_loss_last_epoch``, ``sft/steps``) and the reward search's best accuracy; the step-level
  curves go under ``sft/iter<k>/loss`` (step = optimizer step) and ``reward_search/iter<k>/accuracy``
  (step = candidate); these are read from the run directory's finished-stage files;
* at the end, the run directory's artifacts (report, plot, parquet tables, adapters, t*, JSON records).

The default store is local, inside the run: ``sqlite:///<run_dir>/mlruns/mlflow.db`` with artifacts in
``<run_dir>/mlruns/artifacts``; ``tracking_uri`` points at a server instead. A resumed run continues the
same MLflow run (its id is kept in ``<run_dir>/mlflow_run.json``).

Other harnesses (comparisons, sweeps) use :func:`open_run` / :class:`MLflowTracker` directly.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trprompt import artifacts

log = logging.getLogger("trprompt.tracking")

RUN_FILE = "mlflow_run.json"
"""Inside the run directory: the MLflow tracking URI, experiment and run id of this run."""

DEFAULT_EXPERIMENT = "trprompt"


class TrackingError(RuntimeError):
    """Tracking was asked for but cannot work (MLflow missing, store unreachable)."""


def default_tracking_uri(run_dir: str | Path) -> str:
    """The local MLflow store of a run: an SQLite database under ``<run_dir>/mlruns``."""
    db = Path(run_dir).resolve() / "mlruns" / "mlflow.db"
    return f"sqlite:///{db}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}`` with values as MLflow param strings (≤ 6000 chars)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = text[:6000]
    return out


def _client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise TrackingError("tracking: mlflow needs MLflow: pip install 'trprompt[tracking]'") from err
    return MlflowClient(tracking_uri=uri)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


class MLflowTracker:
    """Loop hooks (duck-typed ``trprompt.loop.LoopHooks``) that log a run to MLflow.

    Args:
        run_dir: the run's local folder (read for finished-stage metrics and artifacts).
        params: config to log as params (a nested dict; flattened) when the MLflow run is created.
        tracking_uri: MLflow tracking URI (None: :func:`default_tracking_uri`).
        experiment: MLflow experiment name.
        run_name: MLflow run name (default: the run directory's name).
        tags: extra tags for the run.

    """

    def __init__(
        self,
        run_dir: str | Path,
        params: Mapping[str, Any] | None = None,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.tracking_uri = tracking_uri or default_tracking_uri(self.run_dir)
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = _client(self.tracking_uri)
        record_path = self.run_dir / RUN_FILE
        record = artifacts.read_json(record_path) if record_path.exists() else {}
        self._logged: set[str] = set(record.get("logged", []))
        self._usage: dict[str, dict[str, int]] = record.get("usage", {})
        self._iteration = 0
        self.run_id: str | None = None
        if record.get("run_id") and record.get("tracking_uri") == self.tracking_uri:
            try:
                self.client.get_run(record["run_id"])
                self.run_id = record["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            except Exception:  # the store was reset: start a new MLflow run
                self.run_id = None
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is not None:
                exp_id = exp.experiment_id
            elif self.tracking_uri.startswith("sqlite:///"):  # a local store: artifacts next to its database
                db = Path(self.tracking_uri[len("sqlite:///"):])
                exp_id = self.client.create_experiment(experiment, artifact_location=str(db.parent / "artifacts"))
            else:
                exp_id = self.client.create_experiment(experiment)
            run = self.client.create_run(exp_id, run_name=run_name or self.run_dir.name, tags=dict(tags or {}))
            self.run_id = run.info.run_id
            if params:
                self.log_params(params)
            self._logged = set()
            self._usage = {}
        self._save()

    # ------------------------------------------------------------------ plain logging API
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a nested dict as params (flattened keys)."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log the numeric values of ``metrics`` at ``step`` (others are skipped)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, raw in metrics.items() if (v := _number(raw)) is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Copy a folder's files to the run's artifacts."""
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    # ------------------------------------------------------------------ loop hooks
    def stage(self, iteration: int, name: str) -> None:
        """A stage starts: log what the finished stages wrote."""
        if iteration >= 0:
            self._iteration = iteration
        self.client.set_tag(self.run_id, "stage", f"{iteration}:{name}")
        self.sync_stage_metrics()

    def synthetic_accuracy(self, iteration: int, accuracy: float) -> None:
        """Target accuracy on iteration ``iteration``'s synthetic set."""
        self.log_metrics({"synthetic_accuracy": accuracy}, step=iteration)

    def validation_accuracy(self, iteration: int, accuracy: float, phase: str) -> None:
        """Validation accuracy after ``phase``."""
        self.log_metrics({f"validation_accuracy/{phase}": accuracy}, step=iteration)

    def usage(self, role: str, delta: Any) -> None:
        """Cumulative tokens and calls of ``role``, at the current iteration."""
        total = self._usage.setdefault(role, {"calls": 0, "requests": 0, "tokens": 0})
        total["calls"] += int(getattr(delta, "calls", 0))
        total["requests"] += int(getattr(delta, "requests", 0))
        total["tokens"] += int(getattr(delta, "prompt_tokens", 0)) + int(getattr(delta, "completion_tokens", 0))
        self.log_metrics({f"tokens/{role}": total["tokens"], f"calls/{role}": total["calls"],
                          f"requests/{role}": total["requests"]}, step=self._iteration)
        self._save()

    # ------------------------------------------------------------------ run-directory records
    def sync_stage_metrics(self) -> None:
        """Log SFT losses and reward-search traces of finished stages not logged yet."""
        for d in sorted(self.run_dir.glob("iter_*")):
            try:
                k = int(d.name.split("_", 1)[1])
            except ValueError:
                continue
            sft = d / "sft_metrics.json"
            if sft.exists() and f"sft/{k}" not in self._logged:
                m = artifacts.read_json(sft)
                self.log_metrics({f"sft/{key}": m.get(key) for key in
                                  ("first_loss", "final_loss", "mean_loss_last_epoch", "steps", "train_s")}, step=k)
                for rec in m.get("history") or []:
                    self.log_metrics({f"sft/iter{k}/loss": rec.get("loss"), f"sft/iter{k}/lr": rec.get("lr")},
                                     step=int(rec.get("step", 0)))
                self._logged.add(f"sft/{k}")
            rs = d / "reward_search.json"
            if rs.exists() and f"reward_search/{k}" not in self._logged:
                r = artifacts.read_json(rs)
                for i, row in enumerate(r.get("trace") or []):
                    self.log_metrics({f"reward_search/iter{k}/accuracy": row.get("accuracy")}, step=i)
                self.log_metrics({"reward_search/best_accuracy": r.get("best_accuracy"),
                                  "reward_search/initial_accuracy": r.get("initial_accuracy")}, step=k)
                self._logged.add(f"reward_search/{k}")
        self._save()

    def finish(self, status: str = "FINISHED", log_artifacts: bool = True) -> None:
        """Log the last stages' metrics and the run directory's artifacts; end the MLflow run with ``status``."""
        self.sync_stage_metrics()
        if log_artifacts:
            for p in sorted(self.run_dir.iterdir()):
                if p.name in ("mlruns", RUN_FILE) or p.name.startswith("."):
                    continue
                if p.is_dir():
                    self._log_dir(p, p.name)
                else:
                    self.client.log_artifact(self.run_id, str(p))
        self.client.set_terminated(self.run_id, status)

    def _log_dir(self, folder: Path, artifact_path: str) -> None:
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or p.name == "ray_train":
                continue
            if p.is_dir():
                self._log_dir(p, f"{artifact_path}/{p.name}")
            else:
                self.client.log_artifact(self.run_id, str(p), artifact_path)

    def _save(self) -> None:
        artifacts.write_json(self.run_dir / RUN_FILE, {
            "tracking_uri": self.tracking_uri, "run_id": self.run_id,
            "logged": sorted(self._logged), "usage": self._usage,
        })


def prepare_experiment(tracking_uri: str, name: str) -> str:
    """Create experiment ``name`` in the store if missing (local stores keep artifacts next to their database).

    For callers that log through other MLflow integrations (Ray Tune's ``MLflowLoggerCallback``).
    """
    if tracking_uri.startswith("sqlite:///"):  # before the client: older MLflow opens the database at once
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = _client(tracking_uri)
    if client.get_experiment_by_name(name) is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = str(Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts")
        client.create_experiment(name, artifact_location=location)
    return name


def tracker_for(cfg: Any, run_dir: str | Path | None = None, **kwargs: Any) -> MLflowTracker | None:
    """The tracker a config asks for (``cfg.tracking``), or None when tracking is off."""
    if getattr(cfg, "tracking", "none") in (None, "none"):
        return None
    if cfg.tracking != "mlflow":
        raise TrackingError(f"tracking: unknown tracker {cfg.tracking!r} (none or mlflow)")
    return MLflowTracker(run_dir or cfg.run_dir, params=cfg.to_dict(), tracking_uri=cfg.tracking_uri, **kwargs)


def open_run(run_dir: str | Path, params: Mapping[str, Any] | None = None, tracking_uri: str | None = None,
             experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
             tags: Mapping[str, str] | None = None) -> MLflowTracker:
    """One MLflow run for any harness (e.g. one per method of a comparison); resumable via ``run_dir``."""
    return MLflowTracker(run_dir, params=params, tracking_uri=tracking_uri, experiment=experiment,
                         run_name=run_name, tags=tags)


def log_comparison(comparison: Any, result: Any, tracking_uri: str | None = None) -> list[str]:
    """Log a finished comparison to MLflow: one run per method, in experiment ``compare/<run dir name>``.

    ``comparison`` is a ``trprompt.experiments.compare.runner.Comparison`` and ``result`` its
    ``ComparisonResult``. Each method's run gets the shared run config and the method name as params,
    its fit history (``val_accuracy`` per step), best validation accuracy, optimisation tokens and
    requests, and test accuracy per data set as metrics, and its method folder as artifacts.
    The default store is ``<comparison run_dir>/mlruns``. Returns the MLflow run ids.
    """
    run_dir = Path(result.run_dir)
    uri = tracking_uri or default_tracking_uri(run_dir)
    ids = []
    for res in result.results:
        folder = Path(comparison.method_dir(res.name, res.key))
        folder.mkdir(parents=True, exist_ok=True)
        t = MLflowTracker(folder, params={"method": res.name, "method_key": res.key, **comparison.run.to_dict()},
                          tracking_uri=uri, experiment=f"compare/{run_dir.name}", run_name=res.name,
                          tags={"trprompt.method": res.name})
        for i, h in enumerate((res.fit or {}).get("history") or []):
            t.log_metrics({"val_accuracy": h.get("val_accuracy")}, step=int(h.get("step", i)))
        t.log_metrics({"best_val_accuracy": res.best_val_accuracy(),
                       **{f"optimisation/{k}": v for k, v in res.optimisation_totals().items()}})
        for ds, summary in res.tests.items():
            t.log_metrics({f"test_accuracy/{ds}": summary.get("accuracy")})
        if res.error:
            t.client.set_tag(t.run_id, "error", str(res.error)[:5000])
        t.finish("FAILED" if res.error else "FINISHED")
        ids.append(t.run_id)
    return ids
