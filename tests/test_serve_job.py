"""``python jobs/serve.py`` end to end in a subprocess: local Ray, the banner, secure defaults, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.ray
@pytest.mark.slow
def test_jobs_serve_starts_local_ray_prints_where_and_is_secure(tmp_path: Path) -> None:
    from cluster.serve.run_spec import write_base_run

    model = {"model": "echo-model", "engine": "echo", "num_cpus": 0.1}
    write_base_run(tmp_path / "runs" / "run-a", model, optimal_reward="Reward A: name every quantity.")
    write_base_run(tmp_path / "runs" / "run-b", model, optimal_reward="Reward B: check the units.")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TRPROMPT_STORAGE",
                                                             "TRPROMPT_SERVE_ADMIN_TOKEN", "TRPROMPT_SERVE_API_KEY")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "serve.py"), "--run-dir", "runs/run-a", "--port", str(port),
         "--admin-token-file", str(tmp_path / "token")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(1.0)
        else:
            pytest.fail("jobs/serve.py did not become healthy: " + "".join(lines)[-3000:])
        out = "".join(lines)
        # no --address, no RAY_ADDRESS: its own local instance, and it says where
        assert "started a local Ray instance at" in out and "(dashboard:" in out, out[-2000:]
        token_file = tmp_path / "token"
        assert f"written to {token_file}" in out and (token_file.stat().st_mode & 0o077) == 0
        token = token_file.read_text().strip()
        assert token not in out
        assert httpx.get(f"{url}/healthz", headers={"Host": "evil.example"}).status_code == 421
        body = {"run_dir": "run-b"}  # relative to the default root, ./runs
        assert httpx.post(f"{url}/v1/admin/reload", json=body).status_code == 401
        r = httpx.post(f"{url}/v1/admin/reload", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert r.status_code == 200, r.text
        p = httpx.post(f"{url}/v1/prompt", json={"question": "What is 2 + 3?"}, timeout=60)
        assert p.status_code == 200 and "Reward B" in p.json()["prompt"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, "".join(lines)[-2000:]
    assert "shutting down" in "".join(lines)
