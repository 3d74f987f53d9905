#!/usr/bin/env bash
# One prepared GPU check of msa's kernels, for a bare CUDA machine with torch and triton installed and no
# internet. Builds the extension with its CUDA kernels, runs the GPU tests (parity of every dtype and gradient,
# opcheck, torch.compile, 64-bit sizes), then the benchmark, and writes every result into OUT_DIR:
#
#   benchmarks/device_check.sh OUT_DIR
#
#   OUT_DIR/environment.txt        nvidia-smi, python, torch, triton, nvcc, git sha, phase timings
#   OUT_DIR/build.log              the extension build
#   OUT_DIR/gpu_tests.log          pytest on tests/test_ops_gpu.py (+ the CPU op tests, which still run)
#   OUT_DIR/bench_gpu_targets_*    benchmarks/bench_gpu_targets.py: the issue's targets (md + json)
#   OUT_DIR/bench_mscmat_*         benchmarks/bench_mscmat.py on this card (md + json)
#
# Each phase has its own time limit so that the whole run stays inside 8 minutes; a phase that runs out is
# reported in environment.txt and the next one still runs. Knobs: PYTHON (default python3),
# TORCH_CUDA_ARCH_LIST (default: this card's), BUILD_SECONDS, TEST_SECONDS, TARGETS_SECONDS, BENCH_SECONDS.
set -uo pipefail

out=${1:?usage: benchmarks/device_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
started=$SECONDS
status=0
env_file="$out/environment.txt"

note() { echo "[device_check +$((SECONDS - started))s] $*" | tee -a "$env_file"; }

{
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))" 2>&1
  nvcc --version 2>&1 | tail -n 1
} >"$env_file"

# --- build: the CUDA kernels for this card only (one architecture keeps nvcc near a minute) ---------------
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
arch=${TORCH_CUDA_ARCH_LIST:-$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export CUDA_HOME MSA_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-8}
note "building msa._C with CUDA kernels for arch $arch (CUDA_HOME=${CUDA_HOME:-unset})"
if ! timeout "${BUILD_SECONDS:-130}" "$py" -m pip install --no-build-isolation --no-deps --no-index -e . \
  >"$out/build.log" 2>&1; then
  note "pip install -e failed; trying setup.py build_ext --inplace (see build.log)"
  if ! timeout "${BUILD_SECONDS:-130}" "$py" setup.py build_ext --inplace >>"$out/build.log" 2>&1; then
    note "BUILD FAILED"
    status=1
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$py" -c "import msa.ops as o; print('backends on cuda:', o.available_backends('cuda'))" 2>&1 | tee -a "$env_file"

# --- tests -------------------------------------------------------------------------------------------------
note "GPU tests"
test_files=(tests/test_ops_gpu.py)
[ -f tests/test_ops_cpu.py ] && test_files+=(tests/test_ops_cpu.py)
# Triton compiles one kernel per specialisation on one CPU core: spread the tests over 4 workers when
# pytest-xdist is there.
parallel=()
"$py" -c "import xdist" 2>/dev/null && parallel=(-n 4)
if ! MSA_REQUIRE_GPU_BACKENDS=cuda,triton PYTHONUNBUFFERED=1 timeout "${TEST_SECONDS:-160}" \
  "$py" -m pytest -q -rfEs "${parallel[@]}" "${test_files[@]}" >"$out/gpu_tests.log" 2>&1; then
  note "GPU TESTS FAILED or timed out (see gpu_tests.log)"
  status=1
fi
tail -n 3 "$out/gpu_tests.log" | tee -a "$env_file"

# --- benchmarks: the issue's targets first (short), then the full provider table --------------------------
note "targets benchmark"
if ! PYTHONUNBUFFERED=1 timeout "${TARGETS_SECONDS:-100}" "$py" benchmarks/bench_gpu_targets.py --out "$out" \
  >"$out/targets.log" 2>&1; then
  note "TARGETS BENCHMARK FAILED or timed out"
  tail -n 30 "$out/targets.log" >>"$env_file"
  status=1
fi
rm -f "$out/targets.log"
note "benchmark"
if ! PYTHONUNBUFFERED=1 timeout "${BENCH_SECONDS:-90}" "$py" benchmarks/bench_mscmat.py --out "$out" --repeats 3 \
  --no-pairs >"$out/bench.log" 2>&1; then
  note "BENCHMARK FAILED or timed out (see the end of environment.txt)"
  tail -n 30 "$out/bench.log" >>"$env_file"
  status=1
fi
rm -f "$out/bench.log"
note "done, status $status"
exit "$status"
