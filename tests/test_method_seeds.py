"""Seeds reach the baselines' optimizers: the same seed gives the same search, another seed another one.

The scripted optimizer draws each proposal from a random generator keyed by the request's
sampling seed, so a method whose seed never reaches its optimizer requests would propose the
same texts under every seed (and the different-seed assertion fails).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from test_methods import KEYWORD, TRAIN, VAL, Scripted

from trprompt.config import GenerationConfig
from trprompt.engines.base import ChatRequest
from trprompt.engines.echo import EchoEngine
from trprompt.methods import make_method
from trprompt.methods.base import MethodBudget, MethodContext
from trprompt.roles import ROLES
from trprompt.templates import Templates

T = Templates()


class SeededOptimizer(Scripted):
    """:class:`Scripted`, but every optimizer proposal carries a number drawn from the request's seed."""

    def __init__(self) -> None:
        super().__init__()
        self.rngs: dict[tuple[str, int | None], random.Random] = {}
        self.seeds: list[int | None] = []

    def _draw(self, kind: str, request: ChatRequest) -> int:
        seed = request.sampling.seed
        self.seeds.append(seed)
        return self.rngs.setdefault((kind, seed), random.Random(f"{kind}:{seed}")).randint(0, 10**9)

    def __call__(self, request: ChatRequest) -> str:
        msgs = list(request.messages)
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
        user = msgs[-1]["content"]
        if "<IMPROVED_VARIABLE>" in user or "IMPROVED_VARIABLE" in system:
            n = self._draw("textgrad", request)
            return f"<IMPROVED_VARIABLE>Use the {KEYWORD} ({n}).</IMPROVED_VARIABLE>"
        if "You are improving the instruction given to a math assistant" in user:
            return f"<INS>Say the {KEYWORD} ({self._draw('opro', request)}).</INS>"
        if "I provided an assistant with the following instructions" in user:
            return f"```\nRemember the {KEYWORD} ({self._draw('gepa', request)}).\n```"
        return super().__call__(request)


def fit(tmp_path: Path, name: str, seed: int) -> tuple[str, list[str], list[int | None]]:
    """Fit ``name`` with a fresh scripted engine; (final instruction, every scored text, optimizer seeds)."""
    responder = SeededOptimizer()
    engine = EchoEngine(responder)
    ctx = MethodContext.create(
        {r: engine for r in ROLES}, train=TRAIN, val=VAL, templates=T,
        generation=GenerationConfig(batch_size=8, target_max_tokens=64),
        budget=MethodBudget(max_metric_calls=80), seed=seed, work_dir=tmp_path / f"{name}-{seed}-{random.random()}",
    )
    settings: dict[str, Any] = {
        "textgrad": {"steps": 2, "candidates_per_step": 2, "minibatch_size": 4},
        "opro": {"steps": 2, "proposals_per_step": 2, "exemplars": 2},
        "gepa": {"minibatch_size": 3, "max_iterations": 3},
    }[name]
    from trprompt.config import TRPromptConfig
    from trprompt.experiments.compare.config import CompareConfig, compare_config_from_dict

    cmp: CompareConfig = compare_config_from_dict({"methods": [name], name: settings}, TRPromptConfig())
    policy = make_method(name, T, cmp.settings_for(name)).fit(ctx)
    return policy.instruction, [h["text"] for h in ctx.history], responder.seeds


@pytest.mark.parametrize("name", ["textgrad", "opro", "gepa"])
def test_same_seed_same_search_other_seed_other_search(tmp_path, name):
    best0, texts0, seeds0 = fit(tmp_path, name, seed=0)
    again, texts_again, seeds_again = fit(tmp_path, name, seed=0)
    best1, texts1, seeds1 = fit(tmp_path, name, seed=1)
    assert KEYWORD in best0  # the search really found a proposal (not the starting instruction)
    assert (best0, texts0, seeds0) == (again, texts_again, seeds_again)
    assert seeds0 and None not in seeds0  # every optimizer request carried a seed
    assert seeds1 != seeds0  # ... derived from the method's seed
    assert best1 != best0 and texts1 != texts0
