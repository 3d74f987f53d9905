"""Fake (meta) kernels and autograd of the compiled msa:: operators, so that autograd, torch.compile and
torch.library.opcheck see them like any built-in op. Only imported once msa._C has defined the schemas."""

from __future__ import annotations

import functools

import torch

from msa._autograd import register_scores_autograd


@torch.library.register_fake("msa::mscmat_scores")
def _mscmat_scores_fake(q, u, k, v, word_mask, scale):
    return q.new_empty((q.shape[0], k.shape[0]))


@torch.library.register_fake("msa::mscmat_scores_backward")
def _mscmat_scores_backward_fake(grad_scores, q, u, k, v, word_mask, scale):
    return torch.empty_like(q), torch.empty_like(u), torch.empty_like(k), torch.empty_like(v)


register_scores_autograd(
    functools.partial(torch.library.register_autograd, "msa::mscmat_scores"),
    torch.ops.msa.mscmat_scores_backward,
)
