"""Tile helpers shared by the forward and backward kernels of ``msa::mscmat_scores_triton``: the tensor-core
product, the bounds and validity of a chunk of words, and the end of a softmax. Everything here runs inside a
program; nothing is launched from here.

Logits stay in raw units (no scale applied) until the exponential: ``exp2(s * scale_log2 - m * scale_log2)``
is one fused multiply-add per element, where scaling s first would cost a multiply more. ``scale > 0``, so the
max of the raw logits is the max of the scaled ones.

Minus infinity is written ``float("-inf")`` where it is used, not held in a module constant: torch.compile copies
a kernel's constants into the module it generates by their repr, and ``-inf`` there is an undefined name."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b on tensor cores (float32 accumulation)."""
    if UPCAST:
        # Triton's interpreter multiplies bfloat16 operands wrongly; there the product runs in float32.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def logits_readouts(
    q, u, k, v, valid, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ZERO_READOUTS: tl.constexpr
):  # fmt: skip
    """The raw logits s = q k^T (-inf at words that are not valid) and the readouts r = u v^T of an image tile
    against a tile of word rows, float32 [images, words]. ZERO_READOUTS sets r to 0 at words that are not valid
    as well: for k, v loaded by bounds alone (the forward with a word mask), whose masked words may hold anything
    (NaN, inf); a select drops it from s and r, and nothing multiplies k or v again. Without it the caller loads
    k, v as zeros there (load_rows with the mask), as the backward must: it multiplies them by dS, dR."""
    s = tl.where(valid[None, :], mma(q, tl.trans(k), None, INPUT_PRECISION, UPCAST), float("-inf"))
    r = mma(u, tl.trans(v), None, INPUT_PRECISION, UPCAST)
    if ZERO_READOUTS:
        r = tl.where(valid[None, :], r, 0.0)
    return s, r


@triton.jit
def unmasked(mask_ptrs, in_bounds):
    """in_bounds, less the words the mask marks out. The mask (bool) is read as bytes: bool loads cost up to 13
    more registers a thread under Triton 3.6 (sm_90 compile report)."""
    word_valid = tl.load(mask_ptrs.to(tl.pointer_type(tl.uint8)), mask=in_bounds, other=0)
    return in_bounds & (word_valid != 0)


@triton.jit
def chunk_rows(mask_ptrs, text_ok, word_ids, L, HAS_MASK: tl.constexpr):
    """(in_bounds, valid) of the BLOCK_L words of a chunk: in_bounds guards the loads, valid (in bounds and not
    masked) selects the words that take part in the softmax."""
    in_bounds = text_ok & (word_ids < L)
    if HAS_MASK:
        return in_bounds, unmasked(mask_ptrs, in_bounds)
    return in_bounds, in_bounds


@triton.jit
def text_columns(
    Mask_chunk, texts_left, words_left, stride_mt, stride_ml, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    """(in_bounds, valid) of the columns of a product holding BLOCK_T consecutive texts' chunks of BLOCK_L words
    side by side (column c is word c % BLOCK_L of text c // BLOCK_L). texts_left and words_left count from that
    text and word to Nt and L; Mask_chunk points at the first text's chunk in the mask."""
    cols = tl.arange(0, BLOCK_T * BLOCK_L)
    col_text = cols // BLOCK_L
    col_word = cols % BLOCK_L
    in_bounds = (col_text < texts_left) & (col_word < words_left)
    if HAS_MASK:
        return in_bounds, unmasked(Mask_chunk + col_text * stride_mt + col_word * stride_ml, in_bounds)
    return in_bounds, in_bounds


@triton.jit
def column_rows(stride_kt, stride_kl, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr):
    """Each column's int32 offset from the first text's chunk in k and v (columns as in text_columns). Apart from
    text_columns, so that torch.compile's analysis of a launch, which takes every result of a helper to depend on
    all its arguments, does not see offsets derived from the mask: a kernel storing at them would count as
    writing the mask."""
    cols = tl.arange(0, BLOCK_T * BLOCK_L)
    return (cols // BLOCK_L) * stride_kt + (cols % BLOCK_L) * stride_kl


@triton.jit
def scaled_shift(m, scale_log2):
    """The exponent's shift m * scale_log2 for row maxima m of raw logits; 0 for a row without a valid word
    (m = -inf), whose exponentials exp2(-inf - 0) are then 0 rather than NaN."""
    return tl.where(m == float("-inf"), 0.0, m * scale_log2)


@triton.jit
def softmax_output(s, r, scale_log2, AXIS: tl.constexpr):
    """o = sum p r with p the softmax of s (raw logits, masked words at -inf) along AXIS: the words of one text.
    0 for a text without a valid word."""
    m_scaled = scaled_shift(tl.max(s, axis=AXIS), scale_log2)
    p = tl.exp2(s * scale_log2 - tl.expand_dims(m_scaled, AXIS))
    den = tl.sum(p, axis=AXIS)
    num = tl.sum(p * r, axis=AXIS)
    return tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def load_rows(ptrs, valid, d_ok):
    """A [BLOCK_L, BLOCK_D] tile of word rows: zeros where ``valid`` is False and past Dh. With the word mask in
    ``valid`` (the backward) masked words are never read, so whatever they hold (NaN, inf) cannot reach a score or
    a gradient; the forward passes bounds alone and drops them in logits_readouts."""
    return tl.load(ptrs, mask=valid[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def finalize(den, num):
    """1 / denominator and head output o per (image, text); a fully masked text gets o = 0 and 1 / den = 0, so all
    its weights vanish."""
    has_word = den > 0
    inv_den = tl.where(has_word, 1.0 / tl.where(has_word, den, 1.0), 0.0)
    return inv_den, num * inv_den


@triton.jit
def store_stats(ptrs, plane_stride, m_scaled, inv_den, head_out, rows_ok):
    """Writes the softmax statistics of BLOCK_I images against one text and head for the words kernel: the
    log2-sum-exp lse, so that p = exp2(s * scale_log2 - lse) needs no reduction there, and, plane_stride further
    on, the head output o. A text without a valid word gets lse = 0 (its words are masked there anyway)."""
    has_word = inv_den > 0
    lse = tl.where(has_word, m_scaled - tl.log2(tl.where(has_word, inv_den, 1.0)), 0.0)
    tl.store(ptrs, lse, mask=rows_ok)
    tl.store(ptrs + plane_stride, head_out, mask=rows_ok)
