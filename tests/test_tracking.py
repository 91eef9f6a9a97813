"""MLflow tracking through the loop's hooks, against a real local MLflow store (read back with MlflowClient)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_loop import FakeSFT, fake_gold, make_cfg, scripted

from trprompt.config import ConfigError, config_from_dict
from trprompt.engines.echo import EchoEngine
from trprompt.loop import TRPromptTrainer
from trprompt.tracking import RUN_FILE, MLflowTracker, default_tracking_uri, flatten, tracker_for

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

ROLES = ("prompt_model", "target_model", "reward_model", "optimizer_model")


class LossySFT(FakeSFT):
    """FakeSFT that also reports a per-step loss history like the real trainers."""

    def __call__(self, *a, **kw):
        m = super().__call__(*a, **kw)
        return {**m, "first_loss": 2.0, "steps": 3,
                "history": [{"step": s, "loss": 2.0 - 0.5 * s, "lr": 1e-3} for s in (1, 2, 3)]}


def _run(cfg, sft, tracker):
    engines = {r: EchoEngine(scripted) for r in ROLES}
    status = "FAILED"
    try:
        summary = TRPromptTrainer(cfg, engines, sft, base_model_path="unused", hooks=tracker, progress=False).run()
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status, log_artifacts=status == "FINISHED")


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_mlflow_logs_params_metrics_artifacts_and_resumes_the_same_run(tmp_path, monkeypatch):
    fake_gold(monkeypatch)
    cfg = make_cfg(tmp_path, tracking="mlflow")
    run_dir = Path(cfg.run_dir)
    tracker = tracker_for(cfg)
    assert tracker is not None and tracker.tracking_uri == default_tracking_uri(run_dir)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, LossySFT(crash_on=2), tracker)
    client = MlflowClient(default_tracking_uri(run_dir))
    first = client.get_run(tracker.run_id)
    assert first.info.status == "KILLED"

    tracker2 = tracker_for(cfg)  # resuming the run directory resumes the MLflow run
    assert tracker2.run_id == tracker.run_id
    summary = _run(cfg, LossySFT(), tracker2)

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["loop.iterations"] == "2" and p["models.prompt_model.engine"] == "echo" and p["tracking"] == "mlflow"

    def steps(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    assert steps("validation_accuracy/initial") == {0: pytest.approx(0.0)}
    assert set(steps("validation_accuracy/sft")) == {1, 2}
    assert set(steps("validation_accuracy/reward_search")) == {1, 2}
    syn = steps("synthetic_accuracy")
    assert syn == {1: 0.0, 2: 1.0}  # the scripted engine: useless base prompts, helpful adapter prompts
    assert steps("sft/iter1/loss") == {1: 1.5, 2: 1.0, 3: 0.5}
    assert set(steps("sft/first_loss")) == {1, 2}
    assert len(steps("reward_search/iter1/accuracy")) >= 1 and set(steps("reward_search/best_accuracy")) == {1, 2}
    # Tokens and calls per role are cumulative over the whole run, the crashed first attempt included.
    for key, usage_of in (("tokens/prompt_model", lambda u: u["prompt_tokens"] + u["completion_tokens"]),
                          ("calls/target_model", lambda u: u["calls"])):
        values = [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                          key=lambda m: (m.timestamp, m.value))]
        assert values == sorted(values) and values[0] > 0
        assert values[-1] > usage_of(summary.usage[key.split("/")[1]])  # second attempt alone spent less

    arts = _artifacts(client, run.info.run_id)
    assert {"report.md", "best.json", "config.yaml", "iter_1/synthetic_set.parquet",
            "iter_2/adapter/adapter_config.json",
            "iter_1/optimal_reward.txt", "test/trprompt.json"} <= arts
    assert any(a.endswith(".png") for a in arts)
    assert not any(a.startswith("mlruns") or a == RUN_FILE for a in arts)
    # The local store and its artifacts live inside the run directory.
    assert (run_dir / "mlruns" / "mlflow.db").is_file()
    assert list((run_dir / "mlruns" / "artifacts").rglob("report.md"))


def test_tracking_is_off_by_default_and_validated(tmp_path):
    cfg = make_cfg(tmp_path)
    assert cfg.tracking == "none" and tracker_for(cfg) is None
    with pytest.raises(ConfigError, match="tracking"):
        config_from_dict({"tracking": "wandb"})


def test_tracking_uri_points_at_another_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
    t = MLflowTracker(tmp_path / "run", params={"a": {"b": 1, "c": [1, 2]}}, tracking_uri=uri, run_name="x")
    t.log_metrics({"m": 0.5, "skipped": "text"}, step=3)
    t.finish(log_artifacts=False)
    run = MlflowClient(uri).get_run(t.run_id)
    assert run.data.params == {"a.b": "1", "a.c": "[1, 2]"} and run.data.metrics == {"m": 0.5}
    assert not (tmp_path / "run" / "mlruns").exists()
    assert flatten({"x": {"y": {"z": True}}}) == {"x.y.z": "True"}


def test_comparison_logs_one_mlflow_run_per_method(tmp_path, capsys):
    import yaml
    from test_compare import compare_yaml

    import jobs.compare as job

    path = compare_yaml(tmp_path, methods=["plain", "cot"])
    data = yaml.safe_load(path.read_text())
    data["run"]["tracking"] = "mlflow"
    path.write_text(yaml.safe_dump(data))
    assert job.main(["--config", str(path), "--local", "--no-progress"]) == 0
    client = MlflowClient(default_tracking_uri(tmp_path / "cmp"))
    exp = client.get_experiment_by_name("compare/cmp")
    runs = {r.data.params["method"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"plain", "cot"}
    for name, r in runs.items():
        assert r.info.status == "FINISHED" and r.info.run_name == name
        assert 0.0 <= r.data.metrics["test_accuracy/svamp"] <= 1.0
        assert r.data.params["dataset.name"] == "gsm8k"
    out = capsys.readouterr().out
    for n, r in runs.items():  # the logged numbers are the ones the job reports
        assert f"[compare] {n}: {r.data.metrics['test_accuracy/svamp'] * 100:.2f}%" in out


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_logs_one_mlflow_run_per_trial_through_ray_tune(ray_session, tmp_path):
    from test_sweep import BASE, FakeSFT, _register_by_value, echo_builder, sweep_dict

    from cluster.tune_sweep import run_sweep
    from trprompt.experiments.sweep.spec import sweep_spec_from_dict

    _register_by_value()
    data = sweep_dict(tmp_path)
    data["base"] = {**BASE, "tracking": "mlflow"}
    out = run_sweep(sweep_spec_from_dict(data), engine_builder=echo_builder, sft_runner=FakeSFT(), verbose=0)
    client = MlflowClient(default_tracking_uri(tmp_path / "sweep"))
    exp = client.get_experiment_by_name("sweep/tiny")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == len(out.rows) == 2
    scores = sorted(r.data.metrics["val_accuracy"] for r in runs)
    assert scores == sorted(row["val_accuracy"] for row in out.rows)  # MLflow has what the sweep table has
    assert all("generation.prompt_temperature" in r.data.params or any(
        k.endswith("prompt_temperature") for k in r.data.params) for r in runs)
