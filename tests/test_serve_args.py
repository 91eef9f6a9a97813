"""Settings (cluster/serve/args.py): ``serve run key=value`` strings and ``jobs/serve.py``'s flags."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_serve_run_key_value_strings_are_coerced() -> None:
    from cluster.serve.args import ServeArgs

    s = ServeArgs.model_validate({"run_dir": "runs/x", "max_batch_size": "8", "with_target": "false",
                                  "allowed_hosts": "serve.example.com, localhost", "run_roots": "/data/runs",
                                  "rate_limit_per_s": "0"})
    assert s.max_batch_size == 8 and s.with_target is False and s.rate_limit_per_s == 0
    assert s.allowed_hosts == ["serve.example.com", "localhost"] and s.run_roots == ["/data/runs"]
    with pytest.raises(ValueError):
        ServeArgs.model_validate({"run_dir": "x", "admin_token": "short"})  # tokens are at least 16 characters
    with pytest.raises(ValueError):
        ServeArgs.model_validate({"run_dir": "x", "no_such_setting": 1})


def test_jobs_serve_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cluster.serve.args import LOOPBACK_HOSTS, ServeArgs
    from jobs.serve import parse_args, serve_args

    monkeypatch.delenv("TRPROMPT_SERVE_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("TRPROMPT_SERVE_API_KEY", raising=False)
    defaults = ServeArgs.model_validate(serve_args(parse_args(["--run-dir", "runs/x"])))
    assert defaults.enable_admin and defaults.admin_token is None  # a token will be generated at start
    assert defaults.allowed_hosts == list(LOOPBACK_HOSTS) and not defaults.allow_reward_text
    assert defaults.rate_limit_per_s == 20.0 and defaults.api_key is None

    monkeypatch.setenv("TRPROMPT_SERVE_ADMIN_TOKEN", "a-token-of-enough-length")
    monkeypatch.setenv("TRPROMPT_SERVE_API_KEY", "sk-local")
    s = ServeArgs.model_validate(serve_args(parse_args([
        "--run-dir", "runs/x", "--allowed-host", "serve.example.com", "--allowed-host", "localhost",
        "--allow-root", str(tmp_path), "--allow-reward-text", "--rate-limit", "0", "--max-pending-requests", "8",
        "--admin-token-file", str(tmp_path / "tok")])))
    assert s.admin_token == "a-token-of-enough-length" and s.api_key == "sk-local"
    assert s.allowed_hosts == ["serve.example.com", "localhost"] and s.resolved_run_roots() == [tmp_path.resolve()]
    assert s.allow_reward_text and s.rate_limit_per_s == 0 and s.max_pending_requests == 8
    assert s.admin_token_file == str(tmp_path / "tok")
    assert not ServeArgs.model_validate(serve_args(parse_args(["--run-dir", "x", "--no-admin"]))).enable_admin
