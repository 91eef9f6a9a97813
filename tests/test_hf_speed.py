"""HFEngine speed work that must not change outputs: finished rows leave the batch in groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from trprompt.engines import hf
from trprompt.engines.base import ChatRequest, SamplingParams


def _requests() -> list[ChatRequest]:
    # staggered lengths so rows finish one by one
    return [ChatRequest([{"role": "user", "content": f"Count to {i} please, item {i}."}],
                        SamplingParams(max_tokens=2 + i, temperature=0.0 if i % 2 else 0.8, seed=i))
            for i in range(12)]


def test_group_compaction_keeps_outputs_and_copies_less(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    eng = hf.HFEngine(str(tiny_model_dir), dtype="float32", max_batch_size=16)
    selections: list[int] = []
    original = hf._PreallocatedLayer.batch_select_indices

    def spy(self: hf._PreallocatedLayer, indices) -> None:  # type: ignore[no-untyped-def]
        selections.append(len(indices))
        original(self, indices)

    monkeypatch.setattr(hf._PreallocatedLayer, "batch_select_indices", spy)
    layers = eng._base.config.num_hidden_layers

    eng.compact_fraction = 0.0  # the old rule: drop finished rows at once
    at_once = eng.generate(_requests())
    copies_at_once = len(selections) // layers
    selections.clear()
    eng.compact_fraction = 0.5
    grouped = eng.generate(_requests())
    copies_grouped = len(selections) // layers

    assert [r.texts for r in grouped] == [r.texts for r in at_once]
    assert [r.completion_tokens for r in grouped] == [r.completion_tokens for r in at_once]
    assert [r.finish_reasons for r in grouped] == [r.finish_reasons for r in at_once]
    assert [r.completion_tokens for r in at_once] == [2 + i for i in range(12)] or any(
        "stop" in r.finish_reasons for r in at_once)
    assert copies_at_once >= 10 and copies_grouped < copies_at_once / 2


def test_decoding_steps_count_the_kv_positions_they_read(tiny_model_dir: Path) -> None:
    """stats["decode_kv_positions"]: per decoding step, rows x cached positions (left padding included)."""
    eng = hf.HFEngine(str(tiny_model_dir), dtype="float32", max_batch_size=4)
    eng.eos_token_ids = frozenset()  # every row runs to max_tokens, so the steps are known
    texts = ["hi", "Natalia sold clips to 48 of her friends in April. How many clips?"]
    reqs = [ChatRequest([{"role": "user", "content": t}], SamplingParams(max_tokens=7)) for t in texts]
    lengths = [len(eng.render_prompt_ids(r.messages)) for r in reqs]
    assert lengths[0] < lengths[1]

    out = eng.generate(reqs[:1])  # one row: step j reads its prompt and j new tokens
    assert out[0].completion_tokens == 7 and eng.stats["decode_steps"] == 6
    assert eng.stats["decode_kv_positions"] == sum(lengths[0] + j for j in range(1, 7))

    before = eng.stats["decode_kv_positions"]
    eng.generate(reqs)  # two rows, the short one left-padded to the long one's width
    assert eng.stats["decode_kv_positions"] - before == 2 * sum(lengths[1] + j for j in range(1, 7))
