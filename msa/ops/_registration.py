"""Fake (meta) kernels and autograd of the compiled msa:: operators, so that autograd, torch.compile and
torch.library.opcheck see them like any built-in op. Only imported once msa._C has defined the schemas."""

from __future__ import annotations

import functools

import torch

from msa._autograd import register_scores_autograd


def _check_shapes(q, u, k, v, word_mask) -> None:
    torch._check(q.dim() == 3 and u.shape == q.shape, lambda: "msa::mscmat_scores: q and u must be [Ni, H, Dh]")
    torch._check(k.dim() == 4 and v.shape == k.shape, lambda: "msa::mscmat_scores: k and v must be [Nt, L, H, Dh]")
    torch._check(k.shape[2:] == q.shape[1:], lambda: "msa::mscmat_scores: H and Dh of q and k differ")
    if word_mask is not None:
        torch._check(word_mask.shape == k.shape[:2], lambda: "msa::mscmat_scores: word_mask must be [Nt, L]")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The CPU kernel computes (and keeps its softmax) in float64 for float64 inputs, float32 otherwise.
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("msa::mscmat_scores")
def _mscmat_scores_fake(q, u, k, v, word_mask, scale):
    _check_shapes(q, u, k, v, word_mask)
    return q.new_empty((q.shape[0], k.shape[0]))


def _wanted_grads(inputs, needs_grad):
    """Gradients' fakes: the input's shape where asked for, an empty tensor otherwise."""
    return tuple(torch.empty_like(t) if needed else t.new_empty((0,)) for t, needed in zip(inputs, needs_grad))


@torch.library.register_fake("msa::mscmat_scores_backward")
def _mscmat_scores_backward_fake(grad_scores, q, u, k, v, word_mask, scale, needs_grad):
    _check_shapes(q, u, k, v, word_mask)
    torch._check(grad_scores.shape == (q.shape[0], k.shape[0]), lambda: "grad_scores must be [Ni, Nt]")
    return _wanted_grads((q, u, k, v), needs_grad)


@torch.library.register_fake("msa::mscmat_scores_for_grad")
def _mscmat_scores_for_grad_fake(q, u, k, v, word_mask, scale, keep_softmax):
    _check_shapes(q, u, k, v, word_mask)
    num_texts, length, heads, _ = k.shape
    saved_shape = (heads, num_texts, length, q.shape[0]) if keep_softmax else (0,)
    dtype = _compute_dtype(q.dtype)
    return (
        q.new_empty((q.shape[0], num_texts)),
        q.new_empty(saved_shape, dtype=dtype),
        q.new_empty(saved_shape, dtype=dtype),
    )


@torch.library.register_fake("msa::mscmat_scores_for_grad_backward")
def _mscmat_scores_for_grad_backward_fake(grad_scores, q, u, k, v, word_mask, probs, logit_grads, scale, needs_grad):
    _check_shapes(q, u, k, v, word_mask)
    torch._check(grad_scores.shape == (q.shape[0], k.shape[0]), lambda: "grad_scores must be [Ni, Nt]")
    torch._check(probs.shape == logit_grads.shape, lambda: "probs and logit_grads must have one shape")
    return _wanted_grads((q, u, k, v), needs_grad)


def _setup_for_grad(ctx, inputs, output):
    q, u, k, v, word_mask, scale, _ = inputs
    _, probs, logit_grads = output
    ctx.save_for_backward(q, u, k, v, word_mask, probs, logit_grads)
    ctx.mark_non_differentiable(probs, logit_grads)
    # Otherwise autograd hands the backward zero-filled gradients of probs and logit_grads (2 x 4 H Nt L Ni bytes).
    ctx.set_materialize_grads(False)
    ctx.scale = scale


def _backward_for_grad(ctx, grad_scores, _grad_probs, _grad_logit_grads):
    q, u, k, v, word_mask, probs, logit_grads = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    if grad_scores is None:  # not materialised: nothing flowed back into the scores
        return None, None, None, None, None, None, None
    grads = torch.ops.msa.mscmat_scores_for_grad_backward(
        grad_scores, q, u, k, v, word_mask, probs, logit_grads, ctx.scale, needs
    )
    return *(grad if needed else None for grad, needed in zip(grads, needs)), None, None, None


register_scores_autograd(
    functools.partial(torch.library.register_autograd, "msa::mscmat_scores"),
    torch.ops.msa.mscmat_scores_backward,
)
torch.library.register_autograd("msa::mscmat_scores_for_grad", _backward_for_grad, setup_context=_setup_for_grad)
