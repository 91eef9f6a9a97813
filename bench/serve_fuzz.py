"""Fuzz the Serve app with malformed requests on loopback and count the 5xx answers (there should be none).

Deploys the app on an echo-engine run it fabricates (instant engines, so the fuzz measures
the HTTP layer), with the secure defaults: a generated admin token, reloads only under a
temporary runs root. Then it sends ``--count`` seeded malformed requests (bounded
concurrency) to every route, the admin route included (with and without the token, paths
outside and inside the root, NUL bytes, broken runs, free-text t*), the OpenAI routes, bad
``Host`` headers, oversized and chunked bodies, and prints the status histogram.

    python bench/serve_fuzz.py --count 1500

Exit status 1 if any answer was a 5xx, or an error body of the app was not JSON. (A malformed
``Content-Length`` is refused by the HTTP parser of Serve's proxy with a plain-text 400 before the
app runs; those are counted apart.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1500, help="malformed requests to send")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else a new local instance)")
    p.add_argument("--json-out", default=None, help="also write the summary here")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_runs(root: Path) -> dict[str, Path]:
    """A good echo run, a run whose templates do not render, and a folder that is not a run."""
    from cluster.serve.run_spec import write_base_run

    model = {"model": "echo-model", "engine": "echo", "num_cpus": 0.1}
    good = write_base_run(root / "good", model, optimal_reward="Name every quantity, then compute.")
    broken = write_base_run(root / "broken-templates", model)
    t = json.loads((broken / "templates.json").read_text())
    t["prompt_model_user"] = "{question} {no_such_field}"
    (broken / "templates.json").write_text(json.dumps(t))
    (root / "not-a-run").mkdir()
    return {"good": good, "broken": broken, "not_a_run": root / "not-a-run"}


def cases(seed: int, count: int, root: Path, outside: Path, token: str) -> list[dict[str, Any]]:
    """Seeded malformed requests over every route."""
    rng = random.Random(seed)
    admin = {"Authorization": f"Bearer {token}"}
    junk: list[Any] = [None, True, 0, -1, 3.5, 10**30, "", " ", [], {}, ["q"], {"q": 1}, "x" * 50]
    paths_out = [str(outside), str(outside / "missing"), "/etc", "/etc/passwd", "/proc/self/root", "../../..", "~",
                 "/dev/zero", "C:\\\\Windows", "runs/../../etc", str(root) + "/../" + outside.name]
    paths_in = [str(root / "missing"), str(root / "broken-templates"), str(root / "not-a-run"), "missing",
                "broken-templates", str(root / "good" / "config.yaml")]
    weird = ["a\x00b", str(root) + "/good\x00", "\x00", "x" * 5000, "\u202e\u200b", "%2e%2e/etc"]

    def q() -> str:
        return f"What is {rng.randint(1, 99)} + {rng.randint(1, 99)}?"

    def reload_body() -> Any:
        kind = rng.randrange(6)
        if kind == 0:
            return {"run_dir": rng.choice(paths_out + paths_in + weird)}
        if kind == 1:
            return {"adapter_path": rng.choice(paths_out + paths_in + weird)}
        if kind == 2:
            return {"optimal_reward": rng.choice(["IGNORE THE PROBLEM", "", "\x00", "y" * 30000, "\u200b"])}
        if kind == 3:
            return {"run_dir": rng.choice(paths_in), "optimal_reward": "x"}
        if kind == 4:
            return rng.choice([{}, {"run_dir": rng.choice(junk)}, {"junk": 1}, [], "run_dir", None])
        return {"adapter_path": rng.choice(paths_in), "optimal_reward": rng.choice(junk)}

    makers: list[Any] = [
        lambda: {"path": "/v1/prompt", "json": {"question": rng.choice(junk)}},
        lambda: {"path": "/v1/prompt", "json": {"question": rng.choice(["", "\u200b\u200d", "\x00\x01", "\u2060"])}},
        lambda: {"path": "/v1/prompt", "json": {"question": "y" * rng.randint(4001, 12000)}},
        lambda: {"path": "/v1/prompt", "json": {"question": q(), "n": rng.choice([0, 9, "2", 2.0, None, True])}},
        lambda: {"path": "/v1/solve", "json": {"question": q(), "temperature": 1.0}},
        lambda: {"path": rng.choice(["/v1/prompt", "/v1/solve"]),
                 "content": bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))},
        lambda: {"path": "/v1/prompt", "content": b"[" * rng.randint(1000, 30000)},
        lambda: {"path": "/v1/prompt", "content": b'{"question": "\\ud800"}'},
        lambda: {"path": "/v1/prompt", "content": b"x" * rng.choice([70_000, 1 << 20, (1 << 20) + 1, 3 << 20])},
        lambda: {"path": "/v1/prompt", "chunked": rng.choice([70_000, 2 << 20])},
        lambda: {"path": "/v1/prompt", "raw_length": rng.choice(["-1", "abc", "1e9", "99999999999", " 2", "2, 2"])},
        lambda: {"path": rng.choice(["/v1/prompt", "/v1/info", "/healthz", "/v1/admin/reload"]),
                 "headers": {"Host": rng.choice(["evil.example", "127.0.0.1.nip.io", "", "localhost@evil"])},
                 "json": {"question": q()}},
        lambda: {"path": "/v1/admin/reload", "json": reload_body(), "headers": admin},
        lambda: {"path": "/v1/admin/reload", "json": reload_body(), "headers": admin},
        lambda: {"path": "/v1/admin/reload", "json": reload_body(), "headers": admin},
        lambda: {"path": "/v1/admin/reload", "json": reload_body(),
                 "headers": rng.choice([{}, {"Authorization": "Bearer wrong"}, {"Authorization": token},
                                        {"Authorization": "Basic " + token},
                                        {"Authorization": "Bearer " + token[:-1]}])},
        lambda: {"path": "/v1/admin/reload", "method": rng.choice(["GET", "PUT", "DELETE"]), "headers": admin},
        lambda: {"path": "/v1/admin/reload", "content": b'{"run_dir": "' + str(root).encode() + b'/good\\u0000"}',
                 "headers": admin},
        lambda: {"path": "/v1/chat/completions", "json": rng.choice([
            {}, {"model": "m"}, {"model": "m", "messages": []},
            {"model": "m", "messages": [{"role": "system", "content": "hi"}]},
            {"model": "m", "messages": [{"role": "user", "content": rng.choice(junk)}]},
            {"model": "m", "messages": [{"role": "user", "content": "\u200b"}]},
            {"model": "m", "messages": [{"role": "user", "content": q()}], "n": 3},
            {"model": "m", "messages": [{"role": "user", "content": q()}], "temperature": -1},
            {"model": "m", "messages": [{"role": "user", "content": q()}], "stream": "yes"},
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            {"model": "m", "messages": [{"role": "user", "content": "y" * 9000}]},
            {"model": rng.choice(junk), "messages": [{"role": "user", "content": q()}]}])},
        lambda: {"path": "/v1/chat/completions", "content": b"{not json"},
        lambda: {"path": rng.choice(["/v1/models", "/v1/chat/completions", "/v1/info"]),
                 "method": rng.choice(["PUT", "DELETE", "PATCH"])},
        lambda: {"path": rng.choice(["/v1/promptx", "/v2/prompt", "/v1/../etc/passwd", "/%00", "/v1/admin"]),
                 "method": rng.choice(["GET", "POST"])},
    ]
    out = []
    for _ in range(count):
        c = rng.choice(makers)()
        c.setdefault("method", "POST")
        out.append(c)
    return out


async def _raw(base_url: str, path: str, length: str) -> tuple[int, Any]:
    """POST ``{}`` with a hand-written (invalid) Content-Length; (status, parsed body or text)."""
    host, _, port = base_url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\nConnection: close\r\n\r\n{{}}".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=30)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return -1, data[:200]
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body[:200].decode("latin-1")


async def send_all(base_url: str, todo: list[dict[str, Any]], concurrency: int) -> list[tuple[int, Any]]:
    """Send every case; (status, parsed body or text) each; transport errors are status -1."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0,
                                 limits=httpx.Limits(max_connections=concurrency)) as c:

        async def one(case: dict[str, Any]) -> tuple[int, Any]:
            async with sem:
                if "raw_length" in case:  # httpx refuses to send a bad Content-Length: write the request by hand
                    return await _raw(base_url, case["path"], case["raw_length"])
                headers = dict(case.get("headers") or {})
                content = case.get("content")
                if "chunked" in case:
                    size = case["chunked"]

                    async def gen() -> Any:
                        for _ in range(size // 65536 + 1):
                            yield b"z" * 65536

                    content = gen()
                if content is not None:
                    headers.setdefault("content-type", "application/json")
                try:
                    body = case.get("json") if content is None else None
                    r = await c.request(case["method"], case["path"], json=body, content=content, headers=headers)
                except httpx.HTTPError as e:
                    return -1, repr(e)
                try:
                    return r.status_code, r.json()
                except ValueError:
                    return r.status_code, r.text[:200]

        return await asyncio.gather(*(one(x) for x in todo))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ray import serve

    from cluster.runtime import init_ray
    from cluster.serve.app import build_app

    tmp = tempfile.TemporaryDirectory(prefix="trprompt-fuzz-")
    root, outside = Path(tmp.name) / "runs", Path(tmp.name) / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "config.yaml").write_text("not: served\n")
    runs = make_runs(root)
    token_file = Path(tmp.name) / "admin-token"
    app = build_app({"run_dir": str(runs["good"]), "num_cpus": 0.1, "admin_token_file": str(token_file),
                     "run_roots": [str(root)], "rate_limit_per_s": 0, "request_timeout_s": 30.0})
    token = token_file.read_text().strip()
    port = _free_port()
    init_ray(args.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, name="fuzz", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        todo = cases(args.seed, args.count, root, outside, token)
        t0 = time.perf_counter()
        results = asyncio.run(send_all(url, todo, args.concurrency))
        elapsed = time.perf_counter() - t0
        import httpx

        health = httpx.get(f"{url}/healthz", timeout=30).status_code
        good = httpx.post(f"{url}/v1/prompt", json={"question": "Still fine?"}, timeout=30).status_code
    finally:
        serve.shutdown()
        tmp.cleanup()
    statuses = Counter(s for s, _ in results)
    five = [(c, b) for c, (s, b) in zip(todo, results, strict=True) if s >= 500 or s < 0]
    ok = sum(1 for s, _ in results if s == 200)
    not_json = [(c, b) for c, (s, b) in zip(todo, results, strict=True)
                if s >= 400 and not (isinstance(b, dict) and "error" in b) and "raw_length" not in c]
    # a malformed Content-Length is refused by the HTTP parser of Serve's proxy (uvicorn/h11) with a
    # plain-text 400 before any application code runs
    framing = Counter(s for c, (s, _) in zip(todo, results, strict=True) if "raw_length" in c)
    admin = sum(1 for c in todo if c["path"].startswith("/v1/admin"))
    print(f"{len(todo)} malformed requests ({admin} to /v1/admin/*) in {elapsed:.1f} s")
    print("statuses:", dict(sorted(statuses.items())))
    print(f"5xx or transport errors: {len(five)}; error bodies that are not JSON: {len(not_json)}; "
          f"200: {ok} (junk that happens to be valid, e.g. any string as the OpenAI model name)")
    print(f"malformed Content-Length (answered by Serve's HTTP parser, plain text): {dict(framing)}")
    print(f"afterwards: /healthz {health}, a good /v1/prompt {good}")
    for c, b in (five + not_json)[:5]:
        print("  e.g.", {k: (v if k != "content" else f"<{len(v)} bytes>") for k, v in c.items()
                         if k != "headers"}, str(b)[:200])
    if args.json_out:
        summary = {"count": len(todo), "admin": admin, "statuses": statuses, "five_xx": len(five),
                   "not_json": len(not_json), "framing": framing}
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return 1 if five or not_json or health != 200 or good != 200 else 0


if __name__ == "__main__":
    raise SystemExit(main())
