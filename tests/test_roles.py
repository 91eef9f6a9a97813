"""The roles live in one module: trprompt.roles (no other module spells out the role list)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from trprompt.config import ModelsConfig
from trprompt.roles import OPTIMIZER_MODEL, PROMPT_MODEL, REWARD_MODEL, ROLES, TARGET_MODEL

ROOT = Path(__file__).resolve().parent.parent


def test_roles_are_the_models_config_fields_in_order() -> None:
    assert ROLES == (PROMPT_MODEL, TARGET_MODEL, REWARD_MODEL, OPTIMIZER_MODEL)
    fields = [f.name for f in dataclasses.fields(ModelsConfig)]
    assert [f for f in fields if f.endswith("_model")] == list(ROLES)


def test_no_other_module_spells_out_the_role_list() -> None:
    # two or more role names in one tuple/list literal = a second copy of the role list
    pattern = re.compile(r'"(prompt|target|reward|optimizer)_model",\s*"(prompt|target|reward|optimizer)_model"')
    offenders = []
    for pkg in ("trprompt", "actors", "cluster", "jobs", "bench"):
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name != "roles.py" and pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
