"""HFEngine (trprompt/engines/hf.py) on a tiny random Llama: batching, sampling, KV cache, prefixes,
LoRA adapters; the engine factory; the real SmolLM2 (slow)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from trprompt.engines import (
    AdapterNotFoundError,
    ChatRequest,
    EchoEngine,
    Engine,
    SamplingParams,
)

QUESTIONS = [
    "hi",
    "What is 2 + 3? Answer with a number.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "ok then",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she "
    "earn? Think step by step and explain every step of the computation in detail, please, so I can follow.",
    "Count: one two three",
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def greedy(text: str, max_tokens: int = 16, **kw: Any) -> ChatRequest:
    return ChatRequest(user(text), SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw))


def feedback_requests(rewards: list[str], questions: list[str], max_tokens: int = 6) -> list[ChatRequest]:
    """Greedy Π-like requests: each reward text, then each question (rows under one reward share a head)."""
    return [greedy(f"Feedback:\n{r}\nProblem:\n{q}", max_tokens=max_tokens) for r in rewards for q in questions]


# --------------------------------------------------------------------------- tiny model fixtures


@pytest.fixture(scope="session")
def chaotic_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with its weights re-drawn at a larger scale.

    At the default init scale a 64-wide random model emits the same token forever,
    which would make "batched equals unbatched" vacuous; with std 0.3 its greedy
    output is prompt-dependent gibberish with clear top-1 margins.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trprompt.testing import make_tiny_llama

    base = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    out = tmp_path_factory.mktemp("chaotic") / "model"
    model = AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engine(chaotic_model_dir: Path):
    from trprompt.engines.hf import HFEngine

    return HFEngine(str(chaotic_model_dir), max_batch_size=32)


def make_lora(model_dir: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    b_weights = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert b_weights and all(p.abs().sum() > 0 for p in b_weights)  # a no-op adapter would prove nothing
    peft_model.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- HFEngine


def test_engines_satisfy_the_protocol(engine) -> None:
    from trprompt.engines.openai_engine import OpenAIEngine

    assert isinstance(engine, Engine)
    assert isinstance(EchoEngine(), Engine)
    oe = OpenAIEngine("m", "http://127.0.0.1:9/v1")
    assert isinstance(oe, Engine)
    oe.close()


def test_batched_greedy_equals_unbatched(engine) -> None:
    reqs = [greedy(q, max_tokens=16) for q in QUESTIONS]
    batched = engine.generate(reqs)
    solo = [engine.generate([r])[0] for r in reqs]
    assert len({r.prompt_tokens for r in batched}) >= 5  # really mixed lengths, so real left padding
    for b, s in zip(batched, solo, strict=True):
        assert b.texts == s.texts
        assert b.prompt_tokens == s.prompt_tokens
        assert b.completion_tokens == s.completion_tokens
        assert b.finish_reasons == s.finish_reasons
    assert len({r.text for r in batched}) == len(reqs)  # outputs depend on the prompt


def test_greedy_matches_transformers_generate(engine) -> None:
    import torch

    for q in QUESTIONS[:3]:
        ids = torch.tensor([engine.render_prompt_ids(user(q))])
        ref = engine._base.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=2
        )
        new = ref[0, ids.shape[1] :].tolist()
        res = engine.generate([greedy(q, max_tokens=12)])[0]
        assert res.text == engine.tokenizer.decode(new, skip_special_tokens=True)
        assert res.completion_tokens == len(new)


def test_order_restored_across_chunks(chaotic_model_dir: Path) -> None:
    from trprompt.engines.hf import HFEngine

    eng = HFEngine(str(chaotic_model_dir), max_batch_size=2)
    # Distinct max_tokens make every result identifiable after the length sort.
    reqs = [greedy(q, max_tokens=3 + i) for i, q in enumerate(QUESTIONS + ["a b", "x" * 40])]
    out = eng.generate(reqs)
    assert len(out) == len(reqs)
    for i, (req, res) in enumerate(zip(reqs, out, strict=True)):
        assert res.prompt_tokens == len(eng.render_prompt_ids(req.messages))
        if res.finish_reasons == ["length"]:
            assert res.completion_tokens == 3 + i
        assert res.texts == eng.generate([req])[0].texts


def test_prompt_token_count_matches_the_tokenizer(engine) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[2]}]
    enc = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = engine.render_prompt_ids(msgs)
    assert ids == list(enc["input_ids"])
    assert engine.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    res = engine.generate([ChatRequest(msgs, SamplingParams(max_tokens=4))])[0]
    assert res.prompt_tokens == len(ids)


def test_max_tokens_is_respected(engine) -> None:
    for m in (1, 3, 7):
        res = engine.generate([greedy(QUESTIONS[1], max_tokens=m)])[0]
        assert 1 <= res.completion_tokens <= m
        if res.finish_reasons == ["length"]:
            assert res.completion_tokens == m


def test_n_completions(engine) -> None:
    sampled = ChatRequest(user(QUESTIONS[0]), SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=5))
    res = engine.generate([sampled, greedy(QUESTIONS[1], max_tokens=6, n=2)])
    assert len(res[0].texts) == 3 and len(res[0].finish_reasons) == 3
    assert len(set(res[0].texts)) >= 2  # copies get different seeds
    assert len(res[1].texts) == 2 and res[1].texts[0] == res[1].texts[1]  # greedy copies agree
    assert res[1].completion_tokens == 12  # summed over both copies (6 each unless EOS)


def test_seed_reproducible_and_independent_of_batch(engine) -> None:
    def req(seed: int) -> ChatRequest:
        return ChatRequest(user(QUESTIONS[1]), SamplingParams(temperature=1.0, max_tokens=10, seed=seed))

    a = engine.generate([req(11)])[0]
    b = engine.generate([req(11)])[0]
    c = engine.generate([req(12)])[0]
    in_batch = engine.generate([greedy(QUESTIONS[2]), req(11), greedy(QUESTIONS[4])])[1]
    assert a.texts == b.texts == in_batch.texts
    assert c.texts != a.texts
    assert a.text != engine.generate([greedy(QUESTIONS[1], max_tokens=10)])[0].text  # really sampled


def test_tiny_top_p_is_greedy(engine) -> None:
    nucleus = ChatRequest(user(QUESTIONS[2]), SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10, seed=3))
    assert engine.generate([nucleus])[0].text == engine.generate([greedy(QUESTIONS[2], max_tokens=10)])[0].text


def test_stop_string_truncates_and_ends_early(engine) -> None:
    full = engine.generate([greedy(QUESTIONS[2], max_tokens=24)])[0]
    text = full.text
    stop = next(
        text[i : i + 3] for i in range(4, len(text) - 3) if text[i : i + 3].strip() and text[i : i + 3] not in text[:i]
    )
    res = engine.generate([greedy(QUESTIONS[2], max_tokens=24, stop=("@@never@@", stop))])[0]
    assert res.text == text[: text.index(stop)]
    assert res.finish_reasons == ["stop"]
    assert res.completion_tokens < full.completion_tokens


def test_eos_stops_one_row_while_the_batch_continues(chaotic_model_dir: Path) -> None:
    import torch

    from trprompt.engines.hf import HFEngine

    eng = HFEngine(str(chaotic_model_dir))
    reqs = [greedy(q, max_tokens=10) for q in QUESTIONS[:3]]
    before = eng.generate(reqs)

    def ref_ids(q: str) -> list[int]:
        ids = torch.tensor([eng.render_prompt_ids(user(q))])
        out = eng._base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        return out[0, ids.shape[1] :].tolist()

    row0, others = ref_ids(QUESTIONS[0]), [ref_ids(q) for q in QUESTIONS[1:3]]
    step = next(i for i in range(3, 8) if row0[i] not in row0[:i] and all(row0[i] not in o for o in others))
    eng.eos_token_ids = eng.eos_token_ids | {row0[step]}  # pretend that token is an end-of-sequence
    after = eng.generate(reqs)
    assert after[0].finish_reasons == ["stop"]
    assert after[0].completion_tokens == step + 1  # the EOS counts
    assert after[0].text == eng.tokenizer.decode(row0[:step], skip_special_tokens=True)
    assert [r.texts for r in after[1:]] == [r.texts for r in before[1:]]
    assert [r.completion_tokens for r in after[1:]] == [10, 10]


def test_preallocated_kv_cache_matches_the_stock_cache(chaotic_model_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """In-place KV buffers (also when they must grow, and when rows leave) give the stock cache's tokens."""
    from transformers import DynamicCache

    import trprompt.engines.hf as hf

    eng = hf.HFEngine(str(chaotic_model_dir), max_batch_size=8)
    reqs = [greedy(q, max_tokens=4 + 3 * i) for i, q in enumerate(QUESTIONS)]  # rows finish at different steps
    fast = eng.generate(reqs)
    cache = hf._preallocated_cache(eng._base.config, 8)
    assert cache.layers and all(isinstance(layer, hf._PreallocatedLayer) for layer in cache.layers)

    real = hf._preallocated_cache
    monkeypatch.setattr(hf, "_preallocated_cache", lambda config, capacity: real(config, 3))  # forces growth
    grown = eng.generate(reqs)
    monkeypatch.setattr(hf, "_preallocated_cache", lambda config, capacity: DynamicCache(config=config))
    stock = eng.generate(reqs)
    assert [r.texts for r in fast] == [r.texts for r in stock] == [r.texts for r in grown]
    assert [r.completion_tokens for r in fast] == [4 + 3 * i for i in range(len(QUESTIONS))]


def test_preallocated_padding_is_finite_even_over_garbage() -> None:
    """Masked padding still enters attention as 0 * value, so it must never hold NaN left in memory."""
    import torch

    from trprompt.engines.hf import _PreallocatedLayer

    layer = _PreallocatedLayer(capacity=2)  # too small: the first place() grows the buffers
    layer.place(0, 2, torch.ones(2, 6, 4), torch.ones(2, 6, 4), start=0)
    assert layer._k is not None and layer._v is not None
    layer._k[1].fill_(float("nan"))  # what an uninitialised allocation may hold
    layer._v[1].fill_(float("nan"))
    short = torch.full((2, 3, 4), 2.0)
    layer.place(1, 2, short, short, start=3)  # right-aligned with the longer row
    assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
    assert layer.keys[1, :, :3].eq(0).all() and layer.values[1, :, :3].eq(0).all()  # the padding
    assert layer.keys[1, :, 3:6].eq(2.0).all()
    assert layer.keys[0].eq(1.0).all()  # the other row is untouched


def test_shared_prefix_len() -> None:
    from trprompt.engines.hf import _shared_prefix_len

    assert _shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert _shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # every prompt keeps a token of its own
    assert _shared_prefix_len([[1, 2], [3, 2]]) == 0
    assert _shared_prefix_len([[7, 8, 9], [7, 8, 9]]) == 2


def record_forward_shapes(eng: Any) -> list[tuple[int, int]]:
    """A list that receives the ``input_ids`` shape of every forward pass ``eng``'s model makes (LM head or not)."""
    shapes: list[tuple[int, int]] = []
    forward = eng._forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    eng._forward = spy
    return shapes


def test_shared_prefix_once_and_rows_prefilled_without_padding(chaotic_model_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared system prompt is prefilled once, each row's own tokens unpadded; tokens match padded prefill."""
    from transformers import DynamicCache

    import trprompt.engines.hf as hf

    system = "You are a careful assistant. " * 8
    reqs = [ChatRequest([{"role": "system", "content": system}, *user(q)],
                        SamplingParams(temperature=0.0, max_tokens=8)) for q in QUESTIONS]
    eng = hf.HFEngine(str(chaotic_model_dir), max_batch_size=16)
    shapes = record_forward_shapes(eng)
    fast = eng.generate(reqs)
    head = shapes[0][1]
    assert shapes[0][0] == 1 and head >= 40, shapes[:2]  # the system prompt alone, one row
    lengths = sorted((r.prompt_tokens for r in fast), reverse=True)  # rows run longest first
    assert shapes[1 : 1 + len(reqs)] == [(1, n - head) for n in lengths]  # then each row's own tokens, unpadded
    assert shapes[1 + len(reqs)] == (len(reqs), 1)  # then batched decoding

    eng.min_shared_prefix = 10**9
    shapes.clear()
    no_sharing = eng.generate(reqs)
    assert shapes[: len(reqs)] == [(1, n) for n in lengths]

    real = hf._preallocated_cache
    monkeypatch.setattr(hf, "_preallocated_cache",  # stock layers: the padded prefill path
                        lambda config, capacity: DynamicCache(config=config))
    eng.min_shared_prefix = 16
    shapes.clear()
    padded = eng.generate(reqs)
    assert shapes[0] == (1, head) and shapes[1] == (len(reqs), lengths[0] - head)
    monkeypatch.setattr(hf, "_preallocated_cache", real)
    assert [r.texts for r in fast] == [r.texts for r in no_sharing] == [r.texts for r in padded]
    assert [r.prompt_tokens for r in fast] == [r.prompt_tokens for r in padded]


def test_prefix_heads() -> None:
    from trprompt.engines.hf import _prefix_heads

    a1, a2 = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9]
    b1, b2 = [1, 2, 7, 7, 7, 8], [1, 2, 7, 7, 7, 9, 9]
    assert _prefix_heads([a1, b1, a2, b2], minimum=0) == [4, 5, 4, 5]  # each row's best partner
    assert _prefix_heads([a1, b1, a2, b2], minimum=5) == [0, 5, 0, 5]  # short heads are not worth a prefill
    assert _prefix_heads([[5, 6], [5, 6]], minimum=0) == [1, 1]  # copies keep one token of their own
    assert _prefix_heads([[1, 2, 3]], minimum=0) == [0]
    assert _prefix_heads([[1, 2], [3, 4]], minimum=0) == [0, 0]


def test_merge_heads() -> None:
    """Overlapping pairwise heads collapse to the common head when that prefills fewer positions."""
    from trprompt.engines.hf import _merge_heads, _prefix_heads

    template = list(range(100, 140))  # 40 tokens every prompt starts with (a template and one question)
    a, b, c = template + [1, 2, 3, 50, 51], template + [1, 2, 3, 60], template + [7, 8]
    pairwise = _prefix_heads([a, b, c], minimum=16)
    assert pairwise == [43, 43, 40]  # a and b also share three instruction tokens: two heads, both 40+ long
    assert _merge_heads([a, b, c], pairwise, minimum=16) == [40, 40, 40]  # one head, three extra tail tokens

    a1, a2 = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9]
    b1, b2 = [1, 2, 7, 7, 7, 8], [1, 2, 7, 7, 7, 9, 9]
    pairwise = _prefix_heads([a1, b1, a2, b2], minimum=0)
    assert _merge_heads([a1, b1, a2, b2], pairwise, minimum=0) == [4, 5, 4, 5]  # a 2-token common head would cost more
    assert _merge_heads([a, b, c], [43, 43, 40], minimum=41) == [43, 43, 0]  # the common head is below the minimum
    assert _merge_heads([a, c, [5] * 50], [40, 40, 0], minimum=16) == [40, 40, 0]  # rows without a head keep none
    lone = template + [9, 9]
    assert _merge_heads([a, b, lone], [43, 43, 41], minimum=41) == [43, 43, 0]  # a head of one row is not a head
    assert _merge_heads([], [], minimum=0) == []


def test_tails_under_different_heads_share_one_forward(chaotic_model_dir: Path) -> None:
    """batch_prefill: rows under two heads and a row under none prefill their own tokens in one forward."""
    import trprompt.engines.hf as hf

    eng = hf.HFEngine(str(chaotic_model_dir), max_batch_size=16, dtype="float32")
    rewards = ["Short feedback about the instruction. " * 3,
               "A much longer feedback text that says the instruction names every quantity, asks for one line per "
               "step and a final check of the number. " * 2]
    reqs = feedback_requests(rewards, QUESTIONS[1:4])
    reqs.append(greedy("A request that shares nothing with the others beyond the chat template.", max_tokens=6))
    per_row = eng.generate(reqs)  # float32: one forward per row's own tokens
    eng.batch_prefill, eng.prefill_padding = True, 10.0
    shapes = record_forward_shapes(eng)
    batched = eng.generate(reqs)
    prompts = [eng.render_prompt_ids(r.messages) for r in reqs]
    heads = hf._merge_heads(prompts, hf._prefix_heads(prompts, eng.min_shared_prefix), eng.min_shared_prefix)
    assert len({h for h in heads if h}) == 2 and heads[-1] == 0  # two heads of different lengths, one row alone
    assert shapes[0][0] == 2  # the two heads, one right-padded forward
    assert shapes[1] == (len(reqs), max(len(p) - h for p, h in zip(prompts, heads, strict=True)))  # every row's tail
    assert shapes[2] == (len(reqs), 1)  # then decoding
    assert [r.texts for r in batched] == [r.texts for r in per_row]
    eng.min_shared_prefix = 10**9  # no heads at all: the same tokens
    assert [r.texts for r in eng.generate(reqs)] == [r.texts for r in per_row]


def test_decoding_without_padding_keeps_grouped_attention(chaotic_model_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One row (no padding): decoding steps still hand SDPA the grouped layout, never ``enable_gqa`` (slow on CPU)."""
    import torch

    import trprompt.engines.hf as hf

    eng = hf.HFEngine(str(chaotic_model_dir), max_batch_size=4)
    expected = eng.generate([greedy(QUESTIONS[2], max_tokens=5)])
    groups = eng._base.config.num_attention_heads // eng._base.config.num_key_value_heads
    assert groups > 1
    calls: list[tuple[tuple[int, ...], bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((tuple(q.shape), bool(kwargs.get("enable_gqa", False))))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    got = eng.generate([greedy(QUESTIONS[2], max_tokens=5)])
    steps = [(shape, gqa) for shape, gqa in calls if shape[2] == groups]  # one query per head, grouped
    assert len(steps) == 4 * eng._base.config.num_hidden_layers  # every decoding step after the first token
    assert not any(gqa for _, gqa in calls if _[2] <= groups)
    assert got[0].texts == expected[0].texts
    mask = torch.ones(2, 7, dtype=torch.long)
    assert eng._step_mask(mask, full_attention=True).shape == (2, 1, 1, 7)
    assert eng._step_mask(mask, full_attention=False) is mask  # sliding windows need transformers' own mask


def test_rows_under_one_reward_share_one_prefill(chaotic_model_dir: Path) -> None:
    """Π requests under two candidate rewards: each reward's prefix is prefilled once, the tokens are unchanged."""
    import trprompt.engines.hf as hf

    eng = hf.HFEngine(str(chaotic_model_dir), max_batch_size=16)
    rewards = ["The instruction names every quantity and asks for a final check. " * 3,
               "The instruction is one short sentence that restates the question. " * 3]
    reqs = feedback_requests(rewards, QUESTIONS[1:])
    shapes = record_forward_shapes(eng)
    shared = eng.generate(reqs)
    heads, tails = [n for _, n in shapes[:2]], [n for _, n in shapes[2 : len(reqs) + 2]]
    assert all(rows == 1 for rows, _ in shapes[: len(reqs) + 2]) and min(heads) >= 40  # per reward, then per row
    assert sum(tails) == sum(r.prompt_tokens for r in shared) - 5 * sum(heads)  # no row re-reads its reward
    assert shapes[len(reqs) + 2] == (len(reqs), 1)  # then one batched decoding stream

    eng.min_shared_prefix = 10**9
    assert [r.texts for r in eng.generate(reqs)] == [r.texts for r in shared]


def test_concurrent_callers_get_their_own_results(engine) -> None:
    reqs = [[greedy(q, max_tokens=6)] for q in QUESTIONS[:4]]
    expected = [engine.generate(r)[0].text for r in reqs]
    got: dict[int, str] = {}

    def work(i: int) -> None:
        got[i] = engine.generate(reqs[i])[0].text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(reqs))] == expected


def test_lora_adapters(chaotic_model_dir: Path, tmp_path: Path) -> None:
    from trprompt.engines.hf import HFEngine

    eng = HFEngine(str(chaotic_model_dir), max_batch_size=3)
    q = greedy(QUESTIONS[2], max_tokens=12)
    base_text = eng.generate([q])[0].text
    with pytest.raises(AdapterNotFoundError):
        eng.generate([ChatRequest(q.messages, q.sampling, adapter="nope")])

    eng.load_adapter("a", str(make_lora(chaotic_model_dir, tmp_path / "a", seed=1)))
    eng.load_adapter("b", str(make_lora(chaotic_model_dir, tmp_path / "b", seed=2)))
    assert sorted(eng.adapters) == ["a", "b"]
    qa = ChatRequest(q.messages, q.sampling, adapter="a")
    qb = ChatRequest(q.messages, q.sampling, adapter="b")
    text_a, text_b = eng.generate([qa])[0].text, eng.generate([qb])[0].text
    assert text_a != base_text and text_b != base_text and text_a != text_b
    assert eng.generate([q])[0].text == base_text  # base requests bypass the adapters

    # One call mixing adapters (grouped internally, more rows than max_batch_size) keeps order and results.
    other = greedy(QUESTIONS[0], max_tokens=12)
    other_base = eng.generate([other])[0].text
    mixed = eng.generate([qa, q, qb, other, qa, ChatRequest(other.messages, other.sampling, adapter="b")])
    assert [r.text for r in mixed[:5]] == [text_a, base_text, text_b, other_base, text_a]
    assert mixed[5].text != other_base

    eng.unload_adapter("a")
    with pytest.raises(AdapterNotFoundError):
        eng.generate([qa])
    with pytest.raises(AdapterNotFoundError):
        eng.unload_adapter("a")
    assert eng.generate([qb])[0].text == text_b
    eng.unload_adapter("b")
    assert eng.adapters == [] and eng._peft is None
    assert eng.generate([q])[0].text == base_text

    # Loading again after everything was unloaded works, and reusing an id replaces the adapter.
    eng.load_adapter("a", str(tmp_path / "b"))
    assert eng.generate([qa])[0].text == text_b


# --------------------------------------------------------------------------- factory


def test_factory_builds_each_kind(chaotic_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trprompt.config import ModelConfig
    from trprompt.engines.factory import build_engine
    from trprompt.engines.hf import HFEngine
    from trprompt.engines.openai_engine import OpenAIEngine

    assert isinstance(build_engine(ModelConfig(engine="echo")), EchoEngine)
    oe = build_engine(ModelConfig(model="served", engine="openai", base_url="http://127.0.0.1:9/v1", max_retries=1))
    assert isinstance(oe, OpenAIEngine) and oe.model == "served" and oe.max_retries == 1
    oe.close()
    he = build_engine(ModelConfig(model=str(chaotic_model_dir), engine="hf", max_batch_size=5))
    assert isinstance(he, HFEngine) and he.max_batch_size == 5
    monkeypatch.setitem(sys.modules, "trprompt.engines.vllm_engine", None)  # make the import fail
    with pytest.raises(RuntimeError, match="gpu"):
        build_engine(ModelConfig(engine="vllm"))


# --------------------------------------------------------------------------- the real SmolLM2 (slow)


@pytest.mark.slow
def test_real_smollm2_batched_and_eos() -> None:
    from trprompt.engines.hf import HFEngine

    eng = HFEngine("smollm2-135m-instruct", max_batch_size=8)
    reqs = [
        greedy("What is 2 + 3? Answer with a number.", max_tokens=48),
        greedy("What is the capital of France?", max_tokens=48),
        greedy("Write a long poem about the sea.", max_tokens=20),
    ]
    batched = eng.generate(reqs)
    solo = [eng.generate([r])[0] for r in reqs]
    assert [r.texts for r in batched] == [r.texts for r in solo]
    assert "5" in batched[0].text and "Paris" in batched[1].text
    assert batched[0].finish_reasons == ["stop"] and batched[1].finish_reasons == ["stop"]  # hit <|im_end|>
    assert batched[2].finish_reasons == ["length"] and batched[2].completion_tokens == 20
    assert "<|im_end|>" not in batched[0].text


def test_padding_positions_are_counted_apart_from_the_real_ones(chaotic_model_dir: Path) -> None:
    """stats: computed positions minus padding = distinct heads + every row's own tokens + its decoding steps."""
    import trprompt.engines.hf as hf

    eng = hf.HFEngine(str(chaotic_model_dir), max_batch_size=16, dtype="float32")
    rewards = ["The instruction names every quantity and asks for a final check. " * 3,
               "Short feedback. " * 5]
    reqs = [*feedback_requests(rewards, QUESTIONS, max_tokens=9), greedy("Hello there", max_tokens=3)]
    prompts = [eng.render_prompt_ids(r.messages) for r in reqs]
    heads = hf._merge_heads(prompts, hf._prefix_heads(prompts, eng.min_shared_prefix), eng.min_shared_prefix)
    distinct_heads = {tuple(p[:h]) for p, h in zip(prompts, heads, strict=True) if h}
    assert len(distinct_heads) >= 2
    prefill = sum(map(len, distinct_heads)) + sum(len(p) - h for p, h in zip(prompts, heads, strict=True))
    for batch_prefill in (False, True):
        eng.batch_prefill, eng.prefill_padding = batch_prefill, 10.0
        for key in eng.stats:
            eng.stats[key] = 0
        out = eng.generate(reqs)
        decoded = sum(r.completion_tokens - 1 for r in out)  # the last token needs no forward
        real = eng.stats["forward_tokens"] - eng.stats["padding_tokens"]
        assert real == prefill + decoded, batch_prefill
        assert len({r.completion_tokens for r in out}) > 1  # rows finished at different steps: some rode along
        assert eng.stats["padding_tokens"] > 0
        if not batch_prefill:
            row_by_row = eng.stats["padding_tokens"]
    assert eng.stats["padding_tokens"] > row_by_row  # padded prefill batches add padding


def test_batched_prefill_of_rows_sharing_a_head_keeps_the_tokens(chaotic_model_dir: Path) -> None:
    """batch_prefill: each head once, then the rows under all heads in left-padded batches; same tokens as per row."""
    import trprompt.engines.hf as hf

    eng = hf.HFEngine(str(chaotic_model_dir), max_batch_size=16, dtype="float32")
    assert eng.batch_prefill is False  # float32 on a CPU: one row at a time by default
    rewards = ["The instruction names every quantity and asks for a final check. " * 3,
               "The instruction is one short sentence that restates the question. " * 3]
    reqs = feedback_requests(rewards, QUESTIONS[1:])
    per_row = eng.generate(reqs)
    eng.batch_prefill, eng.prefill_padding = True, 10.0  # any padding: one batch per head
    shapes = record_forward_shapes(eng)
    batched = eng.generate(reqs)
    heads = sorted({len(eng.render_prompt_ids(r.messages)) for r in reqs})
    assert shapes[0][0] == 2 and shapes[0][1] < heads[-1]  # both heads once, in one right-padded forward
    assert shapes[1][0] == len(reqs)  # both heads' rows in one padded batch, each row on its own head's cache
    assert shapes[2] == (len(reqs), 1)  # then batched decoding
    assert [r.texts for r in batched] == [r.texts for r in per_row]
    eng.prefill_padding = 0.0  # no padding allowed: only heads / rows of equal lengths share a forward
    assert [r.texts for r in eng.generate(reqs)] == [r.texts for r in per_row]
