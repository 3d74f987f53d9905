"""Build of msa and its compiled kernels (msa._C).

Knobs (environment variables):
  CUDA_HOME              the CUDA toolkit; with a CUDA build of torch, the CUDA kernels are built when it is valid
  MSA_FORCE_CUDA=1       fail instead of building CPU-only when the CUDA kernels cannot be built
  MSA_SKIP_CUDA_BUILD=1  never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST   architectures for nvcc (default: the visible GPU's, or "8.0;9.0" when none is visible);
                         machine code for 9.0 is built as sm_90a (Hopper's wgmma/setmaxnreg) when nvcc knows it
  MAX_JOBS, NVCC_THREADS parallelism of the build
"""

import glob
import os
import subprocess
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_toolkit_ok() -> bool:
    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))


def _want_cuda() -> bool:
    """CUDA kernels are built when this torch is a CUDA build and a CUDA toolkit is found (CUDA_HOME), unless
    MSA_SKIP_CUDA_BUILD=1; MSA_FORCE_CUDA=1 turns a missing toolkit into an error instead of a CPU-only build."""
    if os.environ.get("MSA_SKIP_CUDA_BUILD", "0") == "1":
        return False
    forced = os.environ.get("MSA_FORCE_CUDA", "0") == "1"
    has_sources = bool(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
    if has_sources and torch.version.cuda is not None and _cuda_toolkit_ok():
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # No GPU to ask for its architecture: Ampere and Hopper, what CI compiles for.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        return True
    if forced:
        raise RuntimeError(
            "MSA_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME} (needs include/cuda_runtime.h), "
            f"CUDA sources found: {has_sources}. Set CUDA_HOME to the CUDA toolkit folder."
        )
    return False


def _nvcc_knows_sm90a() -> bool:
    # --list-gpu-arch leaves out the arch-specific targets (CUDA 13.0), so ask nvcc to plan a compile for one.
    if CUDA_HOME is None:
        return False
    command = [os.path.join(CUDA_HOME, "bin", "nvcc"), "--dryrun", "-gencode=arch=compute_90a,code=sm_90a"]
    command += ["-x", "cu", "-c", os.devnull, "-o", os.devnull]
    try:
        return subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _cuda_arch_flags() -> list[str]:
    """torch's -gencode flags for TORCH_CUDA_ARCH_LIST (or the visible GPUs), with Hopper machine code built for
    sm_90a instead of sm_90: the same devices run it, and it may use the Hopper-only instructions. PTX requested
    with +PTX stays compute_90, which later GPUs can still compile."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    flags = _get_cuda_arch_flags()
    if _nvcc_knows_sm90a():
        flags = [
            "-gencode=arch=compute_90a,code=sm_90a" if flag == "-gencode=arch=compute_90,code=sm_90" else flag
            for flag in flags
        ]
    return flags


def _extension():
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx_flags = ["-O3", *openmp]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    if _want_cuda():
        sources += sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo"]
        nvcc_flags += ["--threads", os.environ.get("NVCC_THREADS", "4")]
        nvcc_flags += _cuda_arch_flags()  # torch adds none of its own when the flags name an arch
        return CUDAExtension(
            "msa._C",
            sources,
            define_macros=[("MSA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=openmp,
        )
    return CppExtension("msa._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)


setup(
    # msa.search.static holds the search page's files (no Python), listed so that setuptools installs it.
    packages=[*find_packages(include=["msa", "msa.*"]), "msa.search.static", "msa.kernels"],
    # The Triton kernels live in the top-level kernels/ folder but are installed as msa.kernels: a PyPI
    # package named `kernels` exists, so that name is never imported at the top level.
    package_dir={"msa.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
