#!/usr/bin/env bash
# One GPU session in one call (the device tool's machine has torch, triton, transformers and peft, no Ray or
# pydantic, and nothing installs from a registry): compiled Triton checked against float64 and the kernel
# benchmark, the engine on the GPU checked against the CPU engine and the engine benchmark, then the kernel tests
# on CUDA. Each step has its own time limit and the next step runs even if one fails; logs and JSON go to $OUT.
#
#   bash benchmarks/gpu_session.sh [quick|full]     (OUT defaults to benchmarks/results)
set -u
MODE=${1:-quick}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
KERNEL_S=${KERNEL_S:-150} ENGINE_S=${ENGINE_S:-170} SGMV_S=${SGMV_S:-90} TESTS_S=${TESTS_S:-60}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton, transformers, peft; print(sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  nproc
} 2>&1 | tee "$OUT/env.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit (0: skip), log to $OUT/NAME.log, report the exit status
  local name=$1 limit=$2
  shift 2
  [ "$limit" -gt 0 ] || return 0
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/env.txt"
  tail -n 40 "$OUT/$name.log"
}

if [ "$MODE" = full ]; then QUICK=(); else QUICK=(--quick); fi
# KERNEL_ARGS / ENGINE_ARGS override the mode per script, e.g. ENGINE_ARGS=--quick with mode full.
read -r -a KERNEL_FLAGS <<< "${KERNEL_ARGS:-${QUICK[*]}}"
read -r -a ENGINE_FLAGS <<< "${ENGINE_ARGS:-${QUICK[*]}}"
step kernels "$KERNEL_S" python3 benchmarks/gpu_kernels.py "${KERNEL_FLAGS[@]}" --out-dir "$OUT"
step sgmv_paths "$SGMV_S" python3 benchmarks/gpu_sgmv_paths.py --out-dir "$OUT"
step engine "$ENGINE_S" python3 benchmarks/gpu_engine.py "${ENGINE_FLAGS[@]}" --out-dir "$OUT"

# The kernel tests import lorafleet.kernels: a package made of links to the checkout (no pip install needed).
PKG=$(mktemp -d)
mkdir -p "$PKG/lorafleet"
cp lorafleet_pkg/__init__.py "$PKG/lorafleet/"
for sub in kernels replicas infra benchmarks; do ln -s "$PWD/$sub" "$PKG/lorafleet/$sub"; done
step kernel_tests "$TESTS_S" env PYTHONPATH="$PKG:$PWD/tests" python3 -m pytest tests/kernels -q --maxfail=20 \
  -p no:cacheprovider -o addopts="--import-mode=importlib"
