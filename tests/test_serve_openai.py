"""The OpenAI-compatible routes (cluster/serve/openai_compat.py) with the official ``openai`` client."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_fixtures import API_KEY, REWARD_A, get_info


def test_request_schema_takes_the_last_user_message() -> None:
    from cluster.serve.openai_compat import ChatCompletionRequest, _pieces
    from trprompt.engines.base import SamplingParams

    req = ChatCompletionRequest.model_validate({"model": "x", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "What is "},
                                                                             {"type": "text", "text": "2+2?"}]}],
        "max_tokens": 5000, "temperature": 0.5, "stop": ["\n\n"]})
    assert req.question() == "What is 2+2?"
    sp = req.target_sampling(SamplingParams(temperature=0.0, max_tokens=256, seed=0))
    assert sp.max_tokens == 256 and sp.temperature == 0.5 and sp.stop == ("\n\n",)  # capped at the run's limit
    with pytest.raises(ValueError):
        only_system = {"model": "x", "messages": [{"role": "system", "content": "hi"}]}
        ChatCompletionRequest.model_validate(only_system).question()
    text = "The answer is 4 because two plus two makes four, which is the final answer."
    assert "".join(_pieces(text)) == text and len(_pieces(text)) > 1


@pytest.fixture(scope="module")
def oai(serve_url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{serve_url}/v1", api_key="not-needed-here", max_retries=0, timeout=30.0)


@pytest.mark.ray
def test_models_and_a_completion(oai: Any, serve_client: httpx.Client) -> None:
    models = oai.models.list()
    ids = [m.id for m in models.data]
    assert ids == [get_info(serve_client)["model_id"]] and ids[0].startswith("trprompt-run-a")
    q = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    before = get_info(serve_client)["stats"]
    r = oai.chat.completions.create(model=ids[0], messages=[{"role": "system", "content": "You are helpful."},
                                                            {"role": "user", "content": q}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == ids[0]
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    extra = r.model_extra["trprompt"]
    # echo engines: Π's instruction carries q and t*; the target's answer is q + instruction
    assert q in extra["instruction"] and REWARD_A in extra["instruction"]
    assert choice.message.content.startswith(q) and extra["instruction"] in choice.message.content
    by = extra["usage_by_model"]
    assert r.usage.prompt_tokens == by["prompt_model"]["prompt_tokens"] + by["target_model"]["prompt_tokens"]
    completion = by["prompt_model"]["completion_tokens"] + by["target_model"]["completion_tokens"]
    assert r.usage.completion_tokens == completion
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
    after = get_info(serve_client)["stats"]
    assert after["target_model"]["requests"] == before["target_model"]["requests"] + 1
    # any model name works (an app only changes its base URL)
    r2 = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": q}])
    assert r2.choices[0].message.content == choice.message.content  # deterministic echo engines


@pytest.mark.ray
def test_async_client_requests_are_batched(serve_url: str, serve_client: httpx.Client) -> None:
    from openai import AsyncOpenAI

    async def run() -> list[Any]:
        client = AsyncOpenAI(base_url=f"{serve_url}/v1", api_key="x", max_retries=0, timeout=30.0)
        try:
            return await asyncio.gather(*(client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"Async question {i}: 2 * {i}?"}])
                for i in range(8)))
        finally:
            await client.close()

    before = get_info(serve_client)["stats"]["prompt_model"]
    results = asyncio.run(run())
    after = get_info(serve_client)["stats"]["prompt_model"]
    for i, r in enumerate(results):
        assert f"Async question {i}: 2 * {i}?" in r.choices[0].message.content
    assert after["requests"] - before["requests"] == 8
    assert after["engine_calls"] - before["engine_calls"] <= 4  # merged, as for /v1/prompt


@pytest.mark.ray
def test_streaming(oai: Any) -> None:
    q = "Stream this: what is 12 divided by 4?"
    full = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": q}])
    chunks = list(oai.chat.completions.create(model="m", messages=[{"role": "user", "content": q}], stream=True,
                                              stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and len(chunks) > 4
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert REWARD_A in chunks[0].model_extra["trprompt"]["instruction"]

    async def astream() -> str:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=str(oai.base_url), api_key="x", max_retries=0)
        try:
            stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": q}],
                                                          stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        finally:
            await client.close()

    assert asyncio.run(astream()) == text


@pytest.mark.ray
def test_errors_have_openai_shape(oai: Any, serve_url: str) -> None:
    import openai

    ok = [{"role": "user", "content": "2 + 2?"}]
    cases: list[tuple[dict[str, Any], type[Exception], str | None]] = [
        ({"messages": []}, openai.BadRequestError, None),
        ({"messages": [{"role": "system", "content": "only a system message"}]}, openai.BadRequestError, "messages"),
        ({"messages": [{"role": "user", "content": "\u200b\u200b"}]}, openai.BadRequestError, "messages"),
        ({"messages": [{"role": "user", "content": "y" * 5000}]}, openai.UnprocessableEntityError, "messages"),
        ({"messages": ok, "n": 2}, openai.BadRequestError, None),
        ({"messages": ok, "temperature": 7}, openai.BadRequestError, None),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, openai.BadRequestError, None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         openai.BadRequestError, None),
        ({"messages": ok, "extra_body": {"not_a_field": 1}}, openai.BadRequestError, None),
    ]
    for kwargs, exc_type, param in cases:
        with pytest.raises(exc_type) as e:
            oai.chat.completions.create(model="m", **kwargs)
        err = e.value.body
        assert isinstance(err, dict) and err["type"] == "invalid_request_error" and err["message"], err
        if param:
            assert err["param"] == param, err
    r = httpx.post(f"{serve_url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{serve_url}/v1/chat/completions").json()["error"]["type"] == "invalid_request_error"


@pytest.mark.ray
def test_api_key_and_limits_apply(secure_app: dict[str, Any], serve_root: Path) -> None:
    import openai
    from openai import OpenAI

    http = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.12"))
    bad = OpenAI(base_url=f"{secure_app['url']}/v1", api_key="wrong", max_retries=0, http_client=http)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi?"}])
    assert e.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = OpenAI(base_url=f"{secure_app['url']}/v1", api_key=API_KEY, max_retries=0, http_client=http)
    r = good.chat.completions.create(model="m", messages=[{"role": "user", "content": "Secure 1 + 1?"}])
    assert REWARD_A in r.model_extra["trprompt"]["instruction"]
    assert str(serve_root) not in r.model_dump_json()
    codes = []
    for _ in range(30):  # the same per-client rate limit: 429 -> openai.RateLimitError
        try:
            good.models.list()
            codes.append(200)
        except openai.RateLimitError as err:
            codes.append(429)
            assert err.response.headers.get("Retry-After")
    assert 429 in codes
