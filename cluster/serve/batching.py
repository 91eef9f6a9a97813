"""The batch gate that turns a steady stream of requests into full batches behind a long engine call."""

from __future__ import annotations

import asyncio


class BatchGate:
    """Holds new requests while an engine call of one batch queue runs.

    Serve's batcher forms the next batch as soon as the previous one has been handed
    over, from whatever arrived within ``batch_wait_timeout_s``, and queues it behind
    the running call. With engine calls that take seconds, that turns a steady stream
    of requests into many small batches. Requests that wait here instead enter the
    batcher together when the running call ends, so they become one batch (up to
    ``max_batch_size``).
    """

    def __init__(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait(self) -> None:
        """Return when no engine call of this queue is running."""
        await self._idle.wait()

    def busy(self) -> None:
        """An engine call starts."""
        self._idle.clear()

    def idle(self) -> None:
        """The engine call ended: let the waiting requests in."""
        self._idle.set()
