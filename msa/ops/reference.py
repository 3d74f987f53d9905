"""The one mathematical reference of ``mscmat_scores``: plain einsums, imported by tests and benchmarks."""

from __future__ import annotations

import torch


def mscmat_scores_ref(
    q: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    word_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Pairwise MSCMAT core, materialising the [Ni, Nt, H, L] logits.

    ``scores[i, j] = sum_h sum_l softmax_l(scale * <q[i,h], k[j,l,h]>) * <u[i,h], v[j,l,h]>``, the softmax
    running over the words with a nonzero ``word_mask[j, l]``; a text with no valid word scores 0.

    Args:
        q: image queries [Ni, H, Dh].
        u: image readout vectors [Ni, H, Dh].
        k: word keys [Nt, L, H, Dh].
        v: word values [Nt, L, H, Dh].
        word_mask: [Nt, L], nonzero = real token; None = every token is real.
        scale: logit scale, default Dh ** -0.5.

    Returns:
        scores [Ni, Nt] in the inputs' dtype.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if word_mask is not None:
        # A masked word contributes nothing whatever k and v hold there (NaN, inf): zeroing them also keeps
        # 0 * NaN out of the gradients of q and u.
        word_is_masked = (word_mask == 0)[:, :, None, None]
        k, v = k.masked_fill(word_is_masked, 0.0), v.masked_fill(word_is_masked, 0.0)
    logits = torch.einsum("ihd,jlhd->ijhl", q, k) * scale
    readouts = torch.einsum("ihd,jlhd->ijhl", u, v)
    if word_mask is None:
        weights = logits.softmax(dim=-1)
    else:
        valid = (word_mask != 0)[None, :, None, :]
        weights = logits.masked_fill(~valid, float("-inf")).softmax(dim=-1)
        # A text with no valid word has a 0/0 softmax; it contributes nothing instead. The readouts of masked
        # words are zeroed too, so that a non-finite image row (u) cannot reach a score through 0 * inf.
        weights = weights.masked_fill(~valid, 0.0)
        readouts = readouts.masked_fill(~valid, 0.0)
    return (weights * readouts).sum(dim=(-1, -2))
