"""Tile helpers shared by the forward and backward kernels of ``msa::mscmat_scores_triton``: the tensor-core
product, a chunk of words (their rows, validity and the two products against an image tile) and the online
softmax over the chunks. Everything here runs inside a program; nothing is launched from here.

Logits stay in raw units (no scale applied) until the exponential: ``exp2(s * scale_log2 - m * scale_log2)``
is one fused multiply-add per element, where scaling s first would cost a multiply more. ``scale > 0``, so the
max of the raw logits is the max of the scaled ones."""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b on tensor cores (float32 accumulation)."""
    if UPCAST:
        # Triton's interpreter multiplies bfloat16 operands wrongly; there the product runs in float32.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def chunk_rows(mask_ptrs, text_ok, word_ids, L, HAS_MASK: tl.constexpr):
    """(in_bounds, valid) of the BLOCK_N word rows of a chunk: in_bounds guards the loads, valid (in bounds and
    not masked) selects the words that take part in the softmax."""
    in_bounds = text_ok & (word_ids < L)
    if HAS_MASK:
        word_valid = tl.load(mask_ptrs, mask=in_bounds, other=0)
        return in_bounds, in_bounds & (word_valid != 0)
    return in_bounds, in_bounds


@triton.jit
def load_rows(ptrs, in_bounds, d_ok):
    """A [BLOCK_N, BLOCK_D] tile of word rows (zeros outside the text tile and past Dh)."""
    return tl.load(ptrs, mask=in_bounds[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def logits_and_readouts(
    q, u, k, v, valid, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Raw logits s = q k^T (-inf on invalid words) and readouts r = u v^T of one chunk, as
    [BLOCK_I, BLOCK_T, BLOCK_L] float32 (the chunk's BLOCK_N = BLOCK_T * BLOCK_L words are laid text by text)."""
    s = mma(q, tl.trans(k), None, INPUT_PRECISION, UPCAST)
    r = mma(u, tl.trans(v), None, INPUT_PRECISION, UPCAST)
    s3 = tl.reshape(s, (BLOCK_I, BLOCK_T, BLOCK_L))
    r3 = tl.reshape(r, (BLOCK_I, BLOCK_T, BLOCK_L))
    s3 = tl.where(tl.reshape(valid, (1, BLOCK_T, BLOCK_L)), s3, NEG_INF)
    return s3, r3


@triton.jit
def online_update(m, den, num, s3, r3, scale_log2):
    """One chunk of the online softmax per (image, text): running raw max m, denominator den and numerator
    num = sum exp2((s - m) scale log2 e) r. A text whose words so far are all masked keeps m = -inf, den = 0."""
    m_new = tl.maximum(m, tl.max(s3, axis=2))
    m_scaled = tl.where(m_new == NEG_INF, 0.0, m_new * scale_log2)
    alpha = tl.exp2(m * scale_log2 - m_scaled)
    p = tl.exp2(s3 * scale_log2 - m_scaled[:, :, None])
    den = den * alpha + tl.sum(p, axis=2)
    num = num * alpha + tl.sum(p * r3, axis=2)
    return m_new, den, num


@triton.jit
def finalize(m, den, num, scale_log2):
    """Scaled shift, 1 / denominator and head output o per (image, text); a fully masked text gets o = 0 and
    1 / den = 0, so all its weights vanish."""
    m_scaled = tl.where(m == NEG_INF, 0.0, m * scale_log2)
    has_word = den > 0
    inv_den = tl.where(has_word, 1.0 / tl.where(has_word, den, 1.0), 0.0)
    return m_scaled, inv_den, num * inv_den


@triton.jit
def chunk_grads(
    s3, r3, m_scaled, inv_den, head_out, g, scale, scale_log2, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr
):
    """dS = g p (r - o) scale and dR = g p of one chunk, flattened back to [BLOCK_I, BLOCK_N]."""
    gp = tl.exp2(s3 * scale_log2 - m_scaled[:, :, None]) * (g * inv_den)[:, :, None]
    ds = gp * (r3 - head_out[:, :, None]) * scale
    return tl.reshape(ds, (BLOCK_I, BLOCK_N)), tl.reshape(gp, (BLOCK_I, BLOCK_N))


@triton.jit
def softmax_stats(
    q, u, k_ptrs, v_ptrs, mask_ptrs, text_ok, word_ids, d_ok, kv_chunk_step, mask_chunk_step, L, scale_log2,
    HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Online-softmax state (m, den, num) of every (image, text) pair of the tile over all word chunks of one
    head; the pointers address chunk 0 and advance by one chunk of words per step."""
    m = tl.full((BLOCK_I, BLOCK_T), NEG_INF, dtype=tl.float32)
    den = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
    num = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
    for _ in range(0, L, BLOCK_L):
        in_bounds, valid = chunk_rows(mask_ptrs, text_ok, word_ids, L, HAS_MASK)
        k = load_rows(k_ptrs, in_bounds, d_ok)
        v = load_rows(v_ptrs, in_bounds, d_ok)
        s3, r3 = logits_and_readouts(q, u, k, v, valid, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_T, BLOCK_L)
        m, den, num = online_update(m, den, num, s3, r3, scale_log2)
        k_ptrs += kv_chunk_step
        v_ptrs += kv_chunk_step
        mask_ptrs += mask_chunk_step
        word_ids += BLOCK_L
    return m, den, num
