#!/usr/bin/env bash
# The GPU suite: the most truth per minute from one short GPU window (benchmarks/NOTES.md says how to call it).
#
#   bash benchmarks/gpu_suite.sh [--budget SECONDS] [STAGE ...]
#
# Stages, in order of value (default: all of them), each under its own timeout, each writing its result
# files under RESULTS_DIR as soon as it ends, so a window cut short still returns everything done so far:
#   build      setuptools/wheel check, CUDA build for sm_90 with parallel jobs (fails loudly if pip fails
#              or the CUDA module does not load), `python -m leanvae info -v`
#   check      `python -m leanvae check`: every op on every backend of the GPU against the reference, forward
#              and backward, three dtypes, small odd and strided shapes (what users are told to run first)
#   gpu-tests  `pytest -m gpu`: the tests that run cuda/triton kernels on the GPU (tests/conftest.py marks
#              them), large-index, non-default-stream and second-device cases (tests/tools/test_gpu_suite.py)
#   bench      one pytest-benchmark JSON per benchmarks/test_bench_*.py (CUDA-event timing, bandwidth as a
#              fraction of the copy bandwidth measured in the same process), torch.compile providers excluded
#   e2e        `python -m leanvae bench`: 17x1080x1920 bfloat16 and 17x256x256 (reference, fused, peak memory,
#              error against float32)
#   parallel   one clip split across the GPUs (leanvae.parallel over NCCL, torchrun, one rank per GPU): per-rank
#              time and peak memory, agreement with one process; skipped (saying so) with fewer than 2 GPUs
#   compile    the torch.compile variants (ops and end to end), optional: cold compiles are slow
#   sanitizer  compute-sanitizer memcheck over the GPU op tests on small shapes, if time remains
#   report     benchmarks/report.py over whatever the run produced
# --budget SECONDS: the whole run's wall-clock budget; a stage that no longer fits is skipped (and says so),
# the last one that fits runs under what is left. Every stage writes $PREFIX-<stage>.txt (log + status line);
# $PREFIX-summary.txt gets one line per stage as it ends.
#
# GPU_SUITE_DRY_RUN=1: the same plumbing on a CPU (tiny shapes; reference, CPU and Triton-interpreter
# paths stand in for the GPU; nothing is installed): what CI runs so that this script cannot rot.
# Environment: RESULTS_DIR (default benchmarks/results), PYTHON (default python3), GPU_SUITE_ARCHIVE (a .tgz
# rewritten after every stage with all of the run's files), GPU_SUITE_VERBOSE (1: stage output shown as
# well as logged; the default on a GPU, 0 in the dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=${GPU_SUITE_DRY_RUN:-0}
VERBOSE=${GPU_SUITE_VERBOSE:-$([ "$DRY" = 1 ] && echo 0 || echo 1)}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$RESULTS_DIR"
export PYTHONUNBUFFERED=1

budget=""
stages=()
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) budget=${2:?--budget needs a number of seconds}; shift 2 ;;
    --budget=*) budget=${1#--budget=}; shift ;;
    -h|--help) sed -n 2,26p "$0"; exit 0 ;;
    *) stages+=("$1"); shift ;;
  esac
done
ALL_STAGES=(build check gpu-tests bench e2e parallel compile sanitizer report)
[ ${#stages[@]} -eq 0 ] && stages=("${ALL_STAGES[@]}")
for s in "${stages[@]}"; do
  case " ${ALL_STAGES[*]} " in *" $s "*) ;; *) echo "gpu_suite: unknown stage '$s' (expected: ${ALL_STAGES[*]})" >&2; exit 2 ;; esac
done
if [ -n "$budget" ] && ! [[ "$budget" =~ ^[0-9]+$ ]]; then
  echo "gpu_suite: --budget expects whole seconds, got '$budget'" >&2; exit 2
fi

if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 LEANVAE_BENCH_ROUNDS=1 LEANVAE_BENCH_E2E_SIZE=5x16x16
  device=dryrun-cpu
  # stage: max seconds, min seconds worth starting
  declare -A T_MAX=([build]=60 [check]=60 [gpu-tests]=90 [bench]=120 [e2e]=60 [parallel]=60 [compile]=60 [sanitizer]=10 [report]=30)
else
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: no CUDA device visible to torch (GPU_SUITE_DRY_RUN=1 runs the plumbing on a CPU)" >&2
    exit 2
  fi
  device=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
  # Stage budgets: build < 2 min, correctness < 3, ops < 2, end to end < 3; compile and sanitizer last.
  declare -A T_MAX=([build]=150 [check]=120 [gpu-tests]=180 [bench]=150 [e2e]=180 [parallel]=120 [compile]=120 [sanitizer]=120 [report]=30)
fi
declare -A T_MIN=([build]=20 [check]=10 [gpu-tests]=30 [bench]=30 [e2e]=30 [parallel]=30 [compile]=40 [sanitizer]=30 [report]=5)
PREFIX="$RESULTS_DIR/$(date -u +%Y-%m-%dT%H%M)-$device"
SUMMARY="$PREFIX-summary.txt"
START=$SECONDS
status=0
echo "gpu_suite: $(date -u +%FT%TZ) device=$device dry_run=$DRY budget=${budget:-none} stages=${stages[*]}" | tee "$SUMMARY"

# Seconds one stage may use: its own cap, cut to what the budget has left (0: skip).
allowance() {
  local cap=${T_MAX[$1]} left
  if [ -n "$budget" ]; then
    left=$((budget - (SECONDS - START) - 5))
    [ "$left" -lt "${T_MIN[$1]}" ] && { echo 0; return; }
    [ "$left" -lt "$cap" ] && cap=$left
  fi
  echo "$cap"
}

# run_stage NAME FUNCTION: runs FUNCTION under the stage's timeout, logs to $PREFIX-NAME.txt, records status.
run_stage() {
  local name=$1 fn=$2 t0=$SECONDS rc secs limit log="$PREFIX-$1.txt"
  limit=$(allowance "$name")
  if [ "$limit" = 0 ]; then
    echo "SKIPPED: $name needs at least ${T_MIN[$name]} s, budget $budget s has $((budget - (SECONDS - START))) s left" | tee "$log" >>"$SUMMARY"
    echo "gpu_suite: skipped $name (does not fit the budget)"
    return 0
  fi
  echo "gpu_suite: stage $name (timeout ${limit} s) ..."
  # STAGE_LIMIT: for the stage's own per-step timeouts. In the background so that a TERM/INT to this
  # script reaches the stage (see the trap below).
  STAGE_LIMIT=$limit STAGE_LOG=$log STAGE_NAME=$name \
    timeout --kill-after=10 "$limit" bash -c "set -o pipefail; $(declare -f "$fn" stage_body); stage_body $fn" &
  stage_pid=$!
  wait "$stage_pid"
  rc=$?
  stage_pid=""
  secs=$((SECONDS - t0))
  local verdict=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT after ${limit} s"; status=1
  elif [ $rc -ne 0 ]; then verdict="FAILED (exit $rc)"; status=1; fi
  echo "== stage $name: $verdict in ${secs} s" >>"$log"
  echo "$name: $verdict in ${secs} s (log $(basename "$log"))" >>"$SUMMARY"
  [ "$VERBOSE" = 1 ] || tail -n 2 "$log" | sed "s/^/  [$name] /"
  echo "gpu_suite: $name: $verdict in ${secs} s"
  return $rc
}

# A stage's output goes to its log file as it comes; with GPU_SUITE_VERBOSE=1 (the default on a GPU) it is
# also shown, prefixed with the stage, so that a run killed mid-stage still shows how far that stage got.
stage_body() {
  if [ "$STAGE_VERBOSE" = 1 ]; then
    "$1" 2>&1 | tee "$STAGE_LOG" | sed -u "s/^/  [$STAGE_NAME] /"
  else
    "$1" >"$STAGE_LOG" 2>&1
  fi
}

export PY DRY PREFIX RESULTS_DIR STAGE_VERBOSE=$VERBOSE
stage_pid=""
# Killed from outside (the window closing): stop the running stage too, and say so in the summary;
# the files of the stages already finished are complete.
on_signal() {
  [ -n "$stage_pid" ] && kill -TERM "$stage_pid" 2>/dev/null && wait "$stage_pid" 2>/dev/null
  echo "gpu_suite: INTERRUPTED after $((SECONDS - START)) s" >>"$SUMMARY"
  archive
  exit 143
}
trap on_signal TERM INT

stage_build() {
  local rc=0 pip_ok=1
  $PY - <<'EOF' || pip_ok=0
import importlib
missing = []
for name in ("setuptools", "wheel", "pybind11", "ninja"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except ImportError:
        missing.append(name)
if "setuptools" not in missing and int(importlib.import_module("setuptools").__version__.split(".")[0]) < 64:
    missing.append("setuptools>=64 (older ones make no editable installs)")
if missing:
    # An old setuptools without `wheel` fails `pip install -e .` with "invalid command 'bdist_wheel'".
    raise SystemExit(f"BUILD: missing {', '.join(missing)}: `pip install --no-build-isolation -e .` cannot work "
                     "(carry them as wheels, see benchmarks/NOTES.md); building in place instead")
EOF
  if [ "$DRY" = 1 ]; then
    echo "dry run: no build (the CPU module built here is used); checking it loads"
    $PY -c "from leanvae_kernels import _native; m, r = _native.module('cpu'); print('cpu module:', r); raise SystemExit(0 if m else 1)" || rc=1
  else
    export LEANVAE_KERNELS_BUILD_CUDA=1 LEANVAE_KERNELS_CUDA_ARCH=9.0 LEANVAE_KERNELS_BUILD_JOBS=$(nproc)
    # No network there: build against what is installed; pip's own status is what counts. When pip
    # cannot work, the stage fails but builds in place, so that the later stages still test the kernels.
    if [ $pip_ok = 1 ] && ! $PY -m pip install --no-build-isolation --no-deps -e .; then
      echo "BUILD FAILED: pip install returned non-zero"; pip_ok=0
    fi
    if [ $pip_ok = 0 ]; then
      rc=1
      $PY setup.py -q build_ext --inplace || echo "BUILD FAILED: setup.py build_ext --inplace failed too"
    fi
    if ! $PY -c "from leanvae_kernels import _native; m, r = _native.module('cuda'); print('cuda module:', r); raise SystemExit(0 if m else 1)"; then
      echo "BUILD FAILED: the CUDA module does not load (every cuda test would skip)"; rc=1
    fi
  fi
  $PY benchmarks/report.py --env "$PREFIX-env.json" || rc=1
  $PY -m leanvae info -v || rc=1
  return $rc
}

stage_check() {
  # Dry run: the CPU kernels only (the Triton interpreter would take minutes here; gpu-tests covers it).
  if [ "$DRY" = 1 ]; then TRITON_INTERPRET=0 $PY -m leanvae check --device cpu; else $PY -m leanvae check; fi
}

stage_gpu_tests() {
  local sel=(tests) par=()
  # Dry run: one small op file through the Triton interpreter plus the suite's own GPU cases (which skip).
  [ "$DRY" = 1 ] && sel=(tests/ops/ista/test_soft_threshold.py tests/tools/test_gpu_suite.py)
  # On the GPU machine (16 cores), Triton's JIT compiles dominate: spread them over workers.
  [ "$DRY" != 1 ] && $PY -c "import xdist" 2>/dev/null && par=(-n 6 --dist loadgroup)
  # A test file that fails to import there (a package missing from the image) must not cost all the others.
  $PY -m pytest -p no:cacheprovider -q -m gpu "${par[@]}" "${sel[@]}" --continue-on-collection-errors --durations=15 \
    --junitxml="$PREFIX-gpu-tests.xml"
}

stage_bench() {
  local f name rc=0 per
  local files=(benchmarks/test_bench_*.py)
  per=$(( STAGE_LIMIT / (${#files[@]} - 1) ))  # e2e has its own stage
  for f in "${files[@]}"; do
    name=$(basename "$f" .py); name=${name#test_bench_}
    [ "$name" = e2e ] && continue  # stage e2e
    echo "-- $f (timeout ${per} s)"
    timeout --kill-after=5 "$per" $PY -m pytest -p no:cacheprovider -q "$f" -k "not compile" --benchmark-enable \
      --benchmark-json="$PREFIX-bench-$name.json" --benchmark-columns=median,rounds || rc=1
  done
  return $rc
}

stage_e2e() {
  local rc=0
  if [ "$DRY" = 1 ]; then
    $PY -m leanvae bench --device cpu --dtype bfloat16 --frames 5 --size 16x16 --repeats 1 --quiet \
      --json "$PREFIX-e2e-5x16x16-bfloat16.json" || rc=1
  else
    $PY -m leanvae bench --dtype bfloat16 --frames 17 --size 1080x1920 --repeats 3 --quiet \
      --json "$PREFIX-e2e-17x1080x1920-bfloat16.json" || rc=1
    $PY -m leanvae bench --dtype bfloat16 --frames 17 --size 256x256 --repeats 5 --quiet \
      --json "$PREFIX-e2e-17x256x256-bfloat16.json" || rc=1
  fi
  return $rc
}

stage_parallel() {
  # Exactness is a float32 claim (bands vs one process within 1e-6; the command exits 1 past 1e-5).
  if [ "$DRY" = 1 ]; then
    # The plumbing on the CPU: 2 gloo ranks, a tiny clip, the fused conv's CPU backend.
    OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc_per_node=2 -m leanvae bench --parallel \
      --device cpu --backend cpu --frames 5 --size 32x32 --repeats 1 --warmup 0 --json "$PREFIX-parallel-2ranks.json"
    return
  fi
  local n
  n=$($PY -c "import torch; print(torch.cuda.device_count())")
  if [ "$n" -lt 2 ]; then
    echo "SKIPPED: patch-parallel over NCCL needs at least 2 GPUs; this machine has $n"
    return 0
  fi
  $PY -m torch.distributed.run --standalone --nproc_per_node="$n" -m leanvae bench --parallel --backend cuda \
    --dtype float32 --frames 17 --size 1080x1920 --repeats 3 --json "$PREFIX-parallel-${n}ranks.json"
}

stage_compile() {
  local rc=0
  if [ "$DRY" = 1 ]; then
    $PY -m pytest -p no:cacheprovider -q benchmarks/test_bench_haar.py -k "compile and test_patch and f32 and forward and not backward" \
      --benchmark-enable --benchmark-json="$PREFIX-compile-ops.json" || rc=1
  else
    $PY -m leanvae bench --dtype bfloat16 --frames 17 --size 256x256 --compile --repeats 3 --quiet \
      --json "$PREFIX-compile-e2e-17x256x256-bfloat16.json" || rc=1
    $PY -m pytest -p no:cacheprovider -q benchmarks --ignore=benchmarks/test_bench_e2e.py -k "compile and forward and not backward" \
      --benchmark-enable --benchmark-json="$PREFIX-compile-ops.json" || rc=1
  fi
  return $rc
}

stage_sanitizer() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: compute-sanitizer needs a GPU; on one this stage runs:"
    echo "  compute-sanitizer --tool memcheck --error-exitcode 1 $PY -m pytest -m gpu -k cuda tests/ops/ista/test_soft_threshold.py tests/ops/haar/test_haar.py"
    return 0
  fi
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null) \
    || { echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin)"; return 1; }
  "$cs" --tool memcheck --error-exitcode 1 --print-limit 20 \
    $PY -m pytest -p no:cacheprovider -q -x -m gpu -k "cuda and not large and not target" tests/ops/ista/test_soft_threshold.py tests/ops/haar/test_haar.py tests/ops/ista/test_ista_ops.py
}

stage_report() {
  $PY benchmarks/report.py --run "$PREFIX"
}

# GPU_SUITE_ARCHIVE=FILE.tgz: after every stage, all of this run's files packed into FILE.tgz (replaced
# whole, so a window closing mid-stage still leaves a complete archive of the stages before).
archive() {
  [ -n "${GPU_SUITE_ARCHIVE:-}" ] || return 0
  ( cd "$RESULTS_DIR" && tar czf "$GPU_SUITE_ARCHIVE.tmp" "$(basename "$PREFIX")"-* ) && mv -f "$GPU_SUITE_ARCHIVE.tmp" "$GPU_SUITE_ARCHIVE"
}
for s in "${stages[@]}"; do
  run_stage "$s" "stage_${s//-/_}"
  rc=$?
  archive
  if [ "$s" = build ] && [ $rc -ne 0 ]; then
    echo "gpu_suite: BUILD STAGE FAILED (see $PREFIX-build.txt); continuing so that the reference/Triton stages still report" >&2
  fi
done
echo "gpu_suite: finished in $((SECONDS - START)) s with status $status; results: $PREFIX-*" | tee -a "$SUMMARY"
archive
exit $status
