"""Fused operators of msa. ``mscmat_scores`` is the drop-in op; ``mscmat_scores_ref`` its einsum reference."""

from msa.ops.mscmat import (
    available_backends,
    backend_available,
    empty_cache,
    mscmat_scores,
    resolve_backend,
    saved_softmax_bytes,
    set_saved_softmax_budget,
)
from msa.ops.reference import mscmat_scores_ref

__all__ = [
    "available_backends",
    "backend_available",
    "empty_cache",
    "mscmat_scores",
    "mscmat_scores_ref",
    "resolve_backend",
    "saved_softmax_bytes",
    "set_saved_softmax_budget",
]
