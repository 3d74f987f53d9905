"""Autograd of every msa scores op: each has the signature (q, u, k, v, word_mask, scale) and a backward op
(grad_scores, q, u, k, v, word_mask, scale) -> (dq, du, dk, dv)."""

from __future__ import annotations

from collections.abc import Callable


def register_scores_autograd(register: Callable, backward_op: Callable) -> None:
    """Registers autograd through ``register(backward, setup_context=...)`` (``torch.library.register_autograd``
    bound to the op's name, or a ``triton_op``'s ``register_autograd``), computing gradients with ``backward_op``."""

    def setup_context(ctx, inputs, output):
        q, u, k, v, word_mask, scale = inputs
        ctx.save_for_backward(q, u, k, v, word_mask)
        ctx.scale = scale

    def backward(ctx, grad_scores):
        q, u, k, v, word_mask = ctx.saved_tensors
        dq, du, dk, dv = backward_op(grad_scores, q, u, k, v, word_mask, ctx.scale)
        return dq, du, dk, dv, None, None

    register(backward, setup_context=setup_context)
