"""docs/your_task.md, command by command, on a tiny config.

Π is the tiny random Llama of the tests (it gets a real LoRA SFT); the target and reward model are the
echo engine. The doc's commands are run as written, plus the overrides that make them tiny and
offline-fast (``--engine echo``, ``--set models...``). Checks the mechanics, not accuracy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "your_task.md"
DATA = "examples/unit_conversion.jsonl"


def doc_commands() -> list[str]:
    """The shell commands of the doc's code blocks (continuation lines joined)."""
    text = DOC.read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"\s+#.*$", "", cmd).strip()
            if cmd:
                cmds.append(re.sub(r"\s+", " ", cmd))
    return cmds


def test_the_example_file_loads_and_is_documented():
    from trprompt.config import load_config
    from trprompt.data import task_from_config

    rows = [json.loads(line) for line in (ROOT / DATA).read_text().splitlines()]
    assert len(rows) == 60 and {"id", "question", "answer", "explanation"} <= set(rows[0])
    task = task_from_config(load_config(ROOT / "configs" / "your-task-demo.yaml"))
    assert task.sizes() == {"train": 43, "val": 5, "test": 12}  # the numbers the doc states
    assert "43 train, 5 validation, 12 test" in DOC.read_text()
    cmds = doc_commands()
    assert any(c.startswith("trprompt eval --dataset examples/unit_conversion.jsonl") for c in cmds)
    assert "python jobs/train.py --config configs/your-task-demo.yaml --local" in cmds
    assert "trprompt eval --method trprompt --run-dir runs/your-task-demo" in cmds
    assert any(c.startswith("python jobs/serve.py --run-dir runs/your-task-demo") for c in cmds)


@pytest.mark.slow
def test_doc_commands_train_evaluate_and_serve(tmp_path, monkeypatch, tiny_model_dir, serve_url, capsys):
    from ray import serve

    from cluster.serve.app import build_app
    from jobs.cli import main as cli_main
    from jobs.train import main as train_main

    monkeypatch.chdir(ROOT)  # the doc's relative paths
    monkeypatch.setenv("TEXTGRAD_LOG_DIR", str(tmp_path / "tg"))
    cmds = doc_commands()
    run_dir = tmp_path / "your-task-demo"

    # 2. a baseline evaluation (the doc's command, on the echo engine)
    baseline = next(c for c in cmds if c.startswith("trprompt eval --dataset"))
    argv = baseline.split()[1:] + ["--engine", "echo", "--out", str(tmp_path / "eval-cot"), "--no-progress"]
    assert cli_main(argv) == 0
    summary = json.loads((tmp_path / "eval-cot" / "summary.json").read_text())
    assert summary["n"] == 12 and summary["grader"] == "numeric" and summary["dataset"] == "unit_conversion"

    # 3. train (the doc's command; Π = tiny Llama, target and reward = echo, tiny sizes)
    train = "python jobs/train.py --config configs/your-task-demo.yaml --local"
    assert train in cmds
    tiny = ["--set", f"models.prompt_model.model={tiny_model_dir}", "--set", "models.prompt_model.threads=1",
            "--set", "models.target_model.engine=echo", "--set", "models.reward_model.engine=echo",
            "--set", "sft.max_length=256", "--set", "generation.prompt_max_tokens=8",
            "--set", "dataset.test_limit=3", "--set", "dataset.val_limit=2", "--set", "reward_search.val_questions=2",
            "--run-dir", str(run_dir), "--no-progress"]
    assert train_main(train.split()[2:] + tiny) == 0
    report = (run_dir / "report.md").read_text()
    assert "## Data" in report and "task: **unit_conversion**, grader: `numeric`" in report
    assert "no rows dropped" in report
    templates = json.loads((run_dir / "templates.json").read_text())
    assert "Convert a quantity from one unit to another." in templates["prompt_model_system"]
    assert (run_dir / "iter_1" / "adapter" / "adapter_config.json").is_file()

    # 4. evaluate the trained policy on the run's own task
    ev = "trprompt eval --method trprompt --run-dir runs/your-task-demo"
    assert ev in cmds
    argv = ev.replace("runs/your-task-demo", str(run_dir)).split()[1:] + [
        "--engine", "echo", "--limit", "3", "--out", str(tmp_path / "eval-trp"), "--no-progress"]
    assert cli_main(argv) == 0
    summary = json.loads((tmp_path / "eval-trp" / "summary.json").read_text())
    assert summary["n"] == 3 and summary["dataset"] == "unit_conversion" and summary["method"] == "trprompt"

    # 5. serve it (the same app jobs/serve.py deploys, next to the serving tests' app) and ask for a prompt
    app = build_app({"run_dir": str(run_dir), "num_cpus": 0.25, "request_timeout_s": 60.0})
    serve.run(app, name="trp-your-task", route_prefix="/your-task", blocking=False)
    try:
        question = "How many millilitres are in 2.5 litres?"
        assert question in DOC.read_text()
        with httpx.Client(base_url=f"{serve_url}/your-task", timeout=120.0) as c:
            r = c.post("/v1/prompt", json={"question": question})
            assert r.status_code == 200, r.text
            body = r.json()
            assert isinstance(body.get("prompt") or body.get("prompts"), (str, list))
            r = c.post("/v1/solve", json={"question": question})
            assert r.status_code == 200, r.text
            assert question in r.json()["answer"]  # the echo target repeats question + instruction
    finally:
        serve.delete("trp-your-task")
