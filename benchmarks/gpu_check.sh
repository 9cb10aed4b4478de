#!/usr/bin/env bash
# The one command for a lent GPU machine: the CUDA tests of the model layer, then
# benchmarks/gpu_check.py (encoder / decoder / encode + decode rates, peak memory).
#
# That machine (one H200; Python, numpy, torch, timm; maybe pytest; no ray, rasterio,
# geopandas, shapely, pyproj, pydantic; no package index) gets the working tree plus the
# carried paths, 64 MiB at most. Prepare here, with the project's venv:
#
#     bash benchmarks/gpu_bundle.sh          # -> gpu_bundle/ (git-ignored, ~51 MiB: model
#                                            #    code, mobile_sam.pt, 4 Banepa tiles + boxes)
#
# then call it through the device tool, from the repository root:
#
#     run(command="bash benchmarks/gpu_check.sh", carry=["gpu_bundle"], timeout_s=540)
#
# Results come back under $OUT: gpu_check.json (also printed), gpu_tests.log and one
# pytest_<file>.xml per test file run. The whole run keeps under GPU_CHECK_TOTAL_S
# (default 480 s): tests get at most 150 s, gpu_check.py the rest (its own time guard
# stops measuring early and lists what it skipped). Extra arguments go to gpu_check.py,
# e.g. `bash benchmarks/gpu_check.sh --models mobile_sam`.
#
# Tests: every tests/test_*.py with a `torch.cuda.is_available()` skip, plus
# tests/test_model_light_import.py, run with `pytest --noconftest -m gpu` (conftest.py
# needs rasterio). A file that cannot be collected here (it imports ray, rasterio,
# shapely ...) is skipped and named in the output. Without pytest, tests are skipped.
# Exit status: 0 when the tests that ran passed and gpu_check.py succeeded.
set -euo pipefail

START_S=$SECONDS
TOTAL_S="${GPU_CHECK_TOTAL_S:-480}"
TESTS_MAX_S=150
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
OUT="${OUT:-$ROOT/out}"
mkdir -p "$OUT"
BUNDLE="$ROOT/gpu_bundle"
LOG="$OUT/gpu_tests.log"
: >"$LOG"

say() { echo "[gpu_check.sh] $*" | tee -a "$LOG"; }
with_timeout() {  # with_timeout SECONDS CMD...: coreutils timeout where there is one
    local limit="$1"; shift
    if command -v timeout >/dev/null; then timeout --kill-after=10 "$limit" "$@"; else "$@"; fi
}

if [[ ! -d "$BUNDLE/py" || ! -f "$BUNDLE/mobile_sam.pt" ]]; then
    say "gpu_bundle/ is missing or incomplete: run 'bash benchmarks/gpu_bundle.sh' and carry gpu_bundle"
    exit 2
fi

say "python $("$PY" -c 'import sys; print(sys.version.split()[0])'), $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())')"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 | sed 's/^/[nvidia-smi] /' | tee -a "$LOG" || true
fi

PYPATH="$BUNDLE/py:$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # an outer PYTHONPATH (e.g. benchmarks/import_blocker) is kept
if ! "$PY" -c "import timm" >/dev/null 2>&1; then
    PYPATH="$BUNDLE/timm_fallback:$PYPATH"
    say "timm does not import here: the bundled stand-in (gpu_bundle/timm_fallback) is used"
fi
export SAM_GEO_WEIGHTS_DIR="$BUNDLE" SAM_GEO_OFFLINE=1
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1  # no third-party pytest plugins: none is needed, any may be broken here

# --- 1. CUDA tests of the model layer ----------------------------------------------------
tests_rc=0
if "$PY" -c "import pytest" >/dev/null 2>&1; then
    mapfile -t files < <( { echo tests/test_model_light_import.py; grep -l "cuda.is_available" tests/test_*.py || true; } | awk '!seen[$0]++')
    ran=() skipped=()
    for file in "${files[@]}"; do
        left=$((TESTS_MAX_S - (SECONDS - START_S)))
        if ((left < 30)); then skipped+=("$file (test time used up)"); continue; fi
        name="$(basename "$file" .py)"
        collect_rc=0
        PYTHONPATH="$PYPATH" with_timeout 60 "$PY" -m pytest --noconftest -p no:cacheprovider -q --collect-only -m gpu "$file" \
            >"$OUT/collect_$name.txt" 2>&1 || collect_rc=$?
        if ((collect_rc == 5)); then skipped+=("$file (no gpu tests)"); continue; fi
        if ((collect_rc != 0)); then
            why="$(grep -m1 -oE "(ModuleNotFoundError|ImportError): .*" "$OUT/collect_$name.txt" || echo "collection failed, rc $collect_rc")"
            skipped+=("$file (cannot be imported here: $why)")
            continue
        fi
        say "running the gpu tests of $file"
        rc=0
        PYTHONPATH="$PYPATH" with_timeout "$left" "$PY" -m pytest --noconftest -p no:cacheprovider -q -rs -m gpu \
            --durations=5 --junitxml="$OUT/pytest_$name.xml" "$file" 2>&1 | tee -a "$LOG" || rc=$?
        ran+=("$file (rc $rc)")
        if ((rc != 0)); then tests_rc=1; fi
        rm -f "$OUT/collect_$name.txt"
    done
    for item in "${ran[@]+"${ran[@]}"}"; do say "tests run: $item"; done
    for item in "${skipped[@]+"${skipped[@]}"}"; do say "tests skipped: $item"; done
else
    say "pytest is not importable here: tests skipped"
fi

# --- 2. the measurements -----------------------------------------------------------------
budget=$((TOTAL_S - (SECONDS - START_S) - 30))
if ((budget < 60)); then budget=60; fi
say "gpu_check.py with a budget of ${budget} s"
check_rc=0
with_timeout $((budget + 60)) "$PY" benchmarks/gpu_check.py --bundle "$BUNDLE" --json "$OUT/gpu_check.json" \
    --budget-s "$budget" "$@" || check_rc=$?
say "done in $((SECONDS - START_S)) s: tests rc $tests_rc, gpu_check.py rc $check_rc"
if ((check_rc != 0)); then exit "$check_rc"; fi
exit "$tests_rc"
