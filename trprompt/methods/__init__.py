"""Prompting methods behind one interface (:mod:`trprompt.methods.base`).

Importing this package stays cheap (the config validates names from
:mod:`trprompt.methods.names`); :func:`make_method` imports a method's module
only when it is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trprompt.methods.names import BASELINE_NAMES, METHOD_NAMES, OPTIMIZER_BASELINE_NAMES, TRPROMPT_NAMES

if TYPE_CHECKING:
    from trprompt.methods.base import Method
    from trprompt.templates import Templates

__all__ = ["BASELINE_NAMES", "METHOD_NAMES", "OPTIMIZER_BASELINE_NAMES", "TRPROMPT_NAMES", "make_method"]


def make_method(name: str, templates: Templates, settings: Any = None) -> Method:
    """Build method ``name``; ``settings`` is its settings object (TextGrad, OPRO or GEPA settings), if any."""
    from trprompt.methods.base import FixedMethod

    if name in BASELINE_NAMES:
        from trprompt.policies import fixed_policy

        return FixedMethod(name, fixed_policy(name, templates).instruction)
    if name == "textgrad":
        from trprompt.methods.textgrad_task import TextGradTaskMethod

        return TextGradTaskMethod(settings)
    if name == "opro":
        from trprompt.methods.opro import OPROMethod

        return OPROMethod(settings)
    if name == "gepa":
        from trprompt.methods.gepa_method import GEPAMethod

        return GEPAMethod(settings)
    if name in TRPROMPT_NAMES:
        from trprompt.methods.trprompt_method import TRPromptMethod

        return TRPromptMethod(name)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
