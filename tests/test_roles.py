"""The roles live in one module: trprompt.roles (no other module spells out the role list)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from trprompt.config import ModelsConfig
from trprompt.roles import OPTIMIZER_MODEL, PROMPT_MODEL, REWARD_MODEL, ROLES, TARGET_MODEL

ROOT = Path(__file__).resolve().parent.parent


def test_roles_are_the_models_config_fields_in_order() -> None:
    assert ROLES == (PROMPT_MODEL, TARGET_MODEL, REWARD_MODEL, OPTIMIZER_MODEL)
    fields = [f.name for f in dataclasses.fields(ModelsConfig)]
    assert [f for f in fields if f.endswith("_model")] == list(ROLES)


def test_no_other_module_spells_out_the_role_list() -> None:
    # a tuple/list/set literal holding every role name is a second copy of the role list
    # (a subset, such as the two roles one fingerprint covers, is not)
    offenders = []
    for pkg in ("trprompt", "actors", "cluster", "jobs", "bench"):
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name == "roles.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                    names = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                    if set(ROLES) <= names:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
