"""The ASGI middleware in front of every route: Host allow-list, body limit, rate limit, queue bound, metrics.

It runs outside FastAPI's routing, so everything it refuses gets a JSON body (OpenAI's
shape on the OpenAI-compatible routes) at every size, including bodies sent without a
``Content-Length`` (chunked), and it turns any unexpected exception into a JSON 500.

One ingress replica per process: the replica installs its settings with
:func:`install` (a module-level function, because Serve pickles the ingress class by
value and it must reach this module's state by reference).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.serve.args import HARD_MAX_BODY_BYTES
from cluster.serve.errors import error_json, is_openai_path, map_exception
from cluster.serve.metrics import METRICS
from cluster.serve.security import RateLimiter, host_allowed, retry_after

log = logging.getLogger("trprompt.serve")

UNLIMITED_PATHS = ("/healthz",)
"""Routes outside the rate limit and the queue bound (health probes must get through)."""


@dataclass
class GuardState:
    """What the middleware of this process enforces (set by the ingress replica)."""

    allowed_hosts: list[str] = field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"])
    max_body_bytes: int = 64 * 1024
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0, 1))
    max_pending: int = 256
    pending: int = 0


STATE = GuardState()


def install(allowed_hosts: list[str], max_body_bytes: int, rate_per_s: float, burst: int, max_pending: int) -> None:
    """Set this process's limits (called by the ingress replica at start)."""
    STATE.allowed_hosts = list(allowed_hosts)
    STATE.max_body_bytes = min(HARD_MAX_BODY_BYTES, int(max_body_bytes))
    STATE.limiter = RateLimiter(rate_per_s, burst)
    STATE.max_pending = int(max_pending)


class _BodyTooLarge(Exception):
    pass


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class Guard:
    """The outermost middleware of the ingress app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check, then pass the request on (or answer it with a JSON error)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope.get("path", "")
        openai = is_openai_path(path)
        status = {"code": 500}

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def refuse(code: int, err: str, msg: str, headers: dict[str, str] | None = None) -> None:
            await error_json(code, err, msg, headers=headers, openai=openai)(scope, receive, send_counted)

        try:
            await self._handle(scope, receive, send_counted, path, refuse)
        except Exception as e:  # last resort: routes catch their own errors
            log.exception("unhandled error on %s", path)
            if status["code"] == 500:
                await map_exception(e, openai=openai)(scope, receive, send_counted)
        route = scope.get("route")
        METRICS.request(getattr(route, "path", "unmatched"), status["code"], time.perf_counter() - t0)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str, refuse: Any) -> None:
        if not host_allowed(_header(scope, b"host"), STATE.allowed_hosts):
            await refuse(421, "host_not_allowed", "this Host is not served here (see allowed_hosts)")
            return
        limit = STATE.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await refuse(400, "bad_request", "invalid Content-Length")
                return
            if int(length) > limit:
                await refuse(413, "body_too_large", f"body over {limit} bytes")
                return
        else:  # no length (chunked): read it here, up to the limit, and replay it to the app
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # client went away
                body = message.get("body", b"")
                size += len(body)
                if size > limit:
                    await refuse(413, "body_too_large", f"body over {limit} bytes")
                    return
                chunks.append(body)
                more = bool(message.get("more_body"))
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def receive_replayed() -> Message:
                return replay.pop() if replay else await receive()

            receive = receive_replayed
        limited = not any(path.rstrip("/").endswith(p) for p in UNLIMITED_PATHS)
        if limited:
            client = scope.get("client") or ("unknown", 0)
            wait = STATE.limiter.take(str(client[0]))
            if wait > 0:
                await refuse(429, "rate_limited", "too many requests from this client; slow down",
                             {"Retry-After": retry_after(wait)})
                return
            if STATE.pending >= STATE.max_pending:
                await refuse(503, "overloaded", "too many requests in progress; retry later", {"Retry-After": "1"})
                return
            STATE.pending += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if limited:
                STATE.pending -= 1
