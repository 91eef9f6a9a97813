"""The security model of the Serve app: tokens, the Host allow-list, reload roots, rate limits.

* Admin routes are behind a bearer token always: the one configured, or a random one generated
  at start and written to a file only its owner can read (mode 0600). The replicas get the
  token's SHA-256, never the token, and compare digests in constant time.
* Every request's ``Host`` must be in the allow-list (loopback names by default), so a web page
  cannot reach the app through DNS rebinding.
* A reload names a run directory (or an adapter folder) under the configured roots only; any
  other path, existing or not, readable or not, gets the same answer.
* Each client address has a token bucket (429 with ``Retry-After`` when it is empty).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import tempfile
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path


def token_digest(token: str) -> str:
    """The SHA-256 hex digest of a token (what the replicas keep)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def token_matches(presented: str | None, digest: str | None) -> bool:
    """Whether ``presented`` hashes to ``digest`` (constant-time comparison of the digests)."""
    if not presented or not digest:
        return False
    return hmac.compare_digest(token_digest(presented), digest)


def write_token_file(path: str | Path, token: str) -> Path:
    """Write ``token`` to ``path`` atomically, readable and writable by the owner only (0600).

    The folder is created with mode 0700 when missing.
    """
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".token-", dir=p.parent)  # mkstemp creates the file with mode 0600
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, p)
    return p


def new_token() -> str:
    """A random bearer token (256 bits)."""
    return secrets.token_urlsafe(32)


def host_allowed(host_header: str | None, allowed: Sequence[str]) -> bool:
    """Whether a ``Host`` header names an allowed host (the port is ignored; ``*`` allows any)."""
    if "*" in allowed:
        return True
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".") in {a.lower().strip("[]") for a in allowed}


def has_visible_text(text: str) -> bool:
    """Whether ``text`` has a character that is not whitespace, a control or a format (zero-width) character."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp")
               for ch in text)


class PathNotAllowed(ValueError):
    """A reload path outside the allowed roots (or not a usable path at all)."""


def resolve_under_roots(text: str, roots: Sequence[Path], what: str = "run_dir") -> tuple[Path, str]:
    """The real path of ``text`` if it lies under one of ``roots``, and its display form ``<root name>/<rel>``.

    Relative paths are tried under each root in turn. Symlinks are resolved before the
    check, so a link inside a root that points outside is refused. Everything refused
    gets the same message, which names only the roots: nothing is revealed about paths
    outside them.
    """
    names = ", ".join(r.name or str(r) for r in roots)
    refusal = PathNotAllowed(f"{what} must name a folder under an allowed root ({names})")
    if not text or "\x00" in text or len(text) > 4096:
        raise refusal
    candidate = Path(text)
    tries = [candidate] if candidate.is_absolute() else [r / candidate for r in roots]
    for c in tries:
        try:
            real = Path(os.path.realpath(c))
        except (OSError, ValueError):
            continue
        for root in roots:
            if real == root or root in real.parents:
                return real, f"{root.name}/{real.relative_to(root)}".rstrip("/.")
    raise refusal


def hide_paths(message: str, roots: Sequence[Path]) -> str:
    """``message`` with each root's absolute path replaced by the root's name."""
    for root in sorted(roots, key=lambda r: -len(str(r))):
        message = message.replace(str(root), root.name or "<root>")
    return message


class RateLimiter:
    """Token buckets per client key (bounded: the least recently seen clients are forgotten first)."""

    def __init__(self, rate_per_s: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        """Whether there is a limit at all."""
        return self.rate > 0

    def take(self, key: str, now: float | None = None) -> float:
        """Spend one token of ``key``'s bucket: 0.0 if allowed, else the seconds until a token is back."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` header value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(seconds)))
