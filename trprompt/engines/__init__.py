"""Language-model engines behind one protocol (see :mod:`trprompt.engines.base`).

``import trprompt.engines`` stays light: the protocol types, the wrappers
(:mod:`trprompt.engines.wrappers`) and :class:`EchoEngine` are imported eagerly;
:class:`HFEngine` (torch, transformers), :class:`OpenAIEngine` (openai),
:func:`build_engine`, :func:`resolve_model` and :class:`ModelNotFoundError` are
imported on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trprompt.engines.base import (
    AdapterNotFoundError,
    ChatRequest,
    ChatResult,
    Engine,
    Message,
    SamplingParams,
    Usage,
)
from trprompt.engines.echo import EchoEngine
from trprompt.engines.wrappers import AdapterNamespace, Budget, BudgetExceededError, MeteredEngine

if TYPE_CHECKING:
    from trprompt.engines.factory import build_engine
    from trprompt.engines.hf import HFEngine
    from trprompt.engines.model_store import ModelNotFoundError, resolve_model
    from trprompt.engines.openai_engine import OpenAIEngine

_LAZY = {
    "HFEngine": "trprompt.engines.hf",
    "OpenAIEngine": "trprompt.engines.openai_engine",
    "build_engine": "trprompt.engines.factory",
    "resolve_model": "trprompt.engines.model_store",
    "ModelNotFoundError": "trprompt.engines.model_store",
}

__all__ = [
    "AdapterNamespace",
    "AdapterNotFoundError",
    "Budget",
    "BudgetExceededError",
    "ChatRequest",
    "ChatResult",
    "EchoEngine",
    "Engine",
    "HFEngine",
    "Message",
    "MeteredEngine",
    "ModelNotFoundError",
    "OpenAIEngine",
    "SamplingParams",
    "Usage",
    "build_engine",
    "resolve_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
