"""Fingerprints: stable, sensitive to every input, and able to name what changed."""

from __future__ import annotations

from trprompt.config import config_from_dict
from trprompt.fingerprint import (
    GRADER_VERSION_FALLBACK,
    canonical_json,
    changed_fields,
    config_fields,
    dir_digest,
    fingerprint,
    grader_version,
    model_identity,
)


def test_fingerprint_is_order_independent_and_sensitive():
    a = {"dataset.name": "gsm8k", "seed": 0, "nested": {"x": 1, "y": [1, 2]}}
    b = {"nested": {"y": [1, 2], "x": 1}, "seed": 0, "dataset.name": "gsm8k"}
    assert fingerprint(a) == fingerprint(b) and len(fingerprint(a)) == 16
    assert fingerprint({**a, "seed": 1}) != fingerprint(a)
    assert canonical_json({"b": 1, "a": 2}) == '{"a":2,"b":1}'


def test_changed_fields_names_added_removed_and_changed():
    old = {"seed": 0, "dataset.test_limit": 5, "gone": 1}
    new = {"seed": 0, "dataset.test_limit": 7, "added": 2}
    assert changed_fields(old, new) == ["added", "dataset.test_limit", "gone"]
    assert changed_fields(None, {"a": 1}) == ["a"]
    assert changed_fields(new, dict(new)) == []


def test_config_fields_and_model_identity():
    cfg = config_from_dict({"dataset": {"name": "svamp", "test_limit": 3}, "seed": 4})
    got = config_fields(cfg, "dataset.name", "dataset.test_limit", "seed", "loop")
    assert got["dataset.name"] == "svamp" and got["dataset.test_limit"] == 3 and got["seed"] == 4
    assert got["loop"]["iterations"] == cfg.loop.iterations
    ident = model_identity(cfg.models.prompt_model, "prompt_model")
    assert ident == {"prompt_model.model": "smollm2-135m-instruct", "prompt_model.engine": "hf",
                     "prompt_model.dtype": "auto", "prompt_model.base_url": None}
    # placement settings are not part of a model's identity
    cfg.models.prompt_model.num_actors = 3
    assert model_identity(cfg.models.prompt_model, "prompt_model") == ident


def test_grader_version_and_dir_digest(tmp_path):
    assert isinstance(grader_version(), str) and grader_version()
    assert GRADER_VERSION_FALLBACK
    (tmp_path / "w.bin").write_bytes(b"abc")
    d1 = dir_digest(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"abd")
    assert dir_digest(tmp_path) != d1
