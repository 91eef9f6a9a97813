"""Which Ray cluster a job attaches to (cluster/runtime.py), and what it prints."""

from __future__ import annotations

from typing import Any

import pytest


class _FakeRay:
    """Records ``ray.init`` calls instead of starting Ray."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.up = False

    def is_initialized(self) -> bool:
        return self.up

    def init(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        self.up = True


@pytest.fixture()
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> _FakeRay:
    import ray

    from cluster import runtime

    fake = _FakeRay()
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr(runtime, "current_attachment",
                        lambda started_local=False: runtime.RayAttachment("10.0.0.1:6379", "http://10.0.0.1:8265",
                                                                          started_local))
    return fake


def test_no_address_starts_a_new_local_instance(fake_ray: _FakeRay, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Without --address or RAY_ADDRESS a job never attaches to a cluster recorded on the machine."""
    from cluster.runtime import init_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    info = init_ray(None, log_to_driver=False)
    assert fake_ray.calls == [{"address": "local", "dashboard_host": "127.0.0.1", "log_to_driver": False}]
    assert info.started_local
    out = capsys.readouterr().out
    assert "started a local Ray instance at 10.0.0.1:6379" in out and "http://10.0.0.1:8265" in out


def test_ray_address_or_flag_attaches(fake_ray: _FakeRay, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.runtime import init_ray

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    init_ray(None)
    fake_ray.up = False
    init_ray("auto")  # the flag wins over the environment
    assert [c["address"] for c in fake_ray.calls] == ["10.0.0.1:6379", "auto"]
    assert all("dashboard_host" not in c for c in fake_ray.calls)  # not allowed when attaching
    assert capsys.readouterr().out.count("attached to Ray cluster at 10.0.0.1:6379") == 2


@pytest.mark.ray
def test_banner_reports_the_real_cluster(ray_session: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    from cluster.runtime import init_ray

    info = init_ray("some-other-cluster:1234")  # already connected: no second init, just the banner
    assert info.address == ray.get_runtime_context().gcs_address
    assert info.address in capsys.readouterr().out


def test_every_job_uses_the_one_rule() -> None:
    """No job or bench calls ray.init itself (which would attach to whatever cluster Ray finds)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for path in [*root.glob("jobs/*.py"), root / "bench" / "serve_load.py"]:
        text = path.read_text()
        assert "ray.init(" not in text, f"{path.name} calls ray.init directly; use cluster.runtime.init_ray"
