"""Serve a finished TRPrompt run over HTTP with Ray Serve.

The job behind ``python jobs/serve.py`` and ``trprompt serve`` (both call :func:`main`).

Local (starts a Ray instance, serves on http://127.0.0.1:8000 until Ctrl-C)::

    python jobs/serve.py --run-dir runs/cpu-demo

On a running cluster, deploy and return (the app keeps running)::

    python jobs/serve.py --run-dir runs/cpu-demo --address auto --detach

The same application through Serve's CLI (app builder with ``key=value`` args)::

    serve run cluster.serve.app:build_app run_dir=runs/cpu-demo

Routes: ``POST /v1/prompt``, ``POST /v1/solve``, ``GET /healthz``, ``GET /v1/info``,
``POST /v1/admin/reload`` (bearer token), and the OpenAI-compatible ``POST /v1/chat/completions``
and ``GET /v1/models``; OpenAPI page at ``/docs``. See docs/serving.md (security model included).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (defaults are those of :class:`cluster.serve.args.ServeArgs`)."""
    p = argparse.ArgumentParser(prog="jobs/serve.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="finished run directory (config.yaml, best.json, adapter)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--route-prefix", default="/", help="URL prefix of the app")
    p.add_argument("--name", default="trprompt", help="Serve application name")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--with-target", dest="with_target", action="store_true", default=True,
                        help="also deploy the target model, needed by /v1/solve (default)")
    target.add_argument("--no-target", dest="with_target", action="store_false",
                        help="prompt model only (/v1/solve answers 404)")
    p.add_argument("--share-engines", action=argparse.BooleanOptionalAction, default=None,
                   help="one engine for prompt and target model when their settings match (default: run config)")
    p.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True,
                   help="merge concurrent requests into one engine call (@serve.batch)")
    p.add_argument("--max-batch-size", type=int, default=16, help="largest merged batch")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.02, help="how long a batch waits to fill")
    p.add_argument("--min-replicas", type=int, default=1, help="fewest replicas per model deployment")
    p.add_argument("--max-replicas", type=int, default=1, help="most replicas per model deployment (> min: autoscale)")
    p.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling target of ongoing requests per replica (default: max batch size)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs per model replica (default: run config)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per model replica (default: run config)")
    p.add_argument("--max-question-chars", type=int, default=4000, help="longest accepted question")
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="per-request deadline (then 504)")
    p.add_argument("--no-admin", action="store_true", help="disable POST /v1/admin/reload")
    p.add_argument("--admin-token-env", default="TRPROMPT_SERVE_ADMIN_TOKEN",
                   help="environment variable holding the bearer token for /v1/admin/* (unset: a random token is "
                   "generated and written to --admin-token-file, mode 0600)")
    p.add_argument("--admin-token-file", default=None,
                   help="where a generated admin token goes (default: ~/.cache/trprompt/serve/admin-token-<pid>)")
    p.add_argument("--api-key-env", default="TRPROMPT_SERVE_API_KEY",
                   help="environment variable holding an API key that /v1/prompt, /v1/solve and the OpenAI routes "
                   "then require (unset: no key)")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="accept requests with this Host name (repeatable; default: localhost, 127.0.0.1, ::1; "
                   "'*' accepts any)")
    p.add_argument("--allow-root", action="append", default=None, metavar="DIR",
                   help="folder a reload may load runs and adapters from (repeatable; default: $TRPROMPT_STORAGE "
                   "if a local folder, else ./runs)")
    p.add_argument("--allow-reward-text", action="store_true", help="let a reload set a free-text optimal_reward")
    p.add_argument("--rate-limit", type=float, default=20.0,
                   help="requests per second per client address (0: no limit; over it: 429)")
    p.add_argument("--rate-limit-burst", type=int, default=40, help="burst size of the per-client rate limit")
    p.add_argument("--max-pending-requests", type=int, default=256,
                   help="requests the ingress holds at once (more: 503 with Retry-After)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to attach to (default: RAY_ADDRESS if set, else start a new local instance)")
    p.add_argument("--detach", action="store_true", help="deploy and exit instead of blocking (needs a cluster)")
    return p.parse_args(argv)


def serve_args(args: argparse.Namespace) -> dict[str, object]:
    """The :class:`~cluster.serve.args.ServeArgs` fields given on the command line."""
    out: dict[str, object] = {
        "run_dir": args.run_dir,
        "with_target": args.with_target,
        "batching": args.batching,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "min_replicas": args.min_replicas,
        "max_replicas": max(args.max_replicas, args.min_replicas, 1),
        "max_question_chars": args.max_question_chars,
        "request_timeout_s": args.request_timeout_s,
        "enable_admin": not args.no_admin,
        "allow_reward_text": args.allow_reward_text,
        "rate_limit_per_s": args.rate_limit,
        "rate_limit_burst": args.rate_limit_burst,
        "max_pending_requests": args.max_pending_requests,
    }
    if args.allowed_host:
        out["allowed_hosts"] = args.allowed_host
    if args.allow_root:
        out["run_roots"] = args.allow_root
    if args.admin_token_file:
        out["admin_token_file"] = args.admin_token_file
    for key in ("share_engines", "target_ongoing_requests", "num_cpus", "num_gpus"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    token = os.environ.get(args.admin_token_env) if args.admin_token_env else None
    if token:
        out["admin_token"] = token
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if key:
        out["api_key"] = key
    return out


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Validate the run directory, start Serve on the given host/port and deploy the app."""
    args = parse_args(argv)
    from pydantic import ValidationError

    from cluster.serve.app import build_app
    from cluster.serve.args import ServeArgs
    from cluster.serve.run_spec import RunDirError

    try:
        settings = ServeArgs.model_validate(serve_args(args))
        app = build_app(settings)  # reads the run dir: fails here, before Ray starts
    except (RunDirError, ValidationError) as e:
        print(f"cannot serve: {e}", file=sys.stderr)
        return 2

    from ray import serve

    from cluster.runtime import init_ray

    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.detach and not address:
        print("--detach needs a running cluster (--address or RAY_ADDRESS)", file=sys.stderr)
        return 2
    init_ray(args.address)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.allowed_host:
        print(f"[trprompt] note: listening on {args.host} but only loopback Host names are accepted; add "
              "--allowed-host NAME for the names clients use", flush=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    prefix = args.route_prefix.rstrip("/")
    print(f"[trprompt] deploying {settings.run_dir} at http://{args.host}:{args.port}{prefix}/ "
          f"(OpenAPI docs: {prefix}/docs)", flush=True)
    if not args.detach:  # SIGTERM (service managers, containers) shuts down like Ctrl-C
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        serve.run(app, name=args.name, route_prefix=args.route_prefix, blocking=not args.detach)
    except KeyboardInterrupt:
        print("[trprompt] shutting down", flush=True)
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
