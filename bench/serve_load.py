"""Load test of the Serve endpoint: batched vs unbatched prompt model, same run, one process.

For each arm it deploys ``cluster.serve.app:build_app`` (``/v1/prompt`` only, no target
model), lets ``--concurrency`` closed-loop clients (asyncio + httpx, loopback only) send
distinct questions for ``--warmup`` seconds, then measures for ``--duration`` seconds:
completed requests per second, latency percentiles (of the requests that finished inside
the window), completion tokens per second, and how many engine calls served them.

Without ``--run-dir`` it fabricates a run of the CPU default prompt model
(``smollm2-135m-instruct`` from the registry, no adapter, default t*) in a temporary folder.

    python bench/serve_load.py --duration 20 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=None, help="run to serve (default: fabricate a base SmolLM2 run)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="prompt model of the fabricated run")
    p.add_argument("--engine", default="hf", choices=["hf", "echo"],
                   help="engine of the fabricated run (echo: no model, measures the serving path alone)")
    p.add_argument("--max-tokens", type=int, default=48, help="prompt_max_tokens of the fabricated run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the fabricated run's engine (1 is best on a busy machine)")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per arm")
    p.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds per arm before measuring")
    p.add_argument("--max-batch-size", type=int, default=32, help="@serve.batch max_batch_size (batched arm)")
    p.add_argument("--batch-wait-ms", type=float, default=250.0, help="@serve.batch wait timeout (batched arm)")
    p.add_argument("--arms", default="batched,unbatched", help="comma-separated arms to run, in order")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved for the model replica")
    p.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (0: a free one)")
    p.add_argument("--kill-at", type=float, default=None, metavar="S",
                   help="kill the PromptModel replica (ray.kill) S seconds into the measured window of each arm, "
                   "and report failed requests and latency over the whole window (e.g. --arms batched "
                   "--concurrency 16 --duration 75 --kill-at 11)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to attach to (default: RAY_ADDRESS if set, else start a new local instance)")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _questions(n: int = 400) -> list[str]:
    try:
        from trprompt.data import load_split

        qs = [p.question for p in load_split("gsm8k", "test", seed=0, limit=n)]
        if qs:
            return qs
    except Exception as e:  # the bench works without the dataset files too
        print(f"(gsm8k questions unavailable: {e}; using synthetic ones)")
    return [f"A shop sells {i} pens at {i % 7 + 2} dollars each. How much do they cost in total?" for i in range(n)]


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


async def _kill_prompt_replica(app: str, after_s: float) -> dict[str, Any]:
    """Kill one live PromptModel replica of ``app`` after ``after_s`` seconds (no restart of that actor)."""
    import ray

    await asyncio.sleep(after_s)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"{app}#PromptModel#" in a["name"]]
    if not names:
        return {"killed": None}
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    print(f"killed replica {names[0]} at {after_s:.0f} s", flush=True)
    return {"killed": names[0], "killed_at_s": after_s}


async def _load(url: str, questions: list[str], concurrency: int, warmup: float, duration: float,
                kill: tuple[str, float] | None = None) -> dict[str, Any]:
    import httpx

    t_start = time.perf_counter() + warmup
    t_end = t_start + duration
    latencies: list[float] = []
    all_latencies: list[float] = []
    tokens = 0
    errors = 0
    failures: dict[str, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:

        async def worker(w: int) -> None:
            nonlocal tokens, errors
            i = w
            while time.perf_counter() < t_end:
                q = questions[i % len(questions)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/prompt", json={"question": q})
                    ok = r.status_code == 200
                    why = str(r.status_code)
                except httpx.HTTPError as e:
                    ok, why = False, type(e).__name__
                t1 = time.perf_counter()
                if t_start <= t1 <= t_end:  # count what finished inside the measured window
                    all_latencies.append(t1 - t0)
                    if ok:
                        latencies.append(t1 - t0)
                        tokens += r.json()["tokens"]["completion"]
                    else:
                        errors += 1
                        failures[why] = failures.get(why, 0) + 1

        tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        killer = asyncio.create_task(_kill_prompt_replica(kill[0], warmup + kill[1])) if kill else None
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        for t in tasks:  # don't wait for the queued tail: it finishes after the window and is not counted
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        kill_info = await killer if killer is not None else {}
    return {
        **kill_info,
        "completed": len(latencies),
        "errors": errors,
        "failures_by_status": failures,
        "latency_p99_all_s": _pct(all_latencies, 99),
        "latency_max_all_s": max(all_latencies, default=float("nan")),
        "requests_per_s": len(latencies) / duration,
        "completion_tokens_per_s": tokens / duration,
        "latency_p50_s": _pct(latencies, 50),
        "latency_p95_s": _pct(latencies, 95),
        "latency_p99_s": _pct(latencies, 99),
        "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
    }


def _stats(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{url}/v1/info", timeout=60.0).json()["stats"]["prompt_model"]


def run_arm(name: str, batching: bool, run_dir: str, base: str, args: argparse.Namespace,
            questions: list[str]) -> dict[str, Any]:
    from ray import serve

    from cluster.serve.app import build_app

    app = build_app({"run_dir": run_dir, "with_target": False, "batching": batching,
                     "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_ms / 1000,
                     "num_cpus": args.num_cpus, "request_timeout_s": 600.0, "enable_admin": False,
                     "rate_limit_per_s": 0, "max_pending_requests": max(256, 4 * args.concurrency)})
    t0 = time.perf_counter()
    serve.run(app, name=f"bench-{name}", route_prefix=f"/{name}", blocking=False)
    url = f"{base}/{name}"
    print(f"[{name}] deployed in {time.perf_counter() - t0:.1f} s; warming up {args.warmup:.0f} s, "
          f"measuring {args.duration:.0f} s with {args.concurrency} clients", flush=True)
    before = _stats(url)
    kill = (f"bench-{name}", args.kill_at) if args.kill_at is not None else None
    res = asyncio.run(_load(url, questions, args.concurrency, args.warmup, args.duration, kill))
    after = _stats(url)
    if res.get("killed"):  # the counters are the restarted replica's, counted from its start
        before = {"engine_calls": 0, "requests": 0, "batch_sizes": {}}
    calls = after["engine_calls"] - before["engine_calls"]
    served = after["requests"] - before["requests"]
    sizes = {k: v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    res.update(arm=name, batching=batching, engine_calls=calls,
               mean_batch_size=served / calls if calls else float("nan"),
               batch_sizes={k: v for k, v in sizes.items() if v})
    serve.delete(f"bench-{name}")
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from cluster.serve.run_spec import write_base_run

    tmp = None
    run_dir = args.run_dir
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="trprompt-bench-")
        run_dir = str(write_base_run(
            Path(tmp.name) / "base-run",
            {"model": args.model if args.engine == "hf" else "echo-model", "engine": args.engine,
             "threads": args.threads, "num_cpus": args.num_cpus,
             "max_batch_size": max(32, args.max_batch_size)},
            extra_config={"generation": {"prompt_max_tokens": args.max_tokens}},
        ))
        print(f"fabricated base run (no adapter, default t*) in {run_dir}")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if any(a not in ("batched", "unbatched") for a in arms):
        print("--arms takes batched and/or unbatched", file=sys.stderr)
        return 2

    port = args.port or _free_port()
    from cluster.runtime import init_ray

    init_ray(args.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    questions = _questions()
    results = []
    try:
        for arm in arms:
            results.append(run_arm(arm, arm == "batched", run_dir, f"http://127.0.0.1:{port}", args, questions))
    finally:
        serve.shutdown()
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()

    print()
    print(f"{'arm':<10} {'done':>5} {'err':>4} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} "
          f"{'calls':>6} {'batch':>6}")
    for r in results:
        print(f"{r['arm']:<10} {r['completed']:>5} {r['errors']:>4} {r['requests_per_s']:>7.2f} "
              f"{r['completion_tokens_per_s']:>7.1f} {r['latency_p50_s']:>7.2f} {r['latency_p95_s']:>7.2f} "
              f"{r['latency_p99_s']:>7.2f} {r['engine_calls']:>6} {r['mean_batch_size']:>6.1f}")
    for r in results:
        print(f"{r['arm']}: batch sizes (size: engine calls, warmup included) {r['batch_sizes']}")
        if r.get("killed"):
            print(f"{r['arm']}: replica killed at {r['killed_at_s']:.0f} s into the run: {r['errors']} failed "
                  f"requests {r['failures_by_status']}, p99 latency {r['latency_p99_all_s']:.2f} s, "
                  f"max {r['latency_max_all_s']:.2f} s")
    by = {r["arm"]: r for r in results}
    summary: dict[str, Any] = {"config": vars(args), "results": results}
    if "batched" in by and "unbatched" in by and by["unbatched"]["requests_per_s"] > 0:
        speedup = by["batched"]["requests_per_s"] / by["unbatched"]["requests_per_s"]
        summary["speedup"] = speedup
        print(f"\nbatched / unbatched throughput: {speedup:.1f}x at {args.concurrency} concurrent clients")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
