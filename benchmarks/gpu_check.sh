#!/usr/bin/env bash
# The one script for a GPU session (issues 3 and 11): build, GPU tests, kernel timings, statistics
# timings, and the pytest-benchmark suites on CUDA.
#
#   bash benchmarks/gpu_check.sh            # on the device machine; results under $OUT
#   NSRU_GPU_CHECK_SMOKE=1 OUT=/tmp/g bash benchmarks/gpu_check.sh   # the same steps on a CPU machine
#
# Writes into $OUT (default benchmarks/results/gpu): gpu_check.log (everything printed), tests.xml
# (JUnit of the GPU tests), kernels.json (benchmarks/gpu_kernels.py: sub-kernel times, the TMA
# variant, the autotuner's choices), statistics.json (benchmarks/gpu_statistics.py) and
# benchmarks.json (pytest benchmarks -k cuda, with the ratio table under "nsru"; read it with
# python benchmarks/report.py). Each step has its own time limit (560 s in all; expect 6-7 minutes
# on the 16-core H200 machine), so a slow or failing step does not stop the ones after it; the
# exit status is that of the first failing step (124: a time limit). Commit the JSON files under
# benchmarks/results/. The smoke run times the CPU cases at tiny shapes (NSRU_BENCH_SMOKE=1).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
SMOKE=${NSRU_GPU_CHECK_SMOKE:-0}
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, remember the first failure
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
  return 0
}

{
  date -u
  nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
  "$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())'
} 2>&1 | tee -a "$LOG"

# 1. Build nsru._C in place (CUDA sources for sm_90 only, which is what this machine has) and make
#    the kernels importable as nsru.kernels without installing anything (the image has no registry).
if [ "$SMOKE" = 1 ]; then CUDA_FLAG=0; else CUDA_FLAG=1; fi
step build 160 env NSRU_CUDA=$CUDA_FLAG TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" setup.py -q build_ext --inplace
[ -e nsru/kernels ] || ln -s ../kernels nsru/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. GPU tests: the kernels compiled for the GPU (bf16 included), the op and layer through them,
#    and everything else that has a CUDA path. One autotuning config per dtype: otherwise every
#    ragged test shape would compile and time all of them.
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
TESTS="tests/test_kernels.py tests/test_lowrank_linear.py tests/test_layer.py"
for f in tests/test_second_moment*.py tests/test_statistics*.py tests/test_subspace*.py tests/test_ops*.py; do [ -e "$f" ] && TESTS="$TESTS $f"; done
step tests 100 env NSRU_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -m "not slow" $XDIST -p no:cacheprovider --junitxml="$OUT/tests.xml" $TESTS

# 3. Kernel timings (do_bench, full autotuning) against cuBLAS and PEFT LoRA.
if [ "$SMOKE" = 1 ]; then SMOKE_ARG=--smoke; else SMOKE_ARG=""; fi
step kernels 150 "$PY" benchmarks/gpu_kernels.py "$OUT/kernels.json" $SMOKE_ARG

# 4. The statistics kernels' timings, written by another issue's script when it exists.
if [ -f benchmarks/gpu_statistics.py ]; then
  step statistics 40 "$PY" benchmarks/gpu_statistics.py "$OUT/statistics.json"
fi

# 5. The pytest-benchmark suites on CUDA (issue 11): the same groups as on the CPU, at Llama-7B
#    shapes in bf16; the ratio table is printed at the end and kept in benchmarks.json.
if [ "$SMOKE" = 1 ]; then SUITE="env NSRU_BENCH_SMOKE=1"; SELECT=""; else SUITE="env"; SELECT="-k cuda"; fi
step suite 110 $SUITE "$PY" -m pytest benchmarks $SELECT --benchmark-only -q -p no:cacheprovider \
  --benchmark-columns=min,median,rounds --benchmark-json="$OUT/benchmarks.json"
[ -f "$OUT/benchmarks.json" ] && "$PY" benchmarks/report.py "$OUT/benchmarks.json" 2>&1 | tee -a "$LOG"

echo "=== done: exit $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
exit "$status"
