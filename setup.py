"""Build of msa and its compiled kernels (msa._C).

Knobs (environment variables):
  MSA_FORCE_CUDA=1       build the CUDA kernels even when no GPU is visible (needs CUDA_HOME and a CUDA torch)
  MSA_SKIP_CUDA_BUILD=1  never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST   architectures for nvcc, e.g. "8.0;9.0" (required when no GPU is visible)
  MAX_JOBS, NVCC_THREADS parallelism of the build
"""

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("MSA_SKIP_CUDA_BUILD", "0") == "1":
        return False
    cuda_sources = glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
    if not cuda_sources or CUDA_HOME is None or torch.version.cuda is None:
        return False
    return os.environ.get("MSA_FORCE_CUDA", "0") == "1" or torch.cuda.is_available()


def _extension():
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx_flags = ["-O3", *openmp]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    if _want_cuda():
        sources += sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo"]
        nvcc_flags += ["--threads", os.environ.get("NVCC_THREADS", "4")]
        return CUDAExtension(
            "msa._C",
            sources,
            define_macros=[("MSA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=openmp,
        )
    return CppExtension("msa._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)


setup(
    packages=[*find_packages(include=["msa", "msa.*"]), "msa.kernels"],
    # The Triton kernels live in the top-level kernels/ folder but are installed as msa.kernels: a PyPI
    # package named `kernels` exists, so that name is never imported at the top level.
    package_dir={"msa.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
