"""Fake (meta) kernels and autograd of the compiled msa:: operators, so that autograd, torch.compile and
torch.library.opcheck see them like any built-in op. Only imported once msa._C has defined the schemas."""

from __future__ import annotations

import torch


@torch.library.register_fake("msa::mscmat_scores")
def _mscmat_scores_fake(q, u, k, v, word_mask, scale):
    return q.new_empty((q.shape[0], k.shape[0]))


@torch.library.register_fake("msa::mscmat_scores_backward")
def _mscmat_scores_backward_fake(grad_scores, q, u, k, v, word_mask, scale):
    return torch.empty_like(q), torch.empty_like(u), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, u, k, v, word_mask, scale = inputs
    ctx.save_for_backward(q, u, k, v, word_mask)
    ctx.scale = scale


def _backward(ctx, grad_scores):
    q, u, k, v, word_mask = ctx.saved_tensors
    dq, du, dk, dv = torch.ops.msa.mscmat_scores_backward(grad_scores, q, u, k, v, word_mask, ctx.scale)
    return dq, du, dk, dv, None, None


torch.library.register_autograd("msa::mscmat_scores", _backward, setup_context=_setup_context)
