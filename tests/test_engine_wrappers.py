"""Engine wrappers (trprompt/engines/wrappers.py): metering, budgets, adapter namespaces, chunking."""

from __future__ import annotations

import pytest
from test_engines_base import user

from trprompt.engines.base import ChatRequest, ChatResult
from trprompt.engines.echo import EchoEngine
from trprompt.engines.wrappers import (
    AdapterNamespace,
    Budget,
    BudgetExceededError,
    MeteredEngine,
    generate_in_chunks,
)


def test_metered_engine_counts_calls_requests_and_tokens() -> None:
    metered = MeteredEngine(EchoEngine(), role="target_model")
    assert metered.generate([]) == [] and metered.usage.calls == 0
    metered.generate([ChatRequest(user("a b")), ChatRequest(user("c"))])
    metered.generate([ChatRequest(user("d e f"))])
    u = metered.usage
    assert (u.calls, u.requests, u.prompt_tokens, u.completion_tokens, u.total_tokens) == (2, 3, 6, 6, 12)


def test_own_request_cap_refuses_before_sending() -> None:
    inner = EchoEngine()
    metered = MeteredEngine(inner, role="target_model", max_requests=3)
    assert metered.max_requests == 3 and metered.max_tokens is None
    metered.generate([ChatRequest(user("x"))] * 2)
    with pytest.raises(BudgetExceededError, match=r"target_model: request budget 3 would be exceeded \(2 spent, 2"):
        metered.generate([ChatRequest(user("y"))] * 2)
    assert len(inner.seen) == 2  # nothing of the refused call reached the engine
    metered.generate([ChatRequest(user("z"))])
    assert metered.usage.requests == 3


def test_own_token_cap_stops_once_spent() -> None:
    metered = MeteredEngine(EchoEngine(), role="reward_model", max_tokens=4)
    metered.generate([ChatRequest(user("one two three"))])  # 3 + 3 tokens: over the cap after this call
    with pytest.raises(BudgetExceededError, match="reward_model: token budget 4 spent"):
        metered.generate([ChatRequest(user("again"))])


def test_shared_budget_caps_several_roles_together() -> None:
    shared = Budget(max_requests=3)
    a = MeteredEngine(EchoEngine(), role="prompt_model", budget=shared)
    b = MeteredEngine(EchoEngine(), role="target_model", budget=shared)
    a.generate([ChatRequest(user("x"))] * 2)
    with pytest.raises(BudgetExceededError, match="target_model: request budget 3"):
        b.generate([ChatRequest(user("y"))] * 2)
    b.generate([ChatRequest(user("y"))])
    assert shared.usage.requests == 3 and a.usage.requests == 2 and b.usage.requests == 1


def test_adapter_namespace_keeps_users_of_one_engine_apart() -> None:
    inner = EchoEngine(lambda r: r.adapter or "base")
    a, b = AdapterNamespace(inner, "tA__"), AdapterNamespace(inner, "tB__")
    a.load_adapter("iter1", "/a/iter_1")
    b.load_adapter("iter1", "/b/iter_1")
    assert inner.loaded == {"tA__iter1": "/a/iter_1", "tB__iter1": "/b/iter_1"}
    assert a.full_id("iter1") == "tA__iter1" and a.full_id(None) is None
    out = a.generate([ChatRequest(user("hi"), adapter="iter1"), ChatRequest(user("hi"))])
    assert [r.text for r in out] == ["tA__iter1", "base"]
    b.unload_adapter("iter1")
    assert "tB__iter1" not in inner.loaded and b.loaded == {}
    a.release()
    assert inner.loaded == {} and a.loaded == {}


def test_wrappers_stack() -> None:
    inner = EchoEngine(lambda r: r.adapter or "base")
    metered = MeteredEngine(AdapterNamespace(inner, "m_"), role="prompt_model")
    metered.load_adapter("iter2", "/p")
    assert metered.generate([ChatRequest(user("q"), adapter="iter2")])[0].text == "m_iter2"
    assert metered.usage.requests == 1


def test_generate_in_chunks_keeps_order_and_checks_counts() -> None:
    inner = EchoEngine()
    reqs = [ChatRequest(user(f"q{i}")) for i in range(7)]
    out = generate_in_chunks(inner, reqs, chunk_size=3, desc=None)
    assert [r.text for r in out] == [f"q{i}" for i in range(7)] and inner.calls == 3

    class Short:
        def generate(self, requests: list[ChatRequest]) -> list[ChatResult]:
            return [ChatResult(["x"], 1, 1)]

    with pytest.raises(RuntimeError, match="1 results for 2 requests"):
        generate_in_chunks(Short(), reqs[:2], chunk_size=2)
