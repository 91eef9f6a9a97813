"""Imports run downward only: a lower layer never imports a higher one, not even lazily.

Every module of ``trprompt/``, ``actors/``, ``cluster/`` and ``jobs/`` is parsed (no
import is executed) and every ``import`` statement in it is checked, including the ones
inside functions and under ``TYPE_CHECKING``. The layers, bottom to top:

====  ==========================================================================
0     ``trprompt.roles``, ``trprompt.config``, ``trprompt.artifacts``
1     engines, data, grading, templates, storage, fingerprints, testing helpers
2     policies, evaluation, the synthetic set, the optimal-reward search, SFT, the run directory, the stage
      plan (fingerprints and reuse), report
3     the loop (Algorithm 1)
4     the methods (baselines and TRPrompt behind one interface)
5     the experiments (comparison, sweeps)
6     ``actors`` (engine actors and pools)
7     ``cluster`` (placement, Ray Train SFT, Tune, Serve, the job functions)
8     ``jobs`` (entry points and the ``trprompt`` command)
====  ==========================================================================

A module may import its own layer or any lower one. ``trprompt`` never imports Ray.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trprompt", "actors", "cluster", "jobs")

LAYERS: dict[str, int] = {
    "trprompt": 0,  # the package itself (its __init__ imports nothing); unlisted submodules: see below
    "trprompt.roles": 0,
    "trprompt.config": 0,
    "trprompt.artifacts": 0,
    "trprompt.engines": 1,
    "trprompt.data": 1,
    "trprompt.grading": 1,
    "trprompt.templates": 1,
    "trprompt.storage": 1,
    "trprompt.fingerprint": 1,
    "trprompt.testing": 1,
    "trprompt.policies": 2,
    "trprompt.evaluation": 2,
    "trprompt.reward_search": 2,
    "trprompt.sft": 2,
    "trprompt.run_dir": 2,
    "trprompt.report": 2,
    "trprompt.tracking": 2,
    "trprompt.stages": 2,
    "trprompt.synthetic_set": 2,
    "trprompt.loop": 3,
    "trprompt.methods": 4,
    "trprompt.experiments": 5,
    "actors": 6,
    "cluster": 7,
    "jobs": 8,
}
DEFAULT_TRPROMPT_LAYER = 2
"""A ``trprompt`` module not listed above sits with the algorithm's steps (list it to say otherwise)."""


def module_name(path: Path) -> str:
    """``trprompt/engines/base.py`` -> ``trprompt.engines.base`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """The layer of ``module`` (longest listed prefix); ``None`` for modules outside the project."""
    if module.split(".")[0] not in PACKAGES:
        return None
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    return DEFAULT_TRPROMPT_LAYER if parts[0] == "trprompt" and len(parts) > 1 else LAYERS[parts[0]]


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # ``from trprompt import loop`` imports the submodule trprompt.loop (a name is checked as a module)
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return out


def project_modules() -> list[tuple[Path, str]]:
    """Every Python module of the layered packages."""
    return [(p, module_name(p)) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_every_import_runs_downward() -> None:
    upward = []
    for path, module in project_modules():
        mine = layer_of(module)
        assert mine is not None
        for line, target in imported_modules(path, module):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {module} (layer {mine}) imports {target} "
                              f"(layer {theirs})")
    assert upward == [], "imports that run back up:\n" + "\n".join(upward)


def test_trprompt_never_imports_ray() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {target}"
        for path, module in project_modules() if module.startswith("trprompt")
        for line, target in imported_modules(path, module) if target.split(".")[0] == "ray"
    ]
    assert offenders == []


def test_the_checker_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    fake = tmp_path / "fake_mod.py"
    fake.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n    from cluster.resources import RoleEngines\n"
        "def f():\n    from jobs.train import main\n    return main\n"
    )
    found = {m: line for line, m in imported_modules(fake, "trprompt.engines.fake_mod")}
    assert found["jobs.train"] == 6 and found["cluster.resources"] == 4 and found["trprompt.engines.sibling"] == 2
    assert layer_of("jobs.train") == 8 > layer_of("cluster.resources") == 7 > layer_of("trprompt.engines.fake_mod")
    assert layer_of("trprompt.engines.hf") == 1 and layer_of("trprompt.experiments.sweep.trials") == 5
    assert layer_of("trprompt.not_listed_yet") == DEFAULT_TRPROMPT_LAYER and layer_of("numpy") is None
