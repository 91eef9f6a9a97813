"""Engine wrappers: what sits between the algorithm and any :class:`~trprompt.engines.base.Engine`.

Each wrapper is itself an engine (``generate`` / ``load_adapter`` / ``unload_adapter``),
so they stack (``MeteredEngine(AdapterNamespace(pool, "t1__"))``) and the algorithm
cannot tell a wrapped engine from a bare one.

- **Metering and budgets**: :class:`MeteredEngine` counts one role's requests and tokens
  and enforces its caps; a :class:`Budget` caps several roles together; both raise
  :class:`BudgetExceededError` before a call that would overspend starts.
- **Adapter namespaces**: :class:`AdapterNamespace` prefixes every LoRA adapter id, so
  several users of one engine (trials of a sweep, the methods of a comparison, all naming
  their adapters ``iter1``, ``iter2``, ...) never replace each other's adapters.
- **Chunking**: :func:`generate_in_chunks` sends a long request list in chunks with a
  progress bar.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

from tqdm.auto import tqdm

from trprompt.engines.base import ChatRequest, ChatResult, Engine, Usage


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


class BudgetExceededError(RuntimeError):
    """The configured LLM-call or token budget was spent."""


class Budget:
    """A spending cap shared by several :class:`MeteredEngine` (e.g. all roles of a run)."""

    def __init__(self, max_requests: int | None = None, max_tokens: int | None = None) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.usage = Usage()
        self._lock = threading.Lock()

    def check(self, n_new: int, who: str = "run") -> None:
        """Raise :class:`BudgetExceededError` if ``n_new`` more requests would break the cap."""
        with self._lock:
            if self.max_requests is not None and self.usage.requests + n_new > self.max_requests:
                raise BudgetExceededError(
                    f"{who}: request budget {self.max_requests} would be exceeded "
                    f"({self.usage.requests} spent, {n_new} asked)"
                )
            if self.max_tokens is not None and self.usage.total_tokens >= self.max_tokens:
                raise BudgetExceededError(f"{who}: token budget {self.max_tokens} spent ({self.usage.total_tokens})")

    def charge(self, usage: Usage) -> None:
        """Record spent usage."""
        with self._lock:
            self.usage.add(usage)


class MeteredEngine:
    """Wraps an engine and counts its requests and tokens (thread-safe).

    Every method (baselines and TRPrompt alike) goes through one of these per
    role, so costs are accounted the same way everywhere. ``max_requests`` and
    ``max_tokens`` turn the meter into a budget: a call that would start after
    the budget is spent raises :class:`BudgetExceededError`. A shared
    :class:`Budget` caps several roles together.
    """

    def __init__(
        self,
        engine: Engine,
        role: str = "engine",
        max_requests: int | None = None,
        max_tokens: int | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.engine = engine
        self.budget = budget
        self.role = role
        self._own = Budget(max_requests, max_tokens)
        self.usage = self._own.usage
        """What this role spent (its own cap counts against it)."""

    @property
    def max_requests(self) -> int | None:
        """The role's request cap (``None``: none)."""
        return self._own.max_requests

    @property
    def max_tokens(self) -> int | None:
        """The role's token cap (``None``: none)."""
        return self._own.max_tokens

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Generate through the wrapped engine and record the usage (own cap, then the shared one)."""
        requests = list(requests)
        if not requests:
            return []
        self._own.check(len(requests), self.role)
        if self.budget is not None:
            self.budget.check(len(requests), self.role)
        results = self.engine.generate(requests)
        spent = Usage(
            calls=1,
            requests=len(requests),
            prompt_tokens=sum(r.prompt_tokens for r in results),
            completion_tokens=sum(r.completion_tokens for r in results),
        )
        self._own.charge(spent)
        if self.budget is not None:
            self.budget.charge(spent)
        return results

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Delegate to the wrapped engine."""
        self.engine.load_adapter(adapter_id, path)

    def unload_adapter(self, adapter_id: str) -> None:
        """Delegate to the wrapped engine."""
        self.engine.unload_adapter(adapter_id)


class AdapterNamespace:
    """An engine wrapper that prefixes every LoRA adapter id with ``prefix``.

    ``load_adapter("iter1", path)`` loads ``prefix + "iter1"`` on the wrapped engine and
    requests naming ``iter1`` are sent for ``prefix + "iter1"``; base-model requests
    (``adapter=None``) pass through unchanged. :meth:`release` unloads whatever was
    loaded through this wrapper (for a user that is done with a shared engine).
    """

    def __init__(self, engine: Engine, prefix: str) -> None:
        self.engine = engine
        self.prefix = prefix
        self.loaded: dict[str, str] = {}
        """Adapters loaded through this wrapper (full id on the wrapped engine -> path)."""

    def full_id(self, adapter_id: str | None) -> str | None:
        """The id the wrapped engine knows ``adapter_id`` by (``None`` stays ``None``: the base model)."""
        return None if adapter_id is None else f"{self.prefix}{adapter_id}"

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Forward ``requests`` with their adapter ids prefixed."""
        return self.engine.generate([
            r if r.adapter is None else dataclasses.replace(r, adapter=self.full_id(r.adapter)) for r in requests
        ])

    def load_adapter(self, adapter_id: str, path: str) -> None:
        """Load ``path`` on the wrapped engine under the prefixed id."""
        full = f"{self.prefix}{adapter_id}"
        self.engine.load_adapter(full, path)
        self.loaded[full] = path

    def unload_adapter(self, adapter_id: str) -> None:
        """Unload the prefixed id."""
        full = f"{self.prefix}{adapter_id}"
        self.engine.unload_adapter(full)
        self.loaded.pop(full, None)

    def release(self) -> None:
        """Unload every adapter loaded through this wrapper (errors are ignored: the user is leaving)."""
        for full in list(self.loaded):
            try:
                self.engine.unload_adapter(full)
            except Exception:  # noqa: BLE001 - best-effort clean-up
                pass
            self.loaded.pop(full, None)
