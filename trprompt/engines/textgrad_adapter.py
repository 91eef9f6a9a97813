"""TextGrad glue: our engine protocol as a TextGrad engine, whole-variable views, robust updates.

TextGrad 0.1.8 has three habits that hurt prompt search with small models, and this
module works around each of them generically (any text :class:`textgrad.Variable`):

* Its engines are API clients. :class:`ProtocolTextGradEngine` adapts any
  :class:`~trprompt.engines.base.Engine` (HF, vLLM, OpenAI-compatible, a Ray pool)
  so every TextGrad call becomes one :class:`ChatRequest` and is metered like the
  rest of the system.
* Its optimizer and backward prompts show only the first and last ten words of a
  variable (``Variable.get_short_value``). A textual reward is a paragraph whose
  middle matters, so :func:`whole_value` makes chosen variables report their full
  text there for the duration of a ``with`` block.
* ``TextualGradientDescent.step`` raises ``IndexError`` when the reply lacks the
  ``<IMPROVED_VARIABLE>`` tags. :func:`robust_step` retries and, if the model never
  complies, keeps the incumbent value; :func:`propose_variants` samples several
  updates from one optimizer prompt with the same retry-then-keep policy.

Importing this module imports TextGrad, which needs two environment variables set
first (done here with ``setdefault``): ``LITELLM_LOCAL_MODEL_COST_MAP`` stops
LiteLLM from fetching its price list over the network, and ``TEXTGRAD_LOG_DIR``
sends TextGrad's JSONL log to a temporary folder instead of ``./logs``
(move it later with :func:`redirect_textgrad_log`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TEXTGRAD_LOG_DIR", str(Path(tempfile.gettempdir()) / "trprompt-textgrad-logs"))

import textgrad as tg  # noqa: E402
from textgrad.config import SingletonBackwardEngine  # noqa: E402
from textgrad.engine import EngineLM  # noqa: E402

from trprompt.engines.base import ChatRequest, Engine, Message, SamplingParams  # noqa: E402

DEFAULT_TAGS: tuple[str, str] = ("<IMPROVED_VARIABLE>", "</IMPROVED_VARIABLE>")
"""The tags TextGrad's optimizer asks the model to wrap the new value in."""

_BACKWARD_LOCK = threading.Lock()


class ProtocolTextGradEngine(EngineLM):
    """A TextGrad engine backed by any engine of our protocol.

    Each call turns ``(system_prompt, content)`` into one chat request (a system
    message only when there is a system prompt) with this adapter's sampling
    settings; keyword arguments ``temperature``, ``max_tokens`` and ``top_p``
    override them for one call, other keywords are ignored (TextGrad engines
    accept and drop extras too). ``seed`` is the base seed: call ``i`` uses
    ``seed + i`` so repeated sampled calls differ yet a run is reproducible.

    ``calls`` counts engine calls and ``samples`` the completions they returned.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        temperature: float = 0.0,
        max_tokens: int = 512,
        top_p: float = 1.0,
        seed: int | None = 0,
        adapter: str | None = None,
        default_system_prompt: str | None = None,
        model_string: str = "trprompt-protocol-engine",
    ) -> None:
        self.engine = engine
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.top_p = top_p
        self.seed = seed
        self.adapter = adapter
        self.default_system_prompt = default_system_prompt
        self.model_string = model_string
        self.calls = 0
        self.samples = 0
        self._lock = threading.Lock()

    @staticmethod
    def _content_text(content: str | Sequence[str | bytes]) -> str:
        if isinstance(content, str):
            return content
        parts = list(content)
        if any(not isinstance(p, str) for p in parts):
            raise TypeError("ProtocolTextGradEngine handles text only; got a non-text content part")
        return "\n".join(parts)

    def messages(self, content: str | Sequence[str | bytes], system_prompt: str | None = None) -> list[Message]:
        """The chat messages one call sends."""
        system = self.default_system_prompt if system_prompt is None else system_prompt
        msgs: list[Message] = []
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": self._content_text(content)})
        return msgs

    def sample(
        self,
        content: str | Sequence[str | bytes],
        system_prompt: str | None = None,
        n: int = 1,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        top_p: float | None = None,
    ) -> list[str]:
        """``n`` completions of one prompt, from a single request with ``SamplingParams.n = n``."""
        with self._lock:
            call_index = self.calls
            self.calls += 1
        sp = SamplingParams(
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p if top_p is None else top_p,
            max_tokens=self.max_tokens if max_tokens is None else max_tokens,
            n=n,
            seed=None if self.seed is None else self.seed + call_index,
        )
        request = ChatRequest(self.messages(content, system_prompt), sp, adapter=self.adapter)
        (result,) = self.engine.generate([request])
        texts = list(result.texts)
        if len(texts) != n:
            raise RuntimeError(f"engine returned {len(texts)} completions, {n} were asked")
        with self._lock:
            self.samples += n
        return texts

    def generate(self, content: str | Sequence[str | bytes], system_prompt: str | None = None, **kwargs: Any) -> str:
        """One completion (TextGrad's engine interface)."""
        overrides = {k: kwargs[k] for k in ("temperature", "max_tokens", "top_p") if kwargs.get(k) is not None}
        return self.sample(content, system_prompt, 1, **overrides)[0]

    def __call__(self, content: str | Sequence[str | bytes], **kwargs: Any) -> str:
        """Same as :meth:`generate`; TextGrad calls engines this way."""
        return self.generate(content, **kwargs)


@contextlib.contextmanager
def whole_value(*variables: tg.Variable) -> Iterator[None]:
    """Within the block, ``get_short_value()`` of each given variable returns its whole value.

    TextGrad's optimizer and backward prompts show a variable through
    ``get_short_value`` (first and last ten words). The override is set on the
    variable instances only, so other variables and other threads are unaffected.
    """
    saved: list[tuple[tg.Variable, Any]] = []
    for v in variables:
        if any(v is w for w, _ in saved):
            continue
        saved.append((v, v.__dict__.get("get_short_value")))

        def full(n_words_offset: int = 10, _v: tg.Variable = v) -> str:
            return _v.value

        v.get_short_value = full  # type: ignore[method-assign]
    try:
        yield
    finally:
        for v, previous in saved:
            if previous is None:
                v.__dict__.pop("get_short_value", None)
            else:
                v.get_short_value = previous  # type: ignore[method-assign]


def extract_tagged(reply: str, tags: Sequence[str] = DEFAULT_TAGS) -> str | None:
    """The text between the optimizer's tags, or ``None`` when the opening tag is absent or the text is empty.

    Like TextGrad, a missing closing tag keeps everything after the opening tag.
    """
    start, end = tags[0], tags[1]
    if start not in reply:
        return None
    value = reply.split(start, 1)[1].split(end, 1)[0].strip()
    return value or None


@dataclass
class StepOutcome:
    """What :func:`robust_step` did."""

    updated: bool
    """True when the optimizer produced a new value; False when the incumbent was kept."""
    attempts: int
    """Optimizer calls made (1 + retries)."""
    error: str | None = None
    """The last tag error when the incumbent was kept."""


def robust_step(optimizer: tg.TextualGradientDescent, max_tag_retries: int = 2) -> StepOutcome:
    """One ``optimizer.step()`` that shows whole variables and survives tag-less replies.

    A reply without the ``<IMPROVED_VARIABLE>`` tags makes TextGrad raise
    ``IndexError``; the step is then retried up to ``max_tag_retries`` times. If
    every attempt fails, each parameter keeps its value from before the call and no
    exception escapes. With several parameters a failure on any of them restores
    all of them and retries the whole step. An empty improved value counts as a
    failure too.
    """
    params = list(optimizer.parameters)
    before = [p.value for p in params]
    error: str | None = None
    attempts = 0
    for _ in range(max_tag_retries + 1):
        attempts += 1
        try:
            with whole_value(*params):
                optimizer.step()
        except IndexError as e:
            error = str(e)
        else:
            if all(str(p.value).strip() for p in params):
                return StepOutcome(updated=True, attempts=attempts)
            error = "the optimizer returned an empty value"
        for p, v in zip(params, before, strict=True):
            p.set_value(v)
    return StepOutcome(updated=False, attempts=attempts, error=error)


@dataclass
class Proposals:
    """Candidate values from :func:`propose_variants`."""

    texts: list[str]
    """``n`` values; a slot whose every attempt lacked the tags holds the incumbent."""
    kept_incumbent: int
    """How many slots fell back to the incumbent."""
    calls: int
    """Optimizer engine calls made."""
    prompt: str
    """The optimizer prompt (with the whole variable)."""


def optimizer_prompt(optimizer: tg.TextualGradientDescent, variable: tg.Variable) -> str:
    """TextGrad's update prompt for ``variable`` (role, whole value, gradients and context)."""
    with whole_value(variable):
        prompt = optimizer._update_prompt(variable)
    if not isinstance(prompt, str):
        raise TypeError("only text gradients are supported (TextGrad built a multimodal update prompt)")
    return prompt


def propose_variants(
    optimizer: tg.TextualGradientDescent,
    variable: tg.Variable,
    n: int,
    max_tag_retries: int = 2,
) -> Proposals:
    """Sample ``n`` updated values of ``variable`` from TextGrad's update prompt, leaving ``variable`` unchanged.

    The prompt is built once from the incumbent and its current gradients. With a
    :class:`ProtocolTextGradEngine` the ``n`` replies come from ONE request with
    ``n`` samples (other TextGrad engines are called ``n`` times). Replies without
    the tags are re-asked, only as many as are missing, up to ``max_tag_retries``
    more rounds; slots still missing then hold the incumbent.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    prompt = optimizer_prompt(optimizer, variable)
    engine = optimizer.engine
    system = optimizer.optimizer_system_prompt
    tags = optimizer.new_variable_tags
    found: list[str] = []
    calls = 0
    for _ in range(max_tag_retries + 1):
        need = n - len(found)
        if need == 0:
            break
        if isinstance(engine, ProtocolTextGradEngine):
            replies = engine.sample(prompt, system_prompt=system, n=need)
            calls += 1
        else:
            replies = [engine(prompt, system_prompt=system) for _ in range(need)]
            calls += need
        for reply in replies:
            value = extract_tagged(reply, tags)
            if value is not None:
                found.append(value)
    missing = n - len(found)
    return Proposals(texts=found + [variable.value] * missing, kept_incumbent=missing, calls=calls, prompt=prompt)


def run_backward(loss: tg.Variable, engine: EngineLM, *variables: tg.Variable) -> None:
    """``loss.backward(engine)`` with whole-value views of ``variables``.

    TextGrad refuses an explicit engine while a global backward engine is set; the
    global one is set aside for the duration of the call (under a lock) so that
    this function always uses ``engine``.
    """
    singleton = SingletonBackwardEngine()
    with _BACKWARD_LOCK:
        saved = singleton.get_engine()
        singleton.engine = None
        try:
            with whole_value(*variables):
                loss.backward(engine)
        finally:
            singleton.engine = saved


def redirect_textgrad_log(folder: str | Path) -> Path:
    """Send TextGrad's JSONL log to ``folder/textgrad.jsonl`` (replacing its file handlers)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "textgrad.jsonl"
    logger = logging.getLogger("textgrad")
    formatter: logging.Formatter | None = None
    for h in list(logger.handlers):
        if isinstance(h, logging.FileHandler):
            formatter = h.formatter
            logger.removeHandler(h)
            h.close()
    handler = logging.FileHandler(path)
    if formatter is not None:
        handler.setFormatter(formatter)
    logger.addHandler(handler)
    return path
