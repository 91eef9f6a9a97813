"""The engine protocol types (trprompt/engines/base.py), EchoEngine (trprompt/engines/echo.py), and the
package's light import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trprompt.engines import AdapterNotFoundError, ChatRequest, EchoEngine, MeteredEngine, SamplingParams


def user(text: str) -> list[dict[str, str]]:
    """One user message."""
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- EchoEngine


def test_echo_defaults_to_the_last_user_message() -> None:
    eng = EchoEngine()
    msgs = [{"role": "system", "content": "sys words here"}, {"role": "user", "content": "two words"}]
    res = eng.generate([ChatRequest(msgs)])[0]
    assert res.texts == ["two words"]
    assert res.prompt_tokens == 5 and res.completion_tokens == 2
    assert res.finish_reasons == ["stop"]
    assert eng.seen == [ChatRequest(msgs)]


def test_echo_responder_n_stop_and_max_tokens() -> None:
    calls: list[int] = []

    def responder(req: ChatRequest) -> str:
        calls.append(1)
        return f"answer {len(calls)} is here STOP and more"

    eng = EchoEngine(responder)
    res = eng.generate([ChatRequest(user("q"), SamplingParams(n=3, stop=("STOP",)))])[0]
    assert res.texts == ["answer 1 is here ", "answer 2 is here ", "answer 3 is here "]
    assert res.completion_tokens == 12 and len(calls) == 3
    short = eng.generate([ChatRequest(user("q"), SamplingParams(max_tokens=2))])[0]
    assert short.texts == ["answer 4"] and short.finish_reasons == ["length"] and short.completion_tokens == 2
    assert len(eng.seen) == 2 and eng.calls == 2


def test_echo_adapters_and_metering() -> None:
    eng = EchoEngine(adapters=["pre"])
    metered = MeteredEngine(eng, role="t")
    metered.generate([ChatRequest(user("a b c"), adapter="pre")])
    with pytest.raises(AdapterNotFoundError):
        metered.generate([ChatRequest(user("x"), adapter="new")])
    metered.load_adapter("new", "/some/path")
    assert eng.loaded["new"] == "/some/path"
    metered.generate([ChatRequest(user("x"), adapter="new")])
    metered.unload_adapter("new")
    with pytest.raises(AdapterNotFoundError):
        eng.unload_adapter("new")
    assert metered.usage.requests == 2 and metered.usage.prompt_tokens == 4 and metered.usage.completion_tokens == 4


# --------------------------------------------------------------------------- package


def test_package_import_is_light() -> None:
    code = (
        "import sys, trprompt.engines as e; e.EchoEngine; "
        "print(int('torch' in sys.modules), int('openai' in sys.modules))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0"]


