"""Autograd of every msa scores op: each has the signature (q, u, k, v, word_mask, scale) and a backward op
(grad_scores, q, u, k, v, word_mask, scale, needs_grad) -> (dq, du, dk, dv) that computes only the gradients
flagged in needs_grad and returns empty tensors for the others."""

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
        needs = list(ctx.needs_input_grad[:4])
        grads = backward_op(grad_scores, q, u, k, v, word_mask, ctx.scale, needs)
        return *(grad if needed else None for grad, needed in zip(grads, needs)), None, None

    register(backward, setup_context=setup_context)
