"""The Triton kernels of ``msa::mscmat_scores_triton``: forward, and the two backward kernels.

    scores[i, j] = sum_h sum_l p[i,j,h,l] * r[i,j,h,l]
    p[i,j,h,:]  = softmax over the valid words l of  scale * <q[i,h], k[j,l,h]>
    r[i,j,h,l]  = <u[i,h], v[j,l,h]>

Tiling, as in fused attention: one program owns BLOCK_I images x BLOCK_T texts. The words of its texts are laid
side by side as the BLOCK_N = BLOCK_T * BLOCK_L columns of a GEMM, so that for each head the logits S = Q_h K_h^T
and the readouts R = U_h V_h^T are two [BLOCK_I, Dh] x [Dh, BLOCK_N] tensor-core products. S and R are viewed as
[BLOCK_I, BLOCK_T, BLOCK_L]; the masked softmax over each text's words and the weighted sum stay in registers,
and only the [BLOCK_I, BLOCK_T] sum over heads is written. L is padded to a power of two BLOCK_L <= 128; longer
texts are walked in chunks of 128 words with an online softmax (ONE_CHUNK is False).

When a text fits one chunk the head loop is the innermost loop: it is the loop Triton software-pipelines, so the
q, u, k, v tiles of head h + 1 are copied while head h computes, and the word validity, which does not depend on
the head, is loaded once per program. Each program builds its pointer tiles once and advances them by one
head (or text tile, or image tile) per step.

Backward recomputes S and R (nothing but the output is stored by the forward) and forms
    dS = g * p * (r - o) * scale,   dR = g * p,   o = sum_l p r   (per image, text, head)
then dq = dS K, du = dR V in one kernel (a program per image tile and head, looping over text tiles) and
dk = dS^T Q, dv = dR^T U in another (a program per text tile, word chunk and head, looping over image tiles);
neither needs atomics nor anything of size Ni * Nt * H * L. Accumulation is float32 throughout.
"""

from __future__ import annotations

import triton
import triton.language as tl

from msa.kernels.configs import AUTOTUNE_KEY, BWD_TILES, FWD_TILES, all_configs, pruner
from msa.kernels.tiles import (
    NEG_INF,
    chunk_grads,
    chunk_rows,
    finalize,
    load_rows,
    logits_and_readouts,
    mma,
    online_update,
    softmax_stats,
)


@triton.autotune(configs=all_configs(FWD_TILES), key=AUTOTUNE_KEY, prune_configs_by=pruner(FWD_TILES, "fwd"))
@triton.jit
def mscmat_scores_fwd_kernel(
    Q, U, K, V, Mask, Out,
    stride_qi, stride_qh, stride_kt, stride_kl, stride_kh, stride_mt, stride_ml, stride_oi,
    Ni, Nt, L, H, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr,
    ONE_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_I: tl.constexpr = 8,
):  # fmt: skip
    BLOCK_T: tl.constexpr = BLOCK_N // BLOCK_L
    tl.static_assert(BLOCK_T * BLOCK_L == BLOCK_N)
    # Grouped launch order: GROUP_I image tiles sweep the same text tiles together, so k and v stay in L2.
    pid = tl.program_id(0).to(tl.int64)
    tiles_i = tl.cdiv(Ni, BLOCK_I)
    per_group = GROUP_I * tl.cdiv(Nt, BLOCK_T)
    first_i = (pid // per_group) * GROUP_I
    group_size = tl.minimum(tiles_i - first_i, GROUP_I)
    tile_i = first_i + (pid % per_group) % group_size
    tile_t = (pid % per_group) // group_size

    offs_i = tile_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    image_ok = (offs_i < Ni)[:, None] & d_ok[None, :]
    text_ids = tile_t * BLOCK_T + offs_n // BLOCK_L
    word_ids = offs_n % BLOCK_L
    text_ok = text_ids < Nt
    q_ptrs = Q + offs_i[:, None] * stride_qi + offs_d[None, :]
    u_ptrs = U + offs_i[:, None] * stride_qi + offs_d[None, :]
    word_offs = text_ids[:, None] * stride_kt + word_ids[:, None] * stride_kl + offs_d[None, :]
    k_ptrs = K + word_offs
    v_ptrs = V + word_offs
    mask_ptrs = Mask + text_ids * stride_mt + word_ids * stride_ml

    acc = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
    if ONE_CHUNK:
        in_bounds, valid = chunk_rows(mask_ptrs, text_ok, word_ids, L, HAS_MASK)
    for _ in range(H):
        q = tl.load(q_ptrs, mask=image_ok, other=0.0)
        u = tl.load(u_ptrs, mask=image_ok, other=0.0)
        if ONE_CHUNK:
            k = load_rows(k_ptrs, in_bounds, d_ok)
            v = load_rows(v_ptrs, in_bounds, d_ok)
            s3, r3 = logits_and_readouts(q, u, k, v, valid, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_T, BLOCK_L)
            m = tl.full((BLOCK_I, BLOCK_T), NEG_INF, dtype=tl.float32)
            zero = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
            m, den, num = online_update(m, zero, zero, s3, r3, scale_log2)
        else:
            m, den, num = softmax_stats(
                q, u, k_ptrs, v_ptrs, mask_ptrs, text_ok, word_ids, d_ok, BLOCK_L * stride_kl, BLOCK_L * stride_ml,
                L, scale_log2, HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_T, BLOCK_L,
            )  # fmt: skip
        _, _, head_out = finalize(m, den, num, scale_log2)
        acc += head_out
        q_ptrs += stride_qh
        u_ptrs += stride_qh
        k_ptrs += stride_kh
        v_ptrs += stride_kh
    offs_t = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    out_ok = (offs_i < Ni)[:, None] & (offs_t < Nt)[None, :]
    tl.store(Out + offs_i[:, None] * stride_oi + offs_t[None, :], acc.to(Out.dtype.element_ty), mask=out_ok)


@triton.autotune(configs=all_configs(BWD_TILES), key=AUTOTUNE_KEY, prune_configs_by=pruner(BWD_TILES, "bwd_images"))
@triton.jit
def mscmat_scores_bwd_images_kernel(
    Q, U, K, V, Mask, Grad, DQ, DU,
    stride_qi, stride_qh, stride_kt, stride_kl, stride_kh, stride_mt, stride_ml, stride_gi, stride_gt,
    Ni, Nt, L, H, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr,
    ONE_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dq and du of one image tile and one head; dq, du have q's contiguous [Ni, H, Dh] layout."""
    BLOCK_T: tl.constexpr = BLOCK_N // BLOCK_L
    tile_i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_i = tile_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    image_ok = (offs_i < Ni)[:, None] & d_ok[None, :]
    image_offs = offs_i[:, None] * stride_qi + h * stride_qh + offs_d[None, :]
    q = tl.load(Q + image_offs, mask=image_ok, other=0.0)
    u = tl.load(U + image_offs, mask=image_ok, other=0.0)

    text_ids = offs_n // BLOCK_L
    word_ids = offs_n % BLOCK_L
    word_offs = text_ids[:, None] * stride_kt + word_ids[:, None] * stride_kl + offs_d[None, :]
    k_ptrs = K + h * stride_kh + word_offs
    v_ptrs = V + h * stride_kh + word_offs
    mask_ptrs = Mask + text_ids * stride_mt + word_ids * stride_ml
    offs_t = tl.arange(0, BLOCK_T)
    g_ptrs = Grad + offs_i[:, None] * stride_gi + offs_t[None, :] * stride_gt
    dq = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
    du = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
    for _ in range(0, Nt, BLOCK_T):
        text_ok = text_ids < Nt
        g = tl.load(g_ptrs, mask=(offs_i < Ni)[:, None] & (offs_t < Nt)[None, :], other=0.0).to(tl.float32)
        if ONE_CHUNK:
            in_bounds, valid = chunk_rows(mask_ptrs, text_ok, word_ids, L, HAS_MASK)
            k = load_rows(k_ptrs, in_bounds, d_ok)
            v = load_rows(v_ptrs, in_bounds, d_ok)
            s3, r3 = logits_and_readouts(q, u, k, v, valid, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_T, BLOCK_L)
            m = tl.full((BLOCK_I, BLOCK_T), NEG_INF, dtype=tl.float32)
            zero = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
            m, den, num = online_update(m, zero, zero, s3, r3, scale_log2)
            m_scaled, inv_den, head_out = finalize(m, den, num, scale_log2)
            ds, dr = chunk_grads(s3, r3, m_scaled, inv_den, head_out, g, scale, scale_log2, BLOCK_I, BLOCK_N)
            dq = mma(ds.to(k.dtype), k, dq, INPUT_PRECISION, UPCAST)
            du = mma(dr.to(v.dtype), v, du, INPUT_PRECISION, UPCAST)
        else:
            # Long texts: a first pass over the word chunks for the softmax statistics, a second for the grads.
            m, den, num = softmax_stats(
                q, u, k_ptrs, v_ptrs, mask_ptrs, text_ok, word_ids, d_ok, BLOCK_L * stride_kl, BLOCK_L * stride_ml,
                L, scale_log2, HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_T, BLOCK_L,
            )  # fmt: skip
            m_scaled, inv_den, head_out = finalize(m, den, num, scale_log2)
            chunk_k, chunk_v, chunk_mask, chunk_words = k_ptrs, v_ptrs, mask_ptrs, word_ids
            for _ in range(0, L, BLOCK_L):
                in_bounds, valid = chunk_rows(chunk_mask, text_ok, chunk_words, L, HAS_MASK)
                k = load_rows(chunk_k, in_bounds, d_ok)
                v = load_rows(chunk_v, in_bounds, d_ok)
                s3, r3 = logits_and_readouts(q, u, k, v, valid, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_T, BLOCK_L)
                ds, dr = chunk_grads(s3, r3, m_scaled, inv_den, head_out, g, scale, scale_log2, BLOCK_I, BLOCK_N)
                dq = mma(ds.to(k.dtype), k, dq, INPUT_PRECISION, UPCAST)
                du = mma(dr.to(v.dtype), v, du, INPUT_PRECISION, UPCAST)
                chunk_k += BLOCK_L * stride_kl
                chunk_v += BLOCK_L * stride_kl
                chunk_mask += BLOCK_L * stride_ml
                chunk_words += BLOCK_L
        text_ids += BLOCK_T
        offs_t += BLOCK_T
        k_ptrs += BLOCK_T * stride_kt
        v_ptrs += BLOCK_T * stride_kt
        mask_ptrs += BLOCK_T * stride_mt
        g_ptrs += BLOCK_T * stride_gt
    tl.store(DQ + image_offs, dq.to(DQ.dtype.element_ty), mask=image_ok)
    tl.store(DU + image_offs, du.to(DU.dtype.element_ty), mask=image_ok)


@triton.autotune(configs=all_configs(BWD_TILES), key=AUTOTUNE_KEY, prune_configs_by=pruner(BWD_TILES, "bwd_words"))
@triton.jit
def mscmat_scores_bwd_words_kernel(
    Q, U, K, V, Mask, Grad, DK, DV,
    stride_qi, stride_qh, stride_kt, stride_kl, stride_kh, stride_mt, stride_ml, stride_gi, stride_gt,
    Ni, Nt, L, H, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr,
    ONE_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dk and dv of one word chunk of one text tile and one head (grid: text tiles x chunks, heads); dk, dv
    have k's contiguous [Nt, L, H, Dh] layout."""
    BLOCK_T: tl.constexpr = BLOCK_N // BLOCK_L
    num_chunks = tl.cdiv(L, BLOCK_L)
    pid = tl.program_id(0).to(tl.int64)
    tile_t = pid // num_chunks
    own_chunk = pid % num_chunks
    h = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    text_ids = tile_t * BLOCK_T + offs_n // BLOCK_L
    text_ok = text_ids < Nt
    word_ids = offs_n % BLOCK_L
    # Chunk 0 of the tile's texts (for the softmax statistics of long texts) and this program's own chunk.
    word_offs = text_ids[:, None] * stride_kt + word_ids[:, None] * stride_kl + h * stride_kh + offs_d[None, :]
    mask_ptrs = Mask + text_ids * stride_mt + word_ids * stride_ml
    own_words = own_chunk * BLOCK_L + word_ids
    own_in_bounds, own_valid = chunk_rows(mask_ptrs + own_chunk * BLOCK_L * stride_ml, text_ok, own_words, L, HAS_MASK)
    own_offs = word_offs + own_chunk * BLOCK_L * stride_kl
    k_own = load_rows(K + own_offs, own_in_bounds, d_ok)
    v_own = load_rows(V + own_offs, own_in_bounds, d_ok)

    offs_i = tl.arange(0, BLOCK_I)
    offs_t = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    q_ptrs = Q + offs_i[:, None] * stride_qi + h * stride_qh + offs_d[None, :]
    u_ptrs = U + offs_i[:, None] * stride_qi + h * stride_qh + offs_d[None, :]
    g_ptrs = Grad + offs_i[:, None] * stride_gi + offs_t[None, :] * stride_gt
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for _ in range(0, Ni, BLOCK_I):
        image_ok = (offs_i < Ni)[:, None] & d_ok[None, :]
        q = tl.load(q_ptrs, mask=image_ok, other=0.0)
        u = tl.load(u_ptrs, mask=image_ok, other=0.0)
        g = tl.load(g_ptrs, mask=(offs_i < Ni)[:, None] & (offs_t < Nt)[None, :], other=0.0).to(tl.float32)
        s3, r3 = logits_and_readouts(q, u, k_own, v_own, own_valid, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_T, BLOCK_L)
        if ONE_CHUNK:
            m = tl.full((BLOCK_I, BLOCK_T), NEG_INF, dtype=tl.float32)
            zero = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
            m, den, num = online_update(m, zero, zero, s3, r3, scale_log2)
        else:
            m, den, num = softmax_stats(
                q, u, K + word_offs, V + word_offs, mask_ptrs, text_ok, word_ids, d_ok, BLOCK_L * stride_kl,
                BLOCK_L * stride_ml, L, scale_log2, HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_T, BLOCK_L,
            )  # fmt: skip
        m_scaled, inv_den, head_out = finalize(m, den, num, scale_log2)
        ds, dr = chunk_grads(s3, r3, m_scaled, inv_den, head_out, g, scale, scale_log2, BLOCK_I, BLOCK_N)
        dk = mma(tl.trans(ds.to(q.dtype)), q, dk, INPUT_PRECISION, UPCAST)
        dv = mma(tl.trans(dr.to(u.dtype)), u, dv, INPUT_PRECISION, UPCAST)
        offs_i += BLOCK_I
        q_ptrs += BLOCK_I * stride_qi
        u_ptrs += BLOCK_I * stride_qi
        g_ptrs += BLOCK_I * stride_gi
    word_ok = own_in_bounds[:, None] & d_ok[None, :]
    tl.store(DK + own_offs, dk.to(DK.dtype.element_ty), mask=word_ok)
    tl.store(DV + own_offs, dv.to(DV.dtype.element_ty), mask=word_ok)
