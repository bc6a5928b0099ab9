#!/usr/bin/env bash
# On a CUDA machine: build the package, run the whole test suite on the GPU (every backend, every dtype),
# run every benchmark and the end-to-end job, and write a dated results file (device, versions, commit)
# plus a plot under benchmarks/results/.
#
#   bash benchmarks/gpu_suite.sh [all|build|test|bench|e2e|report]     (default: all)
#
# Stages can run in separate calls (each writes into $RESULTS_DIR); `report` collects what is there.
# Environment: RESULTS_DIR (default benchmarks/results), LEANVAE_BENCH_ROUNDS, PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$RESULTS_DIR"
stage=${1:-all}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite: no CUDA device visible to torch" >&2
  exit 2
fi
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
prefix="$RESULTS_DIR/$(date -u +%Y-%m-%d)-$gpu"
status=0

run_build() {
  # No network on the lent GPU machines: build against what is installed.
  LEANVAE_KERNELS_BUILD_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
  $PY -m leanvae info -v | tee "$prefix-info.txt"
}
run_test() {
  PYTHONUNBUFFERED=1 $PY -m pytest tests -q -ra 2>&1 | tee "$prefix-tests.txt"
  return "${PIPESTATUS[0]}"
}
run_bench() {
  PYTHONUNBUFFERED=1 $PY -m pytest benchmarks --ignore=benchmarks/test_bench_e2e.py --benchmark-enable -q \
    --benchmark-json="$prefix-ops.json" 2>&1 | tail -20
  return "${PIPESTATUS[0]}"
}
run_e2e() {
  for dtype in bfloat16 float32; do
    $PY -m leanvae bench --dtype $dtype --compile --repeats 5 --json "$prefix-e2e-$dtype.json" || status=1
  done
}
run_report() {
  files=$(ls "$prefix"-ops.json "$prefix"-e2e-*.json 2>/dev/null)
  [ -n "$files" ] && $PY benchmarks/report.py "$prefix" $files
}

case "$stage" in
  build) run_build ;;
  test) run_test || status=1 ;;
  bench) run_bench || status=1 ;;
  e2e) run_e2e ;;
  report) run_report ;;
  all) run_build && { run_test || status=1; run_bench || status=1; run_e2e; run_report; } ;;
  *) echo "gpu_suite: unknown stage $stage" >&2; exit 2 ;;
esac
echo "gpu_suite: stage $stage finished with status $status (results under $RESULTS_DIR, prefix $prefix)"
exit $status
