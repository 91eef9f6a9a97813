"""Run the jobs at two commits with the same seed and compare what they generate.

    git worktree add --detach /tmp/old fa43084
    python scripts/behaviour_check.py --old /tmp/old --new . --out /tmp/bc            # tiny random Llama
    python scripts/behaviour_check.py --old /tmp/old --new . --out /tmp/bc-smol --model smollm2 --jobs train

For each side it runs, with that side's own code (``PYTHONPATH`` = its tree) and from its own folder:

* ``train``: ``jobs/train.py --config configs/cpu-demo.yaml --local`` shrunk with ``--set``;
* ``serve``: ``jobs/serve.py --run-dir <the train run>`` on a random loopback port, then ``/v1/prompt`` and
  ``/v1/solve`` for a few questions (answers saved as ``serve.json``);
* ``compare``: ``jobs/compare.py --config configs/compare-svamp.yaml --local`` shrunk with ``--set``;
* ``sweep``: ``jobs/sweep.py --config configs/sweep-cpu.yaml`` shrunk with ``--set`` (Ray Tune, 2 trials).

and then compares the two sides with ``scripts/compare_runs.py`` (which maps renamed fields and moved files, see
``trprompt/run_dir.py``). ``TRPROMPT_CPU_BF16=0`` makes dtype ``auto`` resolve to float32 on both sides, and
``RAY_ADDRESS=local`` gives every job a Ray instance of its own (never another user's cluster).
Exit status 0 when every compared artifact is the same, 1 otherwise; the per-job comparison is written to
``<out>/<job>.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = ("train", "serve", "compare", "sweep")
QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "A train travels 60 miles per hour for 2 hours. How far does it go?",
    "Sara had 20 stickers and gave away 7. How many are left?",
]


def role_sets(prefix: str, model: str) -> list[str]:
    """``--set`` overrides pointing the three roles at ``model``."""
    return [f"{prefix}models.{r}.model={model}" for r in ("prompt_model", "target_model", "reward_model")]


def run_sets(prefix: str, model: str, tiny: bool, echo: bool = False) -> list[str]:
    """The shrinking overrides of a run config (cpu-demo shape: shared engines, K iterations, N, S, C).

    ``echo``: every role is the echo engine, which answers each request with its last user message, so
    every generated text *is* the request that produced it (long ``max_tokens`` keep it whole); SFT
    still trains the tiny Llama (``model``) on those texts.
    """
    sets = role_sets(prefix, model)
    if echo:
        sets += [f"{prefix}models.{r}.engine=echo" for r in ("prompt_model", "target_model", "reward_model")]
        sets += [f"{prefix}{kv}" for kv in (
            "generation.prompt_max_tokens=400", "generation.target_max_tokens=800",
            "generation.reward_max_tokens=1200", "reward_search.optimizer_max_tokens=1600",
            "sft.max_length=2048")]  # echoed instructions are long: every SFT example must fit
    if tiny:
        sets += [f"{prefix}{kv}" for kv in (
            "loop.iterations=2", "loop.synthetic_size=6",
            "dataset.val_limit=4", "dataset.test_limit=4",
            *(() if echo else ("generation.prompt_max_tokens=12", "generation.target_max_tokens=16",
                               "generation.reward_max_tokens=12")), "generation.batch_size=16",
            "sft.epochs=1", "sft.batch_size=3", *(() if echo else ("sft.max_length=256",)),
            "reward_search.val_questions=4", *(() if echo else ("reward_search.optimizer_max_tokens=16",)))]
    else:
        sets += [f"{prefix}{kv}" for kv in (
            "loop.iterations=1", "loop.synthetic_size=8", "dataset.val_limit=8", "dataset.test_limit=8",
            "reward_search.val_questions=8")]
    return sets


def side_env(tree: Path, work: Path) -> dict[str, str]:
    """Environment of one side: its own code first, float32, a private Ray instance."""
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(tree), "TRPROMPT_CPU_BF16": "0", "RAY_ADDRESS": "local",
        "RAY_USAGE_STATS_ENABLED": "0", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "TEXTGRAD_LOG_DIR": str(work / "textgrad-logs"), "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def run_job(tree: Path, work: Path, name: str, args: list[str], log: Path) -> None:
    """Run ``jobs/<name>.py`` of ``tree`` with ``nice -n 10`` from ``work`` into a fresh ``work/<name>``."""
    shutil.rmtree(work / name, ignore_errors=True)  # a fresh run, never one resumed from an earlier call
    cmd = ["nice", "-n", "10", sys.executable, str(tree / "jobs" / f"{name}.py"), *args]
    print(f"[check] {tree.name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=work, env=side_env(tree, work), stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"[check]   rc {rc} in {time.time() - t0:.0f}s (log {log})", flush=True)
    if rc != 0:
        raise SystemExit(f"{name} failed at {tree}; see {log}")


def free_port() -> int:
    """A free loopback port picked by the OS."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    """POST JSON, return the parsed answer."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def serve_side(tree: Path, work: Path, run_dir: Path) -> None:
    """Serve ``run_dir`` with ``jobs/serve.py``, ask for prompts and solutions, save them to ``serve.json``."""
    port = free_port()
    log = work / "serve.log"
    cmd = ["nice", "-n", "10", sys.executable, str(tree / "jobs" / "serve.py"), "--run-dir", str(run_dir),
           "--port", str(port), "--no-admin"]
    print(f"[check] {tree.name}: jobs/serve.py --run-dir {run_dir} --port {port}", flush=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=work, env=side_env(tree, work), stdout=f, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited with {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"serve never became healthy; see {log}")
            time.sleep(2)
        out: dict[str, list[dict]] = {"prompt": [], "solve": []}
        for q in QUESTIONS:  # whole answers but the run id (it names the folder, which differs per side)
            for route in ("prompt", "solve"):
                answer = post(f"{base}/v1/{route}", {"question": q})
                answer.pop("run_id", None)
                out[route].append({"question": q, **answer})
        shutil.rmtree(work / "serve", ignore_errors=True)
        (work / "serve").mkdir()
        (work / "serve" / "serve.json").write_text(json.dumps(out, indent=1, sort_keys=True))
    finally:
        proc.send_signal(signal.SIGINT)  # the job shuts Serve and its Ray instance down
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=60)


def run_side(tree: Path, work: Path, jobs: list[str], model: str, tiny: bool, echo: bool = False) -> None:
    """Every requested job at one commit."""
    work.mkdir(parents=True, exist_ok=True)
    if "train" in jobs:
        run_job(tree, work, "train", ["--config", str(tree / "configs" / "cpu-demo.yaml"), "--local",
                                      "--no-progress", "--run-dir", str(work / "train"),
                                      *[a for s in run_sets("", model, tiny, echo) for a in ("--set", s)]],
                work / "train.log")
    if "serve" in jobs:
        serve_side(tree, work, work / "train")
    if "compare" in jobs:
        sets = run_sets("run.", model, tiny, echo) + [
            "run.loop.iterations=1", "compare.test_limit=4", "compare.budget.max_metric_calls=12",
            "compare.budget.max_llm_requests=24", "compare.textgrad.steps=1", "compare.opro.steps=1",
            "compare.textgrad.optimizer_max_tokens=16", "compare.opro.max_tokens=16",
            "compare.gepa.reflection_max_tokens=16", "run.dataset.train_limit=24"]
        run_job(tree, work, "compare", ["--config", str(tree / "configs" / "compare-svamp.yaml"), "--local",
                                        "--no-progress", "--run-dir", str(work / "compare"),
                                        *[a for s in sets for a in ("--set", s)]], work / "compare.log")
    if "sweep" in jobs:
        sets = [f"overrides.{s}" for s in run_sets("", model, tiny, echo)] + [
            "sweep.num_samples=1", "sweep.budget.max_trials=2", "overrides.sft.cpus_per_worker=0.25",
            "overrides.dataset.val_limit=4", "overrides.reward_search.val_questions=4",
            "overrides.loop.synthetic_size=6"]
        run_job(tree, work, "sweep", ["--config", str(tree / "configs" / "sweep-cpu.yaml"),
                                      "--run-dir", str(work / "sweep"),
                                      *[a for s in sets for a in ("--set", s)]], work / "sweep.log")


def main(argv: list[str] | None = None) -> int:
    """Run both sides, then compare them job by job."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, type=Path, help="worktree of the older commit (e.g. fa43084)")
    p.add_argument("--new", default=ROOT, type=Path, help="worktree of the newer commit (default: this one)")
    p.add_argument("--out", required=True, type=Path, help="output folder (old/ and new/ below it)")
    p.add_argument("--model", default="tiny", help="'tiny' (random Llama, made in <out>), 'echo' (the echo engine "
                   "in every role, SFT on the tiny Llama: texts are the requests) or a model name/path")
    p.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {','.join(JOBS)}")
    p.add_argument("--sides", default="old,new", help="which sides to run (e.g. 'new' to redo only the newer one)")
    p.add_argument("--compare-only", action="store_true", help="only compare what an earlier call wrote")
    args = p.parse_args(argv)
    jobs = [j for j in args.jobs.split(",") if j]
    out = args.out.resolve()
    echo = args.model == "echo"
    tiny = args.model in ("tiny", "echo")
    model = args.model
    if tiny:
        sys.path.insert(0, str(args.new.resolve()))
        from trprompt.testing import make_tiny_llama

        model = str(make_tiny_llama(out / "tiny-llama"))
    if not args.compare_only:
        for side, tree in (("old", args.old), ("new", args.new)):
            if side in args.sides.split(","):
                run_side(tree.resolve(), out / side, jobs, model, tiny, echo)
    same = True
    for job in jobs:
        a, b = out / "old" / job, out / "new" / job
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_runs.py"), "--across-versions",
                              str(a), str(b)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        (out / f"{job}.txt").write_text(res.stdout + res.stderr)
        print(f"== {job}: {'same' if res.returncode == 0 else 'DIFFERS'}\n{res.stdout}{res.stderr}", flush=True)
        same &= res.returncode == 0
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
