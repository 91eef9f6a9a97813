"""Building and loading the engines' native CPU kernels (``trprompt/engines/csrc/*.c``).

Each kernel is one C file compiled on first use with the system C compiler (``$CC``, else
``cc``/``gcc``; about a second) into ``$TRPROMPT_CACHE/native`` (default
``~/.cache/trprompt/native``), one library per source, compiler version and flag set, written
atomically so that concurrent builders never load a half-written file. The libraries link
OpenMP by its usual name (``libgomp.so.1``), which resolves to the runtime torch has already
loaded, so the kernels share torch's threads instead of starting a second pool. Callers that
cannot build (no compiler, an old one) get a ``RuntimeError`` and keep their PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .dtype import cpu_flags

CSRC = Path(__file__).with_name("csrc")
"""The kernels' C sources."""


def build_dir() -> Path:
    """Where compiled kernels are kept: ``$TRPROMPT_CACHE/native`` or ``~/.cache/trprompt/native``."""
    root = os.environ.get("TRPROMPT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "trprompt") / "native"


def find_compiler() -> str | None:
    """The C compiler to use: ``$CC`` if set and found, else ``cc`` or ``gcc``; ``None`` when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def build(source: Path, flags: Sequence[str], compiler: str | None, out_dir: Path | None = None) -> Path:
    """Compile ``source`` with ``flags`` (once per version of the C sources, compiler version and flags); its path.

    Raises ``RuntimeError`` with the compiler's message when it cannot be built.
    """
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{compiler} --version failed: {e}") from e
    # Every C file beside the source counts: a kernel may #include another one.
    sources = b"".join(p.read_bytes() for p in sorted(source.parent.glob("*.[ch]")) if p != source)
    key = hashlib.sha256(source.read_bytes() + sources + version.encode() + " ".join(flags).encode()).hexdigest()[:16]
    folder = out_dir or build_dir()
    target = folder / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent builder's file is as good as this one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def setting(env: str, modes: Sequence[str]) -> str:
    """The value of the environment setting ``env`` (lower-cased; ``modes[0]`` when unset or empty).

    A value not in ``modes`` raises ``ValueError`` naming the setting and the allowed values.
    """
    value = os.environ.get(env, "").strip().lower() or modes[0]
    if value not in modes:
        raise ValueError(f"{env} must be one of {list(modes)}, got {value!r}")
    return value


def cpu_has(flags: Sequence[str], cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU reports every one of ``flags`` (``/proc/cpuinfo`` names)."""
    have = cpu_flags(cpuinfo)
    return all(f in have for f in flags)


def open_library(path: Path, abi_symbol: str, abi: int = 1) -> ctypes.CDLL:
    """Load the compiled kernel at ``path``; ``RuntimeError`` unless ``abi_symbol()`` returns ``abi``."""
    lib = ctypes.CDLL(str(path))
    if getattr(lib, abi_symbol)() != abi:
        raise RuntimeError(f"kernel ABI mismatch in {path.name}")
    return lib


def build_and_open(source: Path, flags: Sequence[str], compiler: str | None, abi_symbol: str,
                   setup: Callable[[ctypes.CDLL], None]) -> tuple[ctypes.CDLL | None, str | None]:
    """Build ``source``, load it, check its ABI and let ``setup`` declare its functions (or refuse it).

    Returns ``(library, None)``, or ``(None, why)`` when any step fails (no compiler, a compiler
    error, a load or ABI failure, or a ``RuntimeError`` from ``setup``): the callers keep their
    PyTorch path and report the reason.
    """
    try:
        lib = open_library(build(source, flags, compiler), abi_symbol)
        setup(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, str(e)
    return lib, None
