"""EngineActor / EnginePool / role engines / run metrics.

The Ray tests share one Ray instance (started once per session) and use a
small fake engine defined here. Crashes are made deterministic with marker
files: a marked request kills its worker process (or blocks, or raises) only the
first time any process sees it, so the retry succeeds.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray import cloudpickle  # noqa: E402

from actors.engine_actor import EngineActor  # noqa: E402
from actors.pool import EnginePool, EnginePoolError, split_batch  # noqa: E402
from cluster.metrics import RunMetrics  # noqa: E402
from cluster.resources import build_role_engines, bundles_for, plan_pools  # noqa: E402
from trprompt.config import ModelConfig, ModelsConfig  # noqa: E402
from trprompt.engines.base import AdapterNotFoundError, ChatRequest, ChatResult, Engine, Usage  # noqa: E402

# Ray workers cannot import this test module by name; ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FakeEngine:
    """Echoes ``adapter:last user message``; marked messages crash, block or raise once."""

    def __init__(self, marker_dir: str = "", tag: str = "") -> None:
        self.marker_dir = Path(marker_dir) if marker_dir else None
        self.tag = tag
        self.loaded: dict[str, str] = {}

    def _first_time(self, name: str) -> bool:
        assert self.marker_dir is not None
        try:
            fd = os.open(self.marker_dir / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True

    def generate(self, requests):
        out = []
        for r in requests:
            text = r.messages[-1]["content"]
            if text.startswith("CRASH") and self._first_time(text):
                os._exit(1)
            if text.startswith("BLOCK") and self._first_time(text):
                time.sleep(60)
            if text.startswith("FAIL") and self._first_time(text):
                raise RuntimeError("transient engine failure")
            if text.startswith("ALWAYS"):
                raise RuntimeError("permanent engine failure")
            if r.adapter is not None and r.adapter not in self.loaded:
                raise AdapterNotFoundError(r.adapter)
            reply = f"{r.adapter or 'base'}:{text}"
            out.append(ChatResult([reply] * r.sampling.n, len(text.split()), len(reply.split()) * r.sampling.n))
        return out

    def load_adapter(self, adapter_id, path):
        self.loaded[adapter_id] = path

    def unload_adapter(self, adapter_id):
        self.loaded.pop(adapter_id, None)


def fake_builder(cfg: ModelConfig) -> FakeEngine:
    return FakeEngine(tag=cfg.model)


def req(text: str, adapter: str | None = None) -> ChatRequest:
    return ChatRequest(messages=({"role": "user", "content": text},), adapter=adapter)


def texts(results: list[ChatResult]) -> list[str]:
    return [r.text for r in results]


@pytest.fixture
def make_pool(ray_session, tmp_path):
    pools: list[EnginePool] = []

    def make(num_actors: int = 2, **kw) -> EnginePool:
        kw.setdefault("factory", functools.partial(FakeEngine, str(tmp_path)))
        pool = EnginePool(None, num_actors=num_actors, num_cpus=0.25, num_gpus=0, name="t", **kw)
        pools.append(pool)
        return pool

    yield make
    for p in pools:
        p.close()


def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):  # the pid is written just after creation
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def wait_restarted(handle, old_pid: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = ray.get(handle.ping.remote(), timeout=10)
            if info["pid"] != old_pid:
                return info
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "actor did not restart"
        time.sleep(0.1)


# -- no Ray needed -------------------------------------------------------------------------


def test_split_batch_is_contiguous_and_balanced():
    for n in range(0, 23):
        for parts in range(1, 6):
            cuts = split_batch([1.0] * n, parts)
            assert len(cuts) == min(parts, n)
            assert [i for a, b in cuts for i in range(a, b)] == list(range(n))
            sizes = [b - a for a, b in cuts]
            assert all(s > 0 for s in sizes)
            if sizes:
                assert max(sizes) - min(sizes) <= 1
    # one long prompt at the front gets a range of its own
    cuts = split_batch([10.0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2)
    assert cuts == [(0, 1), (1, 11)]


def test_engine_actor_as_plain_class_syncs_adapters():
    actor = EngineActor(factory=FakeEngine)
    assert isinstance(actor.engine, Engine)
    out = actor.generate([req("a"), req("b", "x")], adapters={"x": "/p/x"})
    assert texts(out) == ["base:a", "x:b"]
    assert actor.adapters() == ["x"]
    assert actor.sync_adapters({"y": "/p/y"}) == ["y"]
    assert actor.adapters() == ["y"] and actor.engine.loaded == {"y": "/p/y"}
    assert actor.sync_adapters({"y": "/p/y"}) == []  # nothing to do
    assert actor.usage()["requests"] == 2
    assert actor.ping()["pid"] == os.getpid()
    with pytest.raises(ValueError):
        EngineActor()


def test_role_engines_local_sharing():
    small = ModelConfig(engine="echo", model="m1")
    other = ModelConfig(engine="echo", model="m2")
    shared = build_role_engines(
        ModelsConfig(prompt_model=small, target_model=small, reward_model=other),
        local=True,
        engine_builder=fake_builder,
    )
    assert set(shared) == {"prompt_model", "target_model", "reward_model", "optimizer_model"}
    assert shared["prompt_model"] is shared["target_model"]
    assert shared["reward_model"] is not shared["prompt_model"]
    assert shared["optimizer_model"] is shared["reward_model"]  # optimizer falls back to reward
    assert shared["reward_model"].tag == "m2"
    assert len(shared.unique()) == 2

    separate = build_role_engines(
        ModelsConfig(prompt_model=small, target_model=small, reward_model=small, share_engines=False),
        local=True,
        engine_builder=fake_builder,
    )
    assert len({id(e) for e in separate.values()}) == 4


def test_plan_pools_numbers_bundles():
    a = ModelConfig(engine="echo", model="a", num_actors=2, num_cpus=0.25)
    b = ModelConfig(engine="echo", model="b", num_actors=1, num_cpus=0, num_gpus=1)
    plans = plan_pools(ModelsConfig(prompt_model=a, target_model=a, reward_model=b))
    assert [p.roles for p in plans] == [["prompt_model", "target_model"], ["reward_model", "optimizer_model"]]
    assert [p.bundle_indices for p in plans] == [[0, 1], [2]]
    assert bundles_for(ModelsConfig(prompt_model=a, target_model=a, reward_model=b)) == [
        {"CPU": 0.25},
        {"CPU": 0.25},
        {"GPU": 1.0},
    ]


def test_metrics_are_a_noop_without_ray(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    m = RunMetrics()
    assert not m.enabled
    m.stage(1, "synthetic")
    m.synthetic_accuracy(1, 0.5)
    m.validation_accuracy(1, 0.25, "after_sft")
    m.usage("target_model", {"calls": 1, "requests": 4, "prompt_tokens": 10, "completion_tokens": 3})
    m.usage("target_model", Usage(calls=1, requests=1, prompt_tokens=2, completion_tokens=0))
    assert m.last["stage"] == "synthetic" and m.last["synthetic_accuracy/1"] == 0.5
    assert m.last["validation_accuracy/1/after_sft"] == 0.25
    assert m.last["usage/target_model"].as_dict()["total_tokens"] == 15
    assert m.last["usage/target_model"].requests == 5


# -- Ray -----------------------------------------------------------------------------------


@pytest.mark.ray
def test_pool_keeps_order_and_spreads_work(make_pool):
    pool = make_pool(num_actors=3)
    batch = [req(f"q{i}") for i in range(11)]
    assert texts(pool.generate(batch)) == [f"base:q{i}" for i in range(11)]
    usages = pool.usage()
    assert [u["calls"] for u in usages] == [1, 1, 1]
    assert sorted(u["requests"] for u in usages) == [3, 4, 4]
    assert len({p["pid"] for p in pool.ping()}) == 3
    # a batch smaller than the pool, and an empty one
    assert texts(pool.generate(batch[:2])) == ["base:q0", "base:q1"]
    assert pool.generate([]) == []
    assert pool.total_usage().requests == 13
    assert pool.retries == 0


@pytest.mark.ray
def test_pool_balances_by_prompt_length(make_pool):
    pool = make_pool(num_actors=2, balance="length")
    batch = [req("long " * 200)] + [req(f"q{i}") for i in range(7)]
    out = pool.generate(batch)
    assert texts(out)[1:] == [f"base:q{i}" for i in range(7)]
    assert sorted(u["requests"] for u in pool.usage()) == [1, 7]


@pytest.mark.ray
def test_process_crash_mid_batch_loses_and_duplicates_nothing(make_pool, tmp_path):
    pool = make_pool(num_actors=2)
    pids_before = [p["pid"] for p in pool.wait_ready(timeout_s=60)]
    batch = [req(f"q{i}") for i in range(8)]
    batch[5] = req("CRASH-5")  # second half -> the second sub-batch's actor dies with os._exit(1)
    out = pool.generate(batch)
    assert texts(out) == [f"base:{r.messages[-1]['content']}" for r in batch]
    assert pool.retries == 1
    crashed = next(i for i in range(2) if int((tmp_path / "CRASH-5").read_text()) == pids_before[i])
    info = wait_restarted(pool.actors[crashed], pids_before[crashed])
    assert info["pid"] != pids_before[crashed]
    # the engines together served every row exactly once (the crashed try never counted)
    assert pool.total_usage().requests == 8
    assert pool.live_actors() == [0, 1]


@pytest.mark.ray
def test_actor_killed_mid_batch(make_pool, tmp_path):
    pool = make_pool(num_actors=2)
    pids = [p["pid"] for p in pool.wait_ready(timeout_s=60)]
    batch = [req("BLOCK-0")] + [req(f"q{i}") for i in range(1, 6)]
    result: dict[str, list] = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", pool.generate(batch)))
    worker.start()
    wait_for(tmp_path / "BLOCK-0")
    blocked_pid = int((tmp_path / "BLOCK-0").read_text())
    victim = pids.index(blocked_pid)
    ray.kill(pool.actors[victim], no_restart=False)
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert texts(result["out"]) == [f"base:{r.messages[-1]['content']}" for r in batch]
    assert pool.retries == 1
    wait_restarted(pool.actors[victim], blocked_pid)


@pytest.mark.ray
def test_engine_error_is_retried_and_attempts_are_bounded(make_pool):
    pool = make_pool(num_actors=2, max_attempts=2)
    batch = [req("q0"), req("FAIL-1"), req("q2"), req("q3")]
    assert texts(pool.generate(batch)) == ["base:q0", "base:FAIL-1", "base:q2", "base:q3"]
    assert pool.retries == 1
    assert pool.total_usage().requests == 4
    with pytest.raises(EnginePoolError, match="failed 2 times"):
        pool.generate([req("ALWAYS"), req("q")])
    assert pool.retries == 2


@pytest.mark.ray
def test_adapters_reach_all_actors_and_survive_restart(make_pool):
    pool = make_pool(num_actors=2)
    pool.load_adapter("pi-1", "/adapters/pi-1")
    assert [p["adapters"] for p in pool.ping()] == [["pi-1"], ["pi-1"]]
    assert pool.adapters() == {"pi-1": "/adapters/pi-1"}

    old_pid = pool.ping()[0]["pid"]
    ray.kill(pool.actors[0], no_restart=False)
    fresh = wait_restarted(pool.actors[0], old_pid)
    assert fresh["adapters"] == []  # the restarted process starts empty ...
    out = pool.generate([req(f"q{i}", adapter="pi-1") for i in range(4)])
    assert texts(out) == [f"pi-1:q{i}" for i in range(4)]
    assert pool.retries == 0  # ... and got the adapter before serving, no failed try
    assert [p["adapters"] for p in pool.ping()] == [["pi-1"], ["pi-1"]]

    pool.unload_adapter("pi-1")
    assert [p["adapters"] for p in pool.ping()] == [[], []]
    with pytest.raises(AdapterNotFoundError):
        pool.generate([req("q", adapter="pi-1")])
    assert pool.retries == 0  # not retried: asking again cannot help


def broken_engine() -> FakeEngine:
    raise OSError("weights not found")


@pytest.mark.ray
def test_actors_that_cannot_build_their_engine_fail_fast(make_pool):
    pool = make_pool(num_actors=2, factory=broken_engine)
    with pytest.raises(EnginePoolError, match="no live actors") as info:
        pool.generate([req("a"), req("b")])
    assert "weights not found" in str(info.value.__cause__)
    assert pool.live_actors() == []


@pytest.mark.ray
def test_closed_pool_refuses_work(make_pool):
    pool = make_pool(num_actors=1)
    assert texts(pool.generate([req("x")])) == ["base:x"]
    pool.close()
    with pytest.raises(EnginePoolError, match="closed"):
        pool.generate([req("x")])


@pytest.mark.ray
def test_role_engines_as_pools_share_actors_and_placement(ray_session):
    small = ModelConfig(engine="echo", model="m1", num_actors=2, num_cpus=0.25)
    other = ModelConfig(engine="echo", model="m2", num_actors=1, num_cpus=0.25)
    engines = build_role_engines(
        ModelsConfig(prompt_model=small, target_model=small, reward_model=other), engine_builder=fake_builder
    )
    try:
        assert engines["prompt_model"] is engines["target_model"]
        assert engines["optimizer_model"] is engines["reward_model"]
        assert engines["prompt_model"] is not engines["reward_model"]
        assert isinstance(engines["prompt_model"], EnginePool)
        assert engines["prompt_model"].num_actors == 2 and engines["reward_model"].num_actors == 1
        assert engines["prompt_model"].bundle_indices == [0, 1] and engines["reward_model"].bundle_indices == [2]
        assert engines.placement_group.bundle_specs == [{"CPU": 0.25}] * 3
        assert texts(engines["target_model"].generate([req("a"), req("b"), req("c")])) == ["base:a", "base:b", "base:c"]
        assert texts(engines["reward_model"].generate([req("r")])) == ["base:r"]
    finally:
        engines.close()
    assert engines.placement_group is None
    with pytest.raises(EnginePoolError):
        engines["prompt_model"].generate([req("a")])


@pytest.mark.ray
def test_metrics_export_with_ray(ray_session):
    m = RunMetrics()
    assert m.enabled
    m.stage(0, "reward_search")
    m.stage(0, "synthetic")
    m.synthetic_accuracy(0, 0.4)
    m.validation_accuracy(0, 0.3, "reward_search")
    m.usage("reward_model", Usage(calls=2, requests=8, prompt_tokens=100, completion_tokens=40))
    assert m.last["stage"] == "synthetic" and m.last["iteration"] == 0
    assert m.last["usage/reward_model"].total_tokens == 140


@pytest.mark.ray
def test_echo_engine_through_pool(ray_session):
    pytest.importorskip("trprompt.engines.echo")
    pool = EnginePool.from_config("echo", ModelConfig(engine="echo", num_actors=2, num_cpus=0.25))
    try:
        batch = [req(f"hello {i}", adapter="pi" if i % 2 else None) for i in range(5)]
        with pytest.raises(AdapterNotFoundError):
            pool.generate(batch)
        pool.load_adapter("pi", "/adapters/pi")
        out = pool.generate(batch)
        assert texts(out) == [f"hello {i}" for i in range(5)]
        assert [r.prompt_tokens for r in out] == [2] * 5
        assert {p["model"] for p in pool.ping()} == {"smollm2-135m-instruct"}
    finally:
        pool.close()


def test_role_engines_local_with_echo():
    pytest.importorskip("trprompt.engines.echo")
    echo = ModelConfig(engine="echo")
    engines = build_role_engines(ModelsConfig(prompt_model=echo, target_model=echo, reward_model=echo), local=True)
    assert len(engines.unique()) == 1
    assert texts(engines["reward_model"].generate([req("critique me")])) == ["critique me"]
