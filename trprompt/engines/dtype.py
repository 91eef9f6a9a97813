"""The one place that decides what ``dtype: auto`` means for HF engines and the LoRA SFT trainer.

On a CPU, ``auto`` is bfloat16 when the CPU computes it natively (AVX512-BF16 or
AMX: the ``avx512_bf16`` / ``amx_bf16`` flags of ``/proc/cpuinfo``), where it runs
the model's matmuls about four times faster than float32; otherwise float32 (bfloat16
without those instructions is emulated and slower than float32). On other devices
``auto`` keeps its previous meaning for each caller (an engine loads the
checkpoint's dtype, the SFT trainer picks bfloat16 on GPUs that support it), so it
resolves to ``"auto"``. Explicit dtypes pass through unchanged.

``TRPROMPT_CPU_BF16=0`` (or ``1``) overrides the CPU detection, e.g. to keep the
test suite in float32 on every machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Accepted dtype names (configs, engines, trainer)."""

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags that mean native bfloat16 arithmetic."""

ENV_OVERRIDE = "TRPROMPT_CPU_BF16"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags the CPU reports in ``/proc/cpuinfo`` (empty when the file is unreadable)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The native-bfloat16 flags this CPU reports (empty when none or the file is unreadable)."""
    flags = cpu_flags(cpuinfo)
    return [f for f in BF16_FLAGS if f in flags]


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU has AVX512-BF16 or AMX (or ``TRPROMPT_CPU_BF16=1`` says so)."""
    forced = os.environ.get(ENV_OVERRIDE)
    if forced is not None and forced.strip() != "":
        return forced.strip().lower() in ("1", "true", "yes", "on")
    return bool(cpu_bf16_flags(cpuinfo))


def resolve_dtype(requested: str, device: Any = "cpu", who: str = "model",
                  cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The dtype name to load with: ``requested`` unless it is ``auto`` (see the module docstring).

    Logs the choice at INFO (with the reason) when ``auto`` was resolved on a CPU.
    Raises ValueError for an unknown name.
    """
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {requested!r}")
    if requested != "auto":
        return requested
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    if device_type != "cpu":
        return "auto"
    forced = os.environ.get(ENV_OVERRIDE, "").strip()
    flags = cpu_bf16_flags(cpuinfo)
    chosen = "bfloat16" if cpu_has_native_bf16(cpuinfo) else "float32"
    if forced:
        why = f"{ENV_OVERRIDE}={forced}"
    elif flags:
        why = f"the CPU has native bfloat16 ({', '.join(flags)})"
    else:
        why = "the CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag)"
    log.info("%s: dtype auto -> %s on CPU: %s", who, chosen, why)
    return chosen


def torch_dtype(name: str) -> Any:
    """The torch dtype for a resolved name (``auto`` stays the string ``"auto"`` for ``from_pretrained``)."""
    import torch

    return {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_config_dtypes(models: Iterable[Any], sft: Any | None = None) -> None:
    """Fill ``resolved_dtype`` of HF model configs (and the SFT config) with what ``auto`` means on this machine.

    Engines resolve their own dtype where they run; this records the driver's
    answer in the run's config (``config.yaml``) so a reader can see it.
    """
    for m in models:
        if m is None:
            continue
        if m.engine == "hf":
            m.resolved_dtype = resolve_dtype(m.dtype, "cuda" if m.num_gpus > 0 else "cpu", who="config")
    if sft is not None:
        sft.resolved_dtype = resolve_dtype(sft.dtype, "cuda" if sft.use_gpu else "cpu", who="config")
