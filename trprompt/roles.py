"""The model roles of the paper: the one home of their names.

Algorithm 1 uses four models: the prompt model Π (LoRA-trained), the frozen
target model, the frozen reward model R, and the optimizer model that drives
the TextGrad search over t* (it falls back to the reward model's config when
unset). Engines, budgets, token tables and placement are keyed by these
strings; import them from here instead of spelling them out.
"""

from __future__ import annotations

import typing
from typing import Literal

Role = Literal["prompt_model", "target_model", "reward_model", "optimizer_model"]
"""One model role (a plain string, so role-keyed dicts stay JSON/YAML friendly)."""

PROMPT_MODEL: Role = "prompt_model"
"""Π(q, t*): writes a query-aware instruction; the model that is LoRA-trained."""
TARGET_MODEL: Role = "target_model"
"""The frozen model that answers the question with Π's instruction."""
REWARD_MODEL: Role = "reward_model"
"""R(p, q, ŷ, y*): writes the textual critique of an instruction."""
OPTIMIZER_MODEL: Role = "optimizer_model"
"""The TextGrad backward/optimizer engine of the optimal-reward search."""

ROLES: tuple[Role, ...] = typing.get_args(Role)
"""Every role, in the order runs report them (prompt, target, reward, optimizer)."""

