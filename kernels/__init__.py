"""Triton kernels of msa, installed as ``msa.kernels`` (see setup.py)."""
