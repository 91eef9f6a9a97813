"""math-verify with a time limit that works from any thread.

math-verify enforces its time limits with ``SIGALRM``, which only works in the main thread. Calls
from the main thread run in-process; calls from any other thread go to a small pool of helper
processes (started on first use, reused after). A helper that has not answered after
``3 * timeout + 2`` seconds is killed and the answer counts as incorrect. If helpers cannot be
started at all, a daemon thread without a time limit is used and abandoned after the same delay.

:func:`verify` is the only entry point the graders use; results are cached per
(prediction, gold, timeout).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

__all__ = ["verify", "verify_here"]

logger = logging.getLogger(__name__)

_MAX_HELPERS = max(1, min(4, os.cpu_count() or 1))
_HELPER_START_TIMEOUT_S = 120.0


def _mv_wrap(s: str) -> str:
    return "$" + s + "$"


def verify_here(pred: str, gold: str, timeout_int: int | None) -> bool | None:
    """Run math-verify in this thread. ``None`` when either side cannot be parsed or it errors.

    ``timeout_int`` must be ``None`` (no limit) unless this is the main thread.
    """
    from math_verify import parse
    from math_verify import verify as mv_verify

    try:
        gold_parsed = parse(_mv_wrap(gold), parsing_timeout=timeout_int)  # type: ignore[arg-type]
        pred_parsed = parse(_mv_wrap(pred), parsing_timeout=timeout_int)  # type: ignore[arg-type]
        if not gold_parsed or not pred_parsed:
            return None
        return bool(mv_verify(gold_parsed, pred_parsed, timeout_seconds=timeout_int))
    except Exception:  # math-verify swallows most errors itself; anything else counts as "unknown"
        logger.debug("math-verify failed on %r vs %r", pred, gold, exc_info=True)
        return None


def _can_use_signals() -> bool:
    return hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()


@lru_cache(maxsize=65536)
def verify(pred: str, gold: str, timeout_int: int) -> bool | None:
    """math-verify's verdict on ``pred`` against ``gold`` (``None``: could not parse), from any thread."""
    if _can_use_signals():
        return verify_here(pred, gold, timeout_int)
    return _verify_off_thread(pred, gold, timeout_int)


def _hard_limit_s(timeout_int: int) -> float:
    """Wall-clock seconds an off-main-thread math-verify check may take before it is abandoned."""
    return 3 * timeout_int + 2.0


class _HelperTimeout(Exception):
    pass


class _Helper:
    """A child Python process that runs math-verify in its main thread, one request at a time."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        boot = (
            f"import sys; sys.path.insert(0, {root!r}); "
            "from trprompt.grading.mathverify_pool import _helper_main; _helper_main()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
            close_fds=True,
        )
        self._buf = b""
        if self._read_line(time.monotonic() + _HELPER_START_TIMEOUT_S) != b"ready":
            self.kill()
            raise RuntimeError("grading helper process did not start")

    def _read_line(self, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _HelperTimeout
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("grading helper process exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def ask(self, pred: str, gold: str, timeout_int: int) -> bool | None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"pred": pred, "gold": gold, "t": timeout_int}) + "\n").encode())
        reply = json.loads(self._read_line(time.monotonic() + _hard_limit_s(timeout_int)))
        return reply["r"]

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # already gone
            pass


_idle_helpers: queue.LifoQueue[_Helper] = queue.LifoQueue()
_helper_slots = threading.BoundedSemaphore(_MAX_HELPERS)
_all_helpers: set[_Helper] = set()
_all_helpers_lock = threading.Lock()
_helpers_unavailable = False


def _verify_off_thread(pred: str, gold: str, timeout_int: int) -> bool | None:
    """math-verify from a non-main thread: ask a helper process; kill it if it overruns."""
    global _helpers_unavailable
    if _helpers_unavailable:
        return _verify_in_guard_thread(pred, gold, timeout_int)
    with _helper_slots:
        try:
            helper = _idle_helpers.get_nowait()
        except queue.Empty:
            try:
                helper = _Helper()
            except Exception:
                logger.warning("cannot start grading helper processes; using in-thread fallback", exc_info=True)
                _helpers_unavailable = True
                return _verify_in_guard_thread(pred, gold, timeout_int)
            with _all_helpers_lock:
                _all_helpers.add(helper)
        try:
            verdict = helper.ask(pred, gold, timeout_int)
        except (_HelperTimeout, RuntimeError, OSError, ValueError) as exc:
            logger.warning(
                "math-verify helper gave no answer (%s) for %r vs %r; graded incorrect",
                type(exc).__name__,
                pred[:200],
                gold[:200],
            )
            helper.kill()
            with _all_helpers_lock:
                _all_helpers.discard(helper)
            return False
        _idle_helpers.put(helper)
        return verdict


def _verify_in_guard_thread(pred: str, gold: str, timeout_int: int) -> bool | None:
    """Last resort when helper processes cannot start: a daemon thread we stop waiting for."""
    result: list[bool | None] = []
    worker = threading.Thread(target=lambda: result.append(verify_here(pred, gold, None)), daemon=True)
    worker.start()
    worker.join(_hard_limit_s(timeout_int))
    return result[0] if result else False


@atexit.register
def _stop_helpers() -> None:
    with _all_helpers_lock:
        helpers = list(_all_helpers)
        _all_helpers.clear()
    for helper in helpers:
        helper.kill()


def _helper_main() -> None:
    """Entry point of a helper process: JSON requests on stdin, one JSON reply line each on stdout."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, not into the reply stream
    logging.disable(logging.WARNING)
    import math_verify  # noqa: F401  (import before announcing readiness)

    os.write(reply_fd, b"ready\n")
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            verdict = verify_here(req["pred"], req["gold"], int(req["t"]))
        except Exception:
            verdict = None
        os.write(reply_fd, (json.dumps({"r": verdict}) + "\n").encode())
