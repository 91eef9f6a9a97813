"""bench/reward_search.py's roofline: the least time an engine's counted work could take on a machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_reward_search", ROOT / "bench" / "reward_search.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# one layer: q 4x4, k 4x2, v 4x2, o 4x4, gate/up 4x8, down 8x4 = 144 weights; LM head 4x10 = 40
CONFIG = SimpleNamespace(hidden_size=4, intermediate_size=8, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=2, num_hidden_layers=1, vocab_size=10)
# 90 prefill positions (no logits) + 10 decoding steps of 2 rows (20 positions, 20 logit rows)
STATS = {"forward_tokens": 110, "logit_rows": 20, "decode_steps": 10, "decode_rows": 20,
         "decode_kv_positions": 1000}


def test_decoding_bound_by_memory_reads(bench) -> None:  # type: ignore[no-untyped-def]
    # 2-byte weights: 184 weights = 368 bytes a step; a cached position: 2 (k, v) x 1 layer x 1 head x 2 dims x 2 bytes
    r = bench.roofline(CONFIG, STATS, 2, peak=1e-5, bandwidth=1e-5, wall_s=7.52)
    assert r["weight_mb"] == pytest.approx(368e-6)
    assert r["decode_read_gb"] == pytest.approx((10 * 368 + 1000 * 8) / 1e9)
    assert r["prefill_floor_s"] == pytest.approx(2 * 90 * 144 / 1e9 / 1e-5)  # 2.592 s
    assert r["decode_floor_s"] == pytest.approx(11680 / 1e9 / 1e-5)  # reads (1.168 s) > matmuls (0.736 s)
    total = (2 * 110 * 144 + 2 * 20 * 40) / 1e9
    assert r["best_fraction_of_peak"] == pytest.approx(total / (2.592 + 1.168) / 1e-5)
    assert r["share_of_roofline"] == pytest.approx(0.5)  # 3.76 s of 7.52


def test_decoding_bound_by_matmuls_when_memory_is_fast(bench) -> None:  # type: ignore[no-untyped-def]
    r = bench.roofline(CONFIG, STATS, 2, peak=1e-5, bandwidth=1e-3)
    assert r["decode_floor_s"] == pytest.approx((2 * 20 * 144 + 2 * 20 * 40) / 1e9 / 1e-5)  # 0.736 s
    assert "share_of_roofline" not in r
    assert r["best_fraction_of_peak"] == pytest.approx(1.0)  # every FLOP at the peak: the whole peak


def test_wider_weights_and_longer_caches_lower_the_ceiling(bench) -> None:  # type: ignore[no-untyped-def]
    narrow = bench.roofline(CONFIG, STATS, 2, peak=1e-5, bandwidth=1e-5)
    wide = bench.roofline(CONFIG, STATS, 4, peak=1e-5, bandwidth=1e-5)
    longer = bench.roofline(CONFIG, {**STATS, "decode_kv_positions": 4000}, 2, peak=1e-5, bandwidth=1e-5)
    assert wide["best_fraction_of_peak"] < narrow["best_fraction_of_peak"]
    assert longer["decode_floor_s"] > narrow["decode_floor_s"]


def test_read_bandwidth_is_a_positive_rate(bench) -> None:  # type: ignore[no-untyped-def]
    assert bench.read_bandwidth(megabytes=8, seconds=0.05) > 0.1
