"""Fingerprints: short stable hashes of exactly the settings a result depends on.

A cached result (a stage of a run, a comparison cell, a sweep trial) is reusable only
when the fingerprint it was written with equals the one computed now. Each cache
records its *inputs* (a flat mapping of dotted names to JSON values) next to the
fingerprint, so a mismatch can say which settings changed (:func:`changed_fields`).

Use :func:`config_fields` and :func:`model_identity` to build the inputs and :func:`fingerprint` to hash them::

    inputs = {**config_fields(cfg, "dataset.name", "seed"), "grader_version": grader_version()}
    fp = fingerprint(inputs)

This module imports nothing from the rest of the package at import time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

GRADER_VERSION_FALLBACK = "1"
"""Grader version used when :mod:`trprompt.grading` does not declare ``GRADER_VERSION``."""


def canonical_json(obj: Any) -> str:
    """Deterministic JSON text of ``obj`` (sorted keys, no spaces; dataclasses and paths become plain data)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}: {obj!r}")


def fingerprint(obj: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def text_fingerprint(text: str, length: int = 16) -> str:
    """SHA-256 prefix of a text (for long texts stored by hash in the inputs, e.g. t*)."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def grader_version(spec: str | None = None) -> str:
    """The grading rules' version: ``trprompt.grading.GRADER_VERSION`` if declared, else the fallback.

    With ``spec`` (a task's grader, e.g. ``"numeric"`` or ``"python: pkg.mod:fn"``): that grader's own
    version (a user metric's changes with its source file).
    """
    try:
        from trprompt import grading
    except ImportError:  # pragma: no cover - grading always exists in this package
        return GRADER_VERSION_FALLBACK
    if spec is not None:
        return str(grading.grader_version(spec))
    return str(getattr(grading, "GRADER_VERSION", GRADER_VERSION_FALLBACK))


def config_fields(cfg: Any, *paths: str) -> dict[str, Any]:
    """``{dotted path: value}`` for each of ``paths`` in a (nested dataclass or dict) config.

    A path naming a nested section takes the whole section (as plain data).
    """
    out: dict[str, Any] = {}
    for path in paths:
        cur = cfg
        for part in path.split("."):
            cur = cur.get(part) if isinstance(cur, Mapping) else getattr(cur, part)
        if dataclasses.is_dataclass(cur) and not isinstance(cur, type):
            cur = dataclasses.asdict(cur)
        out[path] = cur
    return out


MODEL_IDENTITY_FIELDS = ("model", "engine", "dtype", "base_url")
"""The :class:`~trprompt.config.ModelConfig` fields that change a model's outputs (not placement or timeouts)."""


def effective_dtype(model_cfg: Any) -> str | None:
    """The dtype a model config's weights are computed in, as far as the driver can tell.

    ``resolved_dtype`` when a run has recorded it; otherwise ``dtype``, with ``auto`` on an HF engine
    on CPU resolved the way the engine will resolve it (bfloat16 on CPUs with native bfloat16 or
    ``TRPROMPT_CPU_BF16=1``, else float32). ``auto`` elsewhere (GPUs, vLLM) stays ``auto``.
    """
    get = model_cfg.get if isinstance(model_cfg, Mapping) else lambda k: getattr(model_cfg, k, None)
    resolved = get("resolved_dtype")
    if resolved:
        return str(resolved)
    dtype = get("dtype")
    if dtype == "auto" and get("engine") == "hf" and not (get("num_gpus") or get("use_gpu")):
        from trprompt.engines.dtype import cpu_has_native_bf16

        return "bfloat16" if cpu_has_native_bf16() else "float32"
    return dtype


def model_identity(model_cfg: Any, prefix: str) -> dict[str, Any]:
    """``{prefix.field: value}`` for the fields of a model config that decide what it answers.

    ``dtype`` is the effective one (:func:`effective_dtype`): ``auto`` that resolves to bfloat16 on
    one machine and float32 on another gives different fingerprints.
    """
    if model_cfg is None:
        return {f"{prefix}": None}
    get = model_cfg.get if isinstance(model_cfg, Mapping) else lambda k: getattr(model_cfg, k)
    out = {f"{prefix}.{k}": get(k) for k in MODEL_IDENTITY_FIELDS}
    out[f"{prefix}.dtype"] = effective_dtype(model_cfg)
    return out


def changed_fields(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """Names whose values differ between two input mappings (added and removed names included), sorted."""
    if old is None:
        return sorted(new)
    keys: Iterable[str] = set(old) | set(new)
    return sorted(k for k in keys if canonical_json(old.get(k)) != canonical_json(new.get(k)))


def dir_digest(path: str | Path, length: int = 16) -> str:
    """Content hash of the files directly in a folder (names and bytes), e.g. a LoRA adapter."""
    p = Path(path)
    h = hashlib.sha256()
    for name in sorted(f.name for f in p.iterdir() if f.is_file()):
        h.update(name.encode() + b"\0")
        h.update((p / name).read_bytes())
    return h.hexdigest()[:length]
