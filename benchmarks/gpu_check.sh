#!/usr/bin/env bash
# GPU check, one command on a machine with a CUDA GPU (about 8 minutes at most):
#   1. the correctness tests on CUDA: the Triton label-JSD kernel compiled for the GPU
#      (TRITON_INTERPRET=0) against the float64 reference in fp32, fp16 and bf16
#      (bf16 gradients at 1e-2 relative), torch.compile with Triton; meanwhile the
#      C++/CUDA extension builds in the background;
#   2. python -m benchmarks.bench_rewards (full grid, the target shapes first; a time
#      budget stops starting new shapes: what is left of GPU_CHECK_SECONDS, default 470,
#      or REWARDS_BUDGET seconds);
#   3. the advantage op's tests (CUDA op included) and python -m benchmarks.bench_advantage
#      on the GPU.
# Results: benchmarks/results/<device>/*.{json,md}; the log: benchmarks/results/gpu_check-<time>.log.
# When $OUT is set (a folder that is collected afterwards), the log and results are copied there.
# Assumes a fresh machine with the repository copied and python3 with pip; torch with CUDA
# is expected preinstalled and is never reinstalled (the package installs with --no-deps).
# SHALA_COMMIT names the commit in the results where the tree has no .git.
# Exits non-zero if the tests or a benchmark failed; later steps still run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
mkdir -p benchmarks/results
LOG="benchmarks/results/gpu_check-$(date -u +%Y%m%dT%H%M%SZ).log"
STAMP=$(mktemp)  # results newer than this were written by this run
exec > >(tee -a "$LOG") 2>&1
T0=$SECONDS
step() { echo; echo "== [$((SECONDS - T0)) s] $*"; }
FAILED=()

run_step() {  # run_step NAME TIMEOUT_SECONDS COMMAND...: time it, record a failure, go on
  local name=$1 limit=$2 start=$SECONDS rc=0
  shift 2
  step "$name: $*"
  timeout --signal=INT --kill-after=20 "$limit" "$@" || rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  if [ "$rc" -ne 0 ]; then FAILED+=("$name (exit $rc)"); fi
}

collect() {  # copy the log and this run's results to $OUT, named <device>__<file>
  if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    cp "$LOG" "$OUT/" || true
    find benchmarks/results -mindepth 2 -maxdepth 2 -newer "$STAMP" \( -name '*.md' -o -name '*.json' \) -print |
      while read -r f; do cp "$f" "$OUT/$(basename "$(dirname "$f")")__$(basename "$f")" || true; done
  fi
}
trap collect EXIT

step "environment"
"$PY" - <<'PYEOF'
import sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU; this script is for a machine with one")
print("device:", torch.cuda.get_device_name(0))
PYEOF
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv || true

step "install the Python package (the extension builds next, in the background)"
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('shala.kernels') is None)" 2>/dev/null; then
  SHALA_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi
for mod in triton pytest numpy scipy packaging; do
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    "$PY" -m pip install "$mod" || echo "could not install $mod"
  fi
done
BUILD_LOG=$(mktemp)
(FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} "$PY" setup.py -q build_ext --inplace >"$BUILD_LOG" 2>&1; echo "build exit $?" >>"$BUILD_LOG") &
BUILD_PID=$!

# Compiled Triton on the GPU; CPU-only parametrisations skip themselves without the interpreter.
export TRITON_INTERPRET=0
unset SHALA_BACKEND || true
run_step "kernel tests on CUDA" 150 "$PY" -m pytest -q -rs --durations=10 \
  tests/test_label_jsd.py tests/test_compile_label_jsd.py tests/test_reference.py

step "extension build (waiting for it)"
wait "$BUILD_PID" || true
tail -n 30 "$BUILD_LOG"
"$PY" -c "import shala, triton; print('shala', shala.__version__, '| triton', triton.__version__, '| extension', shala.has_extension())"

# The benchmark gets what is left of GPU_CHECK_SECONDS (default 470: the whole check under 8
# minutes) after the steps so far, less 40 s for the advantage op; REWARDS_BUDGET overrides it.
left=$(( ${GPU_CHECK_SECONDS:-470} - (SECONDS - T0) - 40 ))
budget=${REWARDS_BUDGET:-$(( left > 60 ? left : 60 ))}
run_step "bench_rewards" $((budget + 120)) "$PY" -m benchmarks.bench_rewards --budget "$budget"
run_step "advantage op tests on CUDA" 90 "$PY" -m pytest -q -rs tests/test_advantages_op.py
run_step "bench_advantage" 90 "$PY" -m benchmarks.bench_advantage --device cuda

step "done in $((SECONDS - T0)) s; log: $LOG"
if [ "${#FAILED[@]}" -ne 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all steps passed"
