"""``ray job submit --working-dir`` against a real ``ray start --head``: the run lands in ~/trprompt_runs,
survives ``ray job stop``, and an edited re-submit (a new working-dir package) resumes it.

The head gets its own temp dir and ports and is stopped by killing only the process group this test started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from trprompt.storage import DEFAULT_ROOT

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def _ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head(tmp_path_factory):
    """A Ray head on loopback with its own temp dir and ports; yields the dashboard address."""
    temp = Path(f"/tmp/rj-{uuid.uuid4().hex[:6]}")
    gcs, dash, client, agent, agent_grpc, metrics, rt_agent, nm, om = _ports(9)
    cmd = [RAY, "start", "--head", "--block", f"--temp-dir={temp}", f"--port={gcs}", "--node-ip-address=127.0.0.1",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_agent}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
           "--num-cpus=2", "--disable-usage-stats"]
    env = _env()
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")  # noqa: SIM115  # closed below
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:  # the dashboard answers
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not start: {Path(log.name).read_text()[-2000:]}") from None
                time.sleep(1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only the process group this fixture started
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _env() -> dict[str, str]:
    """This machine may hold a ~/.ray/auth_token from another cluster; this private loopback head runs without."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


def _job(address: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = _env()
    return subprocess.run([RAY, "job", *args[:1], "--address", address, *args[1:]], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_submit_stop_edit_resubmit_resumes_in_home_storage(tmp_path, tiny_model_dir, ray_head):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", ".venv*", "*.egg-info"))
    name = f"job-test-{uuid.uuid4().hex[:8]}"
    stored = Path(DEFAULT_ROOT).expanduser() / "runs" / name
    role = {"model": str(tiny_model_dir), "engine": "hf", "num_actors": 1, "num_cpus": 0.25, "threads": 1}
    cfg = {
        "run_dir": f"runs/{name}",
        "dataset": {"name": "gsm8k", "train_limit": 12, "val_limit": 2, "test_limit": 2},
        "models": {"share_engines": True, "prompt_model": role, "target_model": role, "reward_model": role},
        "generation": {"prompt_max_tokens": 8, "target_max_tokens": 8, "reward_max_tokens": 8, "batch_size": 8},
        "loop": {"iterations": 1, "synthetic_size": 4},
        "sft": {"lora_r": 2, "lora_alpha": 4, "epochs": 1, "batch_size": 2, "learning_rate": 1e-3,
                "max_length": 384, "num_workers": 1, "cpus_per_worker": 0.25},
        "reward_search": {"steps": 0},
        "eval": {"baselines": ["plain"]},
    }
    config = repo / "configs" / "tiny-job.yaml"
    config.write_text("# tiny job for the storage test\n" + yaml.safe_dump(cfg))
    entry = ["--", "python", "jobs/train.py", "--config", "configs/tiny-job.yaml", "--no-progress"]
    try:
        first = _job(ray_head, "submit", "--no-wait", "--working-dir", str(repo), "--submission-id", f"{name}-a",
                     *entry)
        assert first.returncode == 0, first.stderr
        deadline = time.time() + 240
        while not (stored / "iter_1" / "synthetic_set.parquet").exists():  # a stage finished: stop the job
            status = _job(ray_head, "status", f"{name}-a").stdout
            assert "FAILED" not in status, _job(ray_head, "logs", f"{name}-a").stdout[-3000:]
            assert time.time() < deadline, _job(ray_head, "logs", f"{name}-a").stdout[-3000:]
            time.sleep(1)
        _job(ray_head, "stop", f"{name}-a")
        logs_a = _job(ray_head, "logs", f"{name}-a").stdout
        assert f"run directory: {stored} (storage root: {DEFAULT_ROOT}" in logs_a
        assert not (repo / "runs").exists()  # nothing went to the submitter's folder

        config.write_text("# edited before re-submitting\n" + yaml.safe_dump(cfg))  # a new working-dir package
        second = _job(ray_head, "submit", "--working-dir", str(repo), "--submission-id", f"{name}-b", *entry,
                      timeout=400)
        out = second.stdout + second.stderr
        assert second.returncode == 0, out[-4000:]
        assert "synthetic set of" not in out  # iteration 1's synthetic set was reused, not regenerated
        assert "validation accuracy (initial)" not in out
        assert f"[trprompt] report: {stored / 'report.md'}" in out
        assert f"open it with: less {stored / 'report.md'}" in out
        assert (stored / "report.md").read_text().startswith("# TRPrompt run report")
        assert (stored / "iter_1" / "adapter" / "adapter_config.json").is_file()
    finally:
        shutil.rmtree(stored, ignore_errors=True)
