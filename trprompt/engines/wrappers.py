"""Engine wrappers and helpers that sit on top of any :class:`~trprompt.engines.base.Engine`.

- :func:`generate_in_chunks`: send a long list of requests in chunks, with a progress bar.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from trprompt.engines.base import ChatRequest, ChatResult, Engine


def generate_in_chunks(
    engine: Engine, requests: Sequence[ChatRequest], chunk_size: int, desc: str | None = None, progress: bool = True
) -> list[ChatResult]:
    """Send ``requests`` to ``engine`` in chunks of ``chunk_size`` with a progress bar; results in order."""
    out: list[ChatResult] = []
    with tqdm(total=len(requests), desc=desc, disable=not progress or not desc, unit="req", leave=False) as bar:
        for i in range(0, len(requests), chunk_size):
            chunk = list(requests[i : i + chunk_size])
            res = engine.generate(chunk)
            if len(res) != len(chunk):
                raise RuntimeError(f"engine returned {len(res)} results for {len(chunk)} requests")
            out.extend(res)
            bar.update(len(chunk))
    return out
