#!/usr/bin/env bash
# GPU check, one command on a machine with a CUDA GPU (about 8 minutes at most):
#   1. the correctness tests on CUDA: the Triton label-JSD kernel compiled for the GPU
#      (TRITON_INTERPRET=0) against the float64 reference in fp32, fp16 and bf16
#      (bf16 gradients at 1e-2 relative), torch.compile with Triton, and the
#      advantage op's tests where they exist;
#   2. python -m benchmarks.bench_rewards (full grid, a time budget keeps it near 4 min);
#   3. python -m benchmarks.bench_advantage, if that benchmark exists.
# Results: benchmarks/results/<device>/*.{json,md}; the log: benchmarks/results/gpu_check-<time>.log.
# When $OUT is set (a folder that is collected afterwards), the log and results are copied there.
# Assumes a fresh machine with the repository copied and python3 with pip; torch with CUDA
# is expected preinstalled and is never reinstalled (the package installs with --no-deps).
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

step "environment"
"$PY" - <<'EOF'
import sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU; this script is for a machine with one")
print("device:", torch.cuda.get_device_name(0))
EOF
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv || true

step "install (only what is missing)"
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('shala.kernels') is None)" 2>/dev/null; then
  if ! "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    echo "the build with the C++/CUDA extension failed: installing without it (SHALA_NO_EXT=1)"
    SHALA_NO_EXT=1 "$PY" -m pip install --no-build-isolation --no-deps -e .
  fi
fi
for mod in triton pytest numpy scipy packaging; do
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    "$PY" -m pip install "$mod" || echo "could not install $mod"
  fi
done
"$PY" -c "import shala, triton; print('shala', shala.__version__, '| triton', triton.__version__, '| extension', shala.has_extension())"

# Compiled Triton on the GPU; CPU-only parametrisations skip themselves without the interpreter.
export TRITON_INTERPRET=0
unset SHALA_BACKEND || true
TESTS=(tests/test_label_jsd.py tests/test_compile_label_jsd.py tests/test_reference.py)
for f in tests/test_advantage*.py; do [ -e "$f" ] && TESTS+=("$f"); done
run_step "tests on CUDA" 150 "$PY" -m pytest -q -rs --durations=10 "${TESTS[@]}"

run_step "bench_rewards" 330 "$PY" -m benchmarks.bench_rewards --budget 210
if [ -f benchmarks/bench_advantage.py ]; then
  run_step "bench_advantage" 90 "$PY" -m benchmarks.bench_advantage
fi

if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  cp "$LOG" "$OUT/" || true
  # Only what this run wrote, named <device>__<file>.
  find benchmarks/results -mindepth 2 -maxdepth 2 -newer "$STAMP" \( -name '*.md' -o -name '*.json' \) -print |
    while read -r f; do cp "$f" "$OUT/$(basename "$(dirname "$f")")__$(basename "$f")" || true; done
fi

step "done in $((SECONDS - T0)) s; log: $LOG"
if [ "${#FAILED[@]}" -ne 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all steps passed"
