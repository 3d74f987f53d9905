"""Triton kernels of msa, installed as ``msa.kernels`` (see setup.py)."""

from msa.kernels.mscmat_triton import mscmat_scores_triton

__all__ = ["mscmat_scores_triton"]
