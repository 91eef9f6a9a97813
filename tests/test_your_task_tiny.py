"""docs/your_task.md's path on the real embedded model (SmolLM2-135M-Instruct), with configs/your-task-tiny.yaml.

Train (the doc's ``python jobs/train.py --config ... --local``), evaluate the trained run
(``trprompt eval --method trprompt --run-dir ...``) and serve it (the app ``jobs/serve.py`` deploys,
one ``/v1/solve`` request), every role played by SmolLM2 with no engine overrides. The config is as
small as the loop allows (K = 1, N = 4, 2 validation and 2 test questions, 1 TextGrad step with 1
candidate, 1 SFT step), so this checks the mechanics on the real model, not accuracy.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from test_your_task_doc import DOC, ROOT, doc_commands

TINY = "configs/your-task-tiny.yaml"


def test_tiny_config_is_the_docs_task_made_tiny():
    from trprompt.config import load_config

    tiny, demo = load_config(ROOT / TINY), load_config(ROOT / "configs" / "your-task-demo.yaml")
    assert tiny.dataset == demo.dataset.__class__(**{**demo.dataset.__dict__, "val_limit": 2, "test_limit": 2})
    assert tiny.task == demo.task
    for role in ("prompt_model", "target_model", "reward_model"):
        mc = getattr(tiny.models, role)
        assert (mc.engine, mc.model) == ("hf", "smollm2-135m-instruct"), role
    assert (tiny.loop.iterations, tiny.loop.synthetic_size) == (1, 4)
    assert (tiny.reward_search.steps, tiny.reward_search.candidates_per_step, tiny.reward_search.val_questions) == \
        (1, 1, 2)
    assert tiny.sft.epochs == 1 and tiny.sft.batch_size >= tiny.loop.synthetic_size  # one optimizer step
    assert f"python jobs/train.py --config {TINY} --local" in doc_commands()


@pytest.mark.slow
@pytest.mark.ray
def test_doc_path_on_the_embedded_model(tmp_path, monkeypatch, serve_url):
    import pyarrow.parquet as pq
    from ray import serve

    from cluster.serve.app import build_app
    from jobs.cli import main as cli_main
    from jobs.train import main as train_main

    t0 = time.perf_counter()
    monkeypatch.chdir(ROOT)  # the doc's relative paths
    monkeypatch.setenv("TEXTGRAD_LOG_DIR", str(tmp_path / "tg"))
    cmds = doc_commands()
    run_dir = tmp_path / "your-task-tiny"

    # 3. train: the doc's command with the tiny config, as written (only the run folder and the bars differ)
    train = f"python jobs/train.py --config {TINY} --local"
    assert train in cmds
    assert train_main(train.split()[2:] + ["--run-dir", str(run_dir), "--no-progress"]) == 0
    config = (run_dir / "config.yaml").read_text()
    assert "smollm2-135m-instruct" in config and "engine: echo" not in config
    report = (run_dir / "report.md").read_text()
    assert "task: **unit_conversion**, grader: `numeric`" in report
    adapter = run_dir / "iter_1" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").stat().st_size > 0
    best = json.loads((run_dir / "best.json").read_text())
    assert best["optimal_reward"].strip()
    assert json.loads((run_dir / "iter_1" / "sft_metrics.json").read_text())["steps"] == 1  # one SFT step

    # 4. evaluate the trained policy on the run's own task (the doc's command; the run's models, no override)
    ev = "trprompt eval --method trprompt --run-dir runs/your-task-demo"
    assert ev in cmds
    out = tmp_path / "eval-trp"
    argv = ev.replace("runs/your-task-demo", str(run_dir)).split()[1:] + [
        "--limit", "2", "--max-tokens", "24", "--out", str(out), "--no-progress"]
    assert cli_main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grader"] == "numeric" and summary["dataset"] == "unit_conversion"
    assert summary["method"] == "trprompt" and summary["n"] == 2
    rows = pq.read_table(out / "rows.parquet").to_pylist()
    assert len(rows) == 2 and all(r["output"].strip() for r in rows)  # SmolLM2 wrote every answer
    assert all(r["instruction"].strip() for r in rows)  # and Π (SmolLM2 + the adapter) every instruction
    assert all(r["grader"] == "numeric" for r in rows)
    accuracy = summary["accuracy"]
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(sum(float(r["score"]) for r in rows) / len(rows))
    assert "numeric" in (out / "summary.md").read_text()

    # 5. serve it: the app jobs/serve.py deploys (SmolLM2 + the run's adapter in a replica), one /v1/solve
    assert any(c.startswith("python jobs/serve.py --run-dir runs/your-task-demo") for c in cmds)
    question = "How many millilitres are in 2.5 litres?"
    assert question in DOC.read_text()
    app = build_app({"run_dir": str(run_dir), "num_cpus": 0.25, "request_timeout_s": 240.0, "rate_limit_per_s": 0,
                     "enable_admin": False})
    serve.run(app, name="trp-your-task-tiny", route_prefix="/your-task-tiny", blocking=False)
    try:
        with httpx.Client(base_url=f"{serve_url}/your-task-tiny", timeout=300.0) as c:
            r = c.post("/v1/solve", json={"question": question})
            assert r.status_code == 200, r.text
            body = r.json()
    finally:
        serve.delete("trp-your-task-tiny")
    assert body["prompt"].strip() and body["answer"].strip()  # text from SmolLM2, not an echo of the request
    assert body["adapter_version"].split("@")[0] == (best["adapter"] or "base")  # the run's best iteration
    assert body["tokens_by_role"]["prompt_model"]["completion"] > 0
    elapsed = time.perf_counter() - t0
    print(f"\n[your-task-tiny] train + eval + serve on SmolLM2: {elapsed:.0f} s")
