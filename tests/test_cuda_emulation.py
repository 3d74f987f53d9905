"""The CUDA kernels (csrc/cuda/mscmat_tiles.cuh and mscmat_kernels.cuh, which mscmat_cuda.cu compiles) run on the
CPU: tests/cuda_emulation compiles the same headers with g++ against a small emulation of CUDA threads,
__syncthreads, WMMA tiles and cp.async (copies land only at the wait that covers them), runs forward and both
backward kernels for float, half and bfloat16, every padded head dim, chunked texts, masks, NaN inputs, both
staging modes and several image tiles per forward block, and compares with a float64 reference. This is how the
CUDA code's indexing, tiling, pipelining and synchronisation get checked on machines without a GPU."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EMULATION = HERE / "cuda_emulation"
CUDA_SOURCES = HERE.parent / "csrc" / "cuda"
SOURCE = CUDA_SOURCES / "mscmat_kernels.cuh"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("needs g++ or clang++ to build the CUDA emulation")
    if not SOURCE.exists():
        pytest.skip(f"{SOURCE} not found")
    binary = tmp_path_factory.mktemp("cuda_emulation") / "run_mscmat_emulation"
    command = [
        compiler, "-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas", "-I", str(EMULATION),
        str(EMULATION / "run_mscmat_emulation.cpp"), "-o", str(binary),
    ]  # fmt: skip
    build = subprocess.run(command, capture_output=True, text=True)
    if build.returncode != 0 and ("<barrier>" in build.stderr or "_Float16" in build.stderr):
        pytest.skip(f"{compiler} lacks C++20 <barrier> or _Float16: {build.stderr[-300:]}")
    assert build.returncode == 0, f"building the emulation failed:\n{build.stderr[-3000:]}"
    return binary


def test_cuda_kernels_match_reference_under_emulation(emulator):
    run = subprocess.run([str(emulator)], capture_output=True, text=True, timeout=300)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0, "\n".join(line for line in lines if not line.startswith("ok")) + run.stderr
    assert lines[-1] == "all cases match"
    # every dtype and padded head dim was exercised
    for needle in ("f32", "f16", "bf16", "DP=32", "DP=64", "DP=128", "BT=1", "mask=all", "G=4", " nan "):
        assert any(needle in line for line in lines), needle
    for dtype in ("f32", "f16", "bf16"):  # both staging modes for every dtype
        for mode in ("copy=async", "copy=elements"):
            assert any(dtype + " " in line and mode in line for line in lines), (dtype, mode)


def test_cuda_build_compiles_the_emulated_kernels():
    """The extension's .cu includes the very headers the emulation runs, and nothing is compiled only for one side."""
    host = (CUDA_SOURCES / "mscmat_cuda.cu").read_text()
    for header in ("device_primitives.cuh", "mscmat_tiles.cuh", "mscmat_warp.cuh", "mscmat_kernels.cuh"):
        assert f'#include "{header}"' in host, header
    assert host.index('"mscmat_tiles.cuh"') < host.index('"mscmat_warp.cuh"') < host.index('"mscmat_kernels.cuh"')
    for path in sorted(CUDA_SOURCES.glob("*")) + sorted(EMULATION.glob("*")):
        assert "MSA_CUDA_EMULATION" not in path.read_text(), path.name
