#!/usr/bin/env bash
# One prepared GPU check of msa's kernels, for a bare CUDA machine with torch and triton installed and no
# internet. Every phase has its own time limit and writes its results into OUT_DIR as it goes; a phase that fails
# or runs out is recorded and the next one still runs; a summary table is printed last.
#
#   benchmarks/device_check.sh OUT_DIR              phases (a)-(g), at most 8 minutes
#   benchmarks/device_check.sh --quick OUT_DIR      phases (a)-(c), at most 3 minutes
#   benchmarks/device_check.sh --dry-run OUT_DIR    on a machine without a GPU (CI): phase (a) for sm_90, the
#                                                   backends line, and an offline sm_90 compile of every Triton
#                                                   specialisation the GPU tests and benchmarks launch
#
#   (a) build       pip install -e . with the CUDA kernels, as a user would     OUT_DIR/build.log
#   (b) smoke       every backend x dtype, one odd shape, fwd + grads vs f64     OUT_DIR/smoke.{log,jsonl}
#   (c) targets     benchmarks/bench_gpu_targets.py (bf16)                      OUT_DIR/bench_gpu_targets_*
#   (d) train step  benchmarks/bench_train_step.py, published sizes, B = 128,   OUT_DIR/bench_train_step.*
#                   bf16 autocast: the MSCMAT part's share of a training step
#   (e) backends    benchmarks/bench_backends.py: triton vs cuda over sizes,    OUT_DIR/backend_choice.*
#                   bf16 and fp32, inference and training: auto's measured choice for this card
#                   (bench_backends.py --install OUT_DIR/backend_choice.json merges it into msa/ops/)
#   (f) tests       pytest -v tests/test_ops_gpu.py, API-risk tests first       OUT_DIR/gpu_tests*.log
#   (g) profile     ncu of the forward and backward kernels at the target shape OUT_DIR/ncu_*.txt
#   benchmarks/bench_mscmat.py (the op against the reference over batch sizes) runs apart: it needs more time
#   than the 8 minutes leave.
#   OUT_DIR/environment.txt: card, versions, toolkit, `backends on cuda: [...]`, phase log; OUT_DIR/summary.md.
#
# The CUDA toolkit is the first folder holding include/cuda_runtime.h among: $CUDA_HOME, the TOP that
# `nvcc --dryrun` reports (nvcc on PATH may be a wrapper script), torch's own CUDA_HOME, /usr/local/cuda.
# Knobs: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this card's; 9.0 for --dry-run),
# {BUILD,SMOKE,TARGETS,TRAIN,BACKENDS,TEST,PROFILE,COMPILE}_SECONDS (phase limits; their defaults add up to 8 minutes,
# 3 with --quick; a fresh H200 machine built msa with its CUDA kernels in 89 s, the Triton smoke compiles ~15 s a dtype).
set -uo pipefail

mode=full
case "${1:-}" in
  --quick) mode=quick; shift ;;
  --dry-run) mode=dry-run; shift ;;
esac
out=${1:?usage: benchmarks/device_check.sh [--quick | --dry-run] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
case $mode in
  quick) : "${BUILD_SECONDS:=100}" "${SMOKE_SECONDS:=35}" "${TARGETS_SECONDS:=45}" ;;
  dry-run) : "${BUILD_SECONDS:=900}" ;;  # two CPU cores of a CI machine, no GPU: no hurry
  *) : "${BUILD_SECONDS:=100}" "${SMOKE_SECONDS:=50}" "${TARGETS_SECONDS:=90}" ;;
esac
# Full run: 100 + 50 + 90 + 50 + 50 + 2 x 45 + 2 x 25 = 480 s at most; --quick 100 + 35 + 45 = 180 s (H200 runs:
# build 64-89 s, smoke 32 s, targets 36-42 s with 17 bf16 autotune candidates in all, now 21, tests
# 37 + 38 s, ncu 23 + 17 s).
: "${TRAIN_SECONDS:=50}" "${BACKENDS_SECONDS:=50}" "${TEST_SECONDS:=45}" "${PROFILE_SECONDS:=25}" "${COMPILE_SECONDS:=1500}"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
started=$SECONDS
env_file="$out/environment.txt"
summary=()
failed=0

# Triton's autotuner keeps its timings on disk, so phases that launch the same sizes (targets, backends) tune once,
# and prints each choice into the phase's log.
export TRITON_CACHE_AUTOTUNING=1 TRITON_PRINT_AUTOTUNING=1

note() { echo "[device_check +$((SECONDS - started))s] $*" | tee -a "$env_file"; }

# run_phase NAME LIMIT_SECONDS LOG COMMAND...: runs COMMAND under its limit with output into LOG, records the row.
run_phase() {
  local name=$1 limit=$2 log=$3 begin=$SECONDS rc
  shift 3
  note "phase $name (limit ${limit}s)"
  PYTHONUNBUFFERED=1 timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local state=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then state="TIMED OUT"; elif [ "$rc" -ne 0 ]; then state="FAILED ($rc)"; fi
  [ "$state" = ok ] || failed=1
  summary+=("| $name | $state | $((SECONDS - begin)) | $(basename "$log") |")
  note "phase $name: $state after $((SECONDS - begin))s"
  return "$rc"
}

cuda_home_candidates() {
  [ -n "${CUDA_HOME:-}" ] && echo "$CUDA_HOME"
  if command -v nvcc >/dev/null 2>&1; then
    nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1
  fi
  "$py" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null
  echo /usr/local/cuda
}

find_cuda_home() {
  local candidate
  while read -r candidate; do
    if [ -n "$candidate" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then
      (cd "$candidate" && pwd -P)
      return 0
    fi
  done < <(cuda_home_candidates)
  return 1
}

# --- environment -------------------------------------------------------------------------------------------
{
  echo "mode: $mode, git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| triton', triton.__version__, '| torch cuda', torch.version.cuda, '| gpu', \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
  nvcc --version 2>&1 | tail -n 1
} >"$env_file"

# --- (a) build ---------------------------------------------------------------------------------------------
if CUDA_HOME=$(find_cuda_home); then
  export CUDA_HOME
else
  note "no CUDA toolkit found (no include/cuda_runtime.h under \$CUDA_HOME, nvcc's TOP, torch's CUDA_HOME or /usr/local/cuda)"
  unset CUDA_HOME
fi
if [ "$mode" = dry-run ]; then
  arch=${TORCH_CUDA_ARCH_LIST:-9.0}
else
  arch=${TORCH_CUDA_ARCH_LIST:-$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
fi
export MSA_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-8}
note "build for arch $arch, CUDA_HOME=${CUDA_HOME:-none}"
if ! run_phase build "$BUILD_SECONDS" "$out/build.log" \
  "$py" -m pip install --no-build-isolation --no-deps --no-index -e .; then
  # Without pip (or its editable support) the in-place build still works: msa/kernels links to kernels/.
  note "pip install -e failed; building in place instead (see build.log)"
  timeout "$BUILD_SECONDS" "$py" setup.py build_ext --inplace >>"$out/build.log" 2>&1 || note "BUILD FAILED"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# The backends as the library reports them; importing msa.kernels.mscmat_triton proves the Triton op registers
# (without a GPU, available_backends('cuda') only asks whether msa._C registered a CUDA kernel and whether
# triton and msa.kernels can be found).
(cd tests && "$py" -c "import msa.ops as o, msa.kernels.mscmat_triton; print('backends on cuda:', \
o.available_backends('cuda'))") 2>&1 | tail -n 1 | tee -a "$env_file"

if [ "$mode" = dry-run ]; then
  grep -q "backends on cuda: .*'triton'.*'cuda'" "$env_file" || { note "triton or cuda missing from the backends"; failed=1; }
  run_phase "sm_90 compile" "$COMPILE_SECONDS" "$out/kernel_report.log" \
    "$py" benchmarks/kernel_report.py --launched --check --out "$out"
  tail -n 1 "$out/kernel_report.log" | tee -a "$env_file"
else
  # --- (b) smoke, (c) targets --------------------------------------------------------------------------------
  run_phase smoke "$SMOKE_SECONDS" "$out/smoke.log" "$py" benchmarks/device_smoke.py smoke --out "$out"
  run_phase targets "$TARGETS_SECONDS" "$out/targets.log" \
    "$py" benchmarks/bench_gpu_targets.py --out "$out" --repeats 5
  if [ "$mode" = full ]; then
    # --- (d) the training-step target: MSCMAT (4 scales, fused, fwd + bwd) against the whole published step --
    run_phase "train step" "$TRAIN_SECONDS" "$out/train_step.log" \
      "$py" benchmarks/bench_train_step.py --sizes published --batches 128 --providers fused --precision bf16 \
      --max-published-step-batch 128 --repeats 5 --out "$out"
    # --- (e) which backend auto should take on this card, from both kernels timed side by side -------------
    run_phase backends "$BACKENDS_SECONDS" "$out/backends.log" "$py" benchmarks/bench_backends.py --out "$out"
    # --- (f) tests: the API-risk tests first (opcheck, torch.compile, 64-bit sizes), then the rest -----------
    # A test past 90 s fails (pytest-timeout) or, without that plugin, has its traceback dumped (faulthandler);
    # either way -v has written every finished test's line before the phase limit can cut it.
    per_test=(-o faulthandler_timeout=90)
    "$py" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=90)
    parallel=()
    "$py" -c "import xdist" 2>/dev/null && parallel=(-n 4)
    risky="opcheck or compile or 64_bit or large"
    export MSA_REQUIRE_GPU_BACKENDS=cuda,triton
    run_phase "tests (API risk)" "$TEST_SECONDS" "$out/gpu_tests_api.log" \
      "$py" -m pytest -v -rfEs "${per_test[@]}" "${parallel[@]}" -k "$risky" tests/test_ops_gpu.py
    run_phase "tests (rest)" "$TEST_SECONDS" "$out/gpu_tests.log" \
      "$py" -m pytest -v -rfEs "${per_test[@]}" "${parallel[@]}" -k "not ($risky)" tests/test_ops_gpu.py
    # --- (g) ncu profile of the kernels at the target shape, when ncu can read the counters ------------------
    # Only the profiled call's kernels (device_smoke.py profile brackets it with cudaProfilerStart / Stop): the
    # first H200 run skipped a fixed count of launches and caught only the autotuner's timing of the forward.
    # At most 6 launches (Triton: forward, then images + words kernel per block of texts, two blocks here).
    if command -v ncu >/dev/null 2>&1; then
      for backend in triton cuda; do
        run_phase "ncu $backend" "$PROFILE_SECONDS" "$out/ncu_$backend.txt" \
          ncu --profile-from-start off --kernel-name "regex:mscmat" --launch-count 6 --clock-control none \
          --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis \
          --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,lts__t_bytes.sum.per_second,dram__bytes.sum.per_second \
          "$py" benchmarks/device_smoke.py profile --backend "$backend"
      done
    else
      note "ncu not found: no profile"
    fi
  fi
fi

# --- summary -----------------------------------------------------------------------------------------------
{
  echo "# device_check $mode: $(head -n 1 "$env_file")"
  grep -m 1 "backends on cuda" "$env_file"
  echo
  echo "| phase | result | seconds | log |"
  echo "|---|---|---:|---|"
  printf '%s\n' "${summary[@]}"
  [ -f "$out/smoke.log" ] && { echo; cat "$out/smoke.log" | grep -E "^(ok|FAIL)" ; }
  for table in "$out"/bench_gpu_targets_*.md "$out"/bench_train_step.md "$out"/backend_choice.md; do [ -f "$table" ] && { echo; cat "$table"; }; done
  echo
  echo "total $((SECONDS - started)) s, status $failed"
} >"$out/summary.md"
cat "$out/summary.md"
exit "$failed"
