"""Triton kernels of ``msa::mscmat_scores``, forward and backward, registered as the custom op
``msa::mscmat_scores_triton`` so that autograd and ``torch.compile`` see through it.

    scores[i, j] = sum_h sum_l p[i,j,h,l] * r[i,j,h,l]
    p[i,j,h,:]  = softmax over the valid words l of  scale * <q[i,h], k[j,l,h]>
    r[i,j,h,l]  = <u[i,h], v[j,l,h]>

Tiling, as in fused attention: one program owns BLOCK_I images x BLOCK_T texts. The words of its texts are
laid side by side as the BLOCK_N = BLOCK_T * BLOCK_L columns of a GEMM, so that for each head the logits
S = Q_h K_h^T and the readouts R = U_h V_h^T are two [BLOCK_I, Dh] x [Dh, BLOCK_N] tensor-core products.
S and R are viewed as [BLOCK_I, BLOCK_T, BLOCK_L]; the masked softmax over each text's words and the
weighted sum stay in registers, and only the [BLOCK_I, BLOCK_T] sum over heads is written. L is padded to a
power of two BLOCK_L <= 128; longer texts are walked in chunks of 128 words with an online softmax.

Backward recomputes S and R (nothing but the output is stored by the forward) and forms
    dS = g * p * (r - o) * scale,   dR = g * p,   o = sum_l p r   (per image, text, head)
then dq = dS K, du = dR V in one kernel (a program per image tile and head, looping over texts) and
dk = dS^T Q, dv = dR^T U in another (a program per text tile and head, looping over images); neither needs
atomics nor anything of size Ni * Nt * H * L. Accumulation is float32 throughout; float32 inputs use TF32
tensor cores only when ``torch.backends.cuda.matmul.allow_tf32`` is set, as torch's own matmul does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from msa.ops._autograd import register_scores_autograd

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Texts longer than this are processed in chunks of this many words (online softmax).
MAX_BLOCK_L = 128
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# (BLOCK_I, BLOCK_N, num_warps, num_stages) per input kind, in order of preference; with autotuning off
# (MSA_TRITON_AUTOTUNE=0, as in the tests) the first that holds a whole chunk (BLOCK_N >= BLOCK_L) runs.
# float32 runs its products on FMA units (no TF32 unless torch allows it) and stages more in shared memory
# (a [16, 128] tile with Dh = 128 already takes 160 KB on sm_90): it gets small tiles.
_FWD_TILES = {
    "low": [(64, 128, 4, 2), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 8, 3)],
    "fp32": [(32, 64, 4, 1), (16, 128, 4, 1), (32, 128, 4, 1)],
}
_BWD_TILES = {
    "low": [(64, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (32, 128, 4, 2), (64, 128, 4, 3)],
    "fp32": [(32, 64, 4, 1), (16, 128, 4, 1)],
}


def _tile_of(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_I"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _configs(tiles: dict[str, list[tuple[int, int, int, int]]]) -> list[triton.Config]:
    if _INTERPRET:
        # The interpreter runs every config it is given: one keeps CPU tests fast. A single config is never
        # pruned, so BLOCK_N is the largest BLOCK_L.
        return [triton.Config({"BLOCK_I": 16, "BLOCK_N": MAX_BLOCK_L}, num_warps=4, num_stages=1)]
    unique = dict.fromkeys(tile for kind in tiles.values() for tile in kind)
    return [
        triton.Config({"BLOCK_I": bi, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bi, bn, warps, stages in unique
    ]


def _pruner(tiles: dict[str, list[tuple[int, int, int, int]]]):
    def prune(configs, named_args, **kwargs):
        block_l = kwargs.get("BLOCK_L", named_args.get("BLOCK_L"))
        wanted = tiles["fp32" if named_args["Q"].dtype == torch.float32 else "low"]
        by_tile = {_tile_of(config): config for config in configs}
        kept = [by_tile[tile] for tile in wanted if tile in by_tile and tile[1] >= block_l]
        if os.environ.get("MSA_TRITON_AUTOTUNE", "1") == "0":
            return kept[:1]
        return kept

    return {"early_config_prune": prune}


_FWD_CONFIGS = _configs(_FWD_TILES)
_BWD_CONFIGS = _configs(_BWD_TILES)
# Sizes are in the key: the best tile differs between a 128-text batch and a 5465-caption test split.
_AUTOTUNE_KEY = ["Ni", "Nt", "L", "H", "HEAD_DIM", "HAS_MASK", "INPUT_PRECISION", "UPCAST"]


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b on tensor cores (float32 accumulation)."""
    if UPCAST:
        # Triton's interpreter multiplies bfloat16 operands wrongly; there the product runs in float32.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _load_chunk(
    q,
    u,
    K,
    V,
    Mask,
    text_ids,
    word_ids,
    h,
    offs_d,
    stride_kt,
    stride_kl,
    stride_kh,
    stride_mt,
    stride_ml,
    Nt,
    L,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Loads one chunk of words (BLOCK_T texts x BLOCK_L words, flattened to BLOCK_N rows) of head h and
    returns k, v [BLOCK_N, BLOCK_D], the base-2 logits s [BLOCK_I, BLOCK_T, BLOCK_L] (-inf on masked or padded
    words) and the readouts r [BLOCK_I, BLOCK_T, BLOCK_L], both float32."""
    row_ok = (text_ids < Nt) & (word_ids < L)
    offs = text_ids[:, None] * stride_kt + word_ids[:, None] * stride_kl + h * stride_kh + offs_d[None, :]
    load_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + offs, mask=load_mask, other=0.0)
    v = tl.load(V + offs, mask=load_mask, other=0.0)
    if HAS_MASK:
        word_valid = tl.load(Mask + text_ids * stride_mt + word_ids * stride_ml, mask=row_ok, other=0)
        valid = row_ok & (word_valid != 0)
    else:
        valid = row_ok
    s = _mma(q, tl.trans(k), None, INPUT_PRECISION, UPCAST) * scale_log2
    r = _mma(u, tl.trans(v), None, INPUT_PRECISION, UPCAST)
    s3 = tl.reshape(s, (BLOCK_I, BLOCK_T, BLOCK_L))
    r3 = tl.reshape(r, (BLOCK_I, BLOCK_T, BLOCK_L))
    valid3 = tl.reshape(valid, (1, BLOCK_T, BLOCK_L))
    s3 = tl.where(valid3, s3, float("-inf"))
    return k, v, s3, r3


@triton.jit
def _online_update(m, den, num, s3, r3):
    """One step of the online softmax per (image, text): running max m, denominator den and sum num of
    exp2(s - m) * r. A text whose words seen so far are all masked keeps m = -inf and den = num = 0."""
    m_new = tl.maximum(m, tl.max(s3, axis=2))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s3 - m_safe[:, :, None])
    den = den * alpha + tl.sum(p, axis=2)
    num = num * alpha + tl.sum(p * r3, axis=2)
    return m_new, den, num


@triton.jit
def _softmax_stats(
    q, u, K, V, Mask, text_ids, h, offs_n, offs_d, stride_kt, stride_kl, stride_kh, stride_mt, stride_ml, Nt, L,
    scale_log2, HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Running max m, denominator and numerator of every (image, text) pair of the tile over all the texts'
    word chunks (see _online_update)."""
    m = tl.full((BLOCK_I, BLOCK_T), float("-inf"), dtype=tl.float32)
    den = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
    num = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
    for w0 in range(0, L, BLOCK_L):
        word_ids = w0 + offs_n % BLOCK_L
        _, _, s3, r3 = _load_chunk(
            q, u, K, V, Mask, text_ids, word_ids, h, offs_d, stride_kt, stride_kl, stride_kh, stride_mt,
            stride_ml, Nt, L, scale_log2, HEAD_DIM, HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_T, BLOCK_L,
        )  # fmt: skip
        m, den, num = _online_update(m, den, num, s3, r3)
    return m, den, num


@triton.jit
def _finalize(m, den, num):
    """Shift, 1 / denominator and head output o per (image, text); a fully masked text gets o = 0 and
    1 / den = 0, so all its weights vanish."""
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    has_word = den > 0
    inv_den = tl.where(has_word, 1.0 / tl.where(has_word, den, 1.0), 0.0)
    return m_safe, inv_den, num * inv_den


@triton.jit
def _chunk_grads(s3, r3, m_safe, inv_den, head_out, g, scale, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr):
    """dS = g p (r - o) scale and dR = g p of one chunk, flattened back to [BLOCK_I, BLOCK_N]."""
    gp = tl.exp2(s3 - m_safe[:, :, None]) * (g * inv_den)[:, :, None]
    ds = gp * (r3 - head_out[:, :, None]) * scale
    return tl.reshape(ds, (BLOCK_I, BLOCK_N)), tl.reshape(gp, (BLOCK_I, BLOCK_N))


@triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_pruner(_FWD_TILES))
@triton.jit
def _mscmat_scores_fwd_kernel(
    Q,
    U,
    K,
    V,
    Mask,
    Out,
    stride_qi,
    stride_qh,
    stride_kt,
    stride_kl,
    stride_kh,
    stride_mt,
    stride_ml,
    stride_oi,
    Ni,
    Nt,
    L,
    H,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_I: tl.constexpr = 8,
):
    BLOCK_T: tl.constexpr = BLOCK_N // BLOCK_L
    tl.static_assert(BLOCK_T * BLOCK_L == BLOCK_N)
    # Grouped launch order: GROUP_I image tiles sweep the same text tiles together, so k and v stay in L2.
    pid = tl.program_id(0).to(tl.int64)
    tiles_i = tl.cdiv(Ni, BLOCK_I)
    tiles_t = tl.cdiv(Nt, BLOCK_T)
    per_group = GROUP_I * tiles_t
    first_i = (pid // per_group) * GROUP_I
    group_size = tl.minimum(tiles_i - first_i, GROUP_I)
    tile_i = first_i + (pid % per_group) % group_size
    tile_t = (pid % per_group) // group_size

    offs_i = tile_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    text_ids = tile_t * BLOCK_T + offs_n // BLOCK_L
    image_mask = (offs_i[:, None] < Ni) & (offs_d[None, :] < HEAD_DIM)

    acc = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
    for h in range(H):
        image_offs = offs_i[:, None] * stride_qi + h * stride_qh + offs_d[None, :]
        q = tl.load(Q + image_offs, mask=image_mask, other=0.0)
        u = tl.load(U + image_offs, mask=image_mask, other=0.0)
        m, den, num = _softmax_stats(
            q, u, K, V, Mask, text_ids, h, offs_n, offs_d, stride_kt, stride_kl, stride_kh, stride_mt,
            stride_ml, Nt, L, scale_log2, HEAD_DIM, HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_T,
            BLOCK_L,
        )  # fmt: skip
        _, _, head_out = _finalize(m, den, num)
        acc += head_out
    out_mask = (offs_i[:, None] < Ni) & (offs_t[None, :] < Nt)
    tl.store(Out + offs_i[:, None] * stride_oi + offs_t[None, :], acc.to(Out.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_BWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_pruner(_BWD_TILES))
@triton.jit
def _mscmat_scores_bwd_images_kernel(
    Q,
    U,
    K,
    V,
    Mask,
    Grad,
    DQ,
    DU,
    stride_qi,
    stride_qh,
    stride_kt,
    stride_kl,
    stride_kh,
    stride_mt,
    stride_ml,
    stride_gi,
    stride_gt,
    Ni,
    Nt,
    L,
    H,
    scale,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq and du of one image tile and one head; dq, du have q's contiguous [Ni, H, Dh] layout."""
    BLOCK_T: tl.constexpr = BLOCK_N // BLOCK_L
    tile_i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_i = tile_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    image_offs = offs_i[:, None] * stride_qi + h * stride_qh + offs_d[None, :]
    image_mask = (offs_i[:, None] < Ni) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + image_offs, mask=image_mask, other=0.0)
    u = tl.load(U + image_offs, mask=image_mask, other=0.0)
    dq = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
    du = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, Nt, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        text_ids = t0 + (offs_n // BLOCK_L).to(tl.int64)
        g_mask = (offs_i[:, None] < Ni) & (offs_t[None, :] < Nt)
        g = tl.load(Grad + offs_i[:, None] * stride_gi + offs_t[None, :] * stride_gt, mask=g_mask, other=0.0)
        g = g.to(tl.float32)
        if ONE_CHUNK:
            m = tl.full((BLOCK_I, BLOCK_T), float("-inf"), dtype=tl.float32)
            den = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
            num = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
            word_ids = offs_n % BLOCK_L
            k, v, s3, r3 = _load_chunk(
                q, u, K, V, Mask, text_ids, word_ids, h, offs_d, stride_kt, stride_kl, stride_kh, stride_mt,
                stride_ml, Nt, L, scale_log2, HEAD_DIM, HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I,
                BLOCK_T, BLOCK_L,
            )  # fmt: skip
            m, den, num = _online_update(m, den, num, s3, r3)
            m_safe, inv_den, head_out = _finalize(m, den, num)
            ds, dr = _chunk_grads(s3, r3, m_safe, inv_den, head_out, g, scale, BLOCK_I, BLOCK_N)
            dq = _mma(ds.to(k.dtype), k, dq, INPUT_PRECISION, UPCAST)
            du = _mma(dr.to(v.dtype), v, du, INPUT_PRECISION, UPCAST)
        else:
            # Long texts: a first pass over the word chunks for the softmax statistics, a second for the grads.
            m, den, num = _softmax_stats(
                q, u, K, V, Mask, text_ids, h, offs_n, offs_d, stride_kt, stride_kl, stride_kh, stride_mt,
                stride_ml, Nt, L, scale_log2, HEAD_DIM, HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_T,
                BLOCK_L,
            )  # fmt: skip
            m_safe, inv_den, head_out = _finalize(m, den, num)
            for w0 in range(0, L, BLOCK_L):
                word_ids = w0 + offs_n % BLOCK_L
                k, v, s3, r3 = _load_chunk(
                    q, u, K, V, Mask, text_ids, word_ids, h, offs_d, stride_kt, stride_kl, stride_kh, stride_mt,
                    stride_ml, Nt, L, scale_log2, HEAD_DIM, HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I,
                BLOCK_T, BLOCK_L,
                )  # fmt: skip
                ds, dr = _chunk_grads(s3, r3, m_safe, inv_den, head_out, g, scale, BLOCK_I, BLOCK_N)
                dq = _mma(ds.to(k.dtype), k, dq, INPUT_PRECISION, UPCAST)
                du = _mma(dr.to(v.dtype), v, du, INPUT_PRECISION, UPCAST)
    tl.store(DQ + image_offs, dq.to(DQ.dtype.element_ty), mask=image_mask)
    tl.store(DU + image_offs, du.to(DU.dtype.element_ty), mask=image_mask)


@triton.autotune(configs=_BWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_pruner(_BWD_TILES))
@triton.jit
def _mscmat_scores_bwd_words_kernel(
    Q,
    U,
    K,
    V,
    Mask,
    Grad,
    DK,
    DV,
    stride_qi,
    stride_qh,
    stride_kt,
    stride_kl,
    stride_kh,
    stride_mt,
    stride_ml,
    stride_gi,
    stride_gt,
    Ni,
    Nt,
    L,
    H,
    scale,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dk and dv of one word chunk of one text tile and one head (grid: text tiles x chunks, heads); dk, dv
    have k's contiguous [Nt, L, H, Dh] layout."""
    BLOCK_T: tl.constexpr = BLOCK_N // BLOCK_L
    num_chunks = tl.cdiv(L, BLOCK_L)
    pid = tl.program_id(0).to(tl.int64)
    tile_t = pid // num_chunks
    own_w0 = (pid % num_chunks) * BLOCK_L
    h = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    text_ids = tile_t * BLOCK_T + offs_n // BLOCK_L
    own_word_ids = own_w0 + offs_n % BLOCK_L
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for i0 in range(0, Ni, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        image_offs = offs_i[:, None] * stride_qi + h * stride_qh + offs_d[None, :]
        image_mask = (offs_i[:, None] < Ni) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q + image_offs, mask=image_mask, other=0.0)
        u = tl.load(U + image_offs, mask=image_mask, other=0.0)
        g_mask = (offs_i[:, None] < Ni) & (offs_t[None, :] < Nt)
        g = tl.load(Grad + offs_i[:, None] * stride_gi + offs_t[None, :] * stride_gt, mask=g_mask, other=0.0)
        g = g.to(tl.float32)
        if ONE_CHUNK:
            m = tl.full((BLOCK_I, BLOCK_T), float("-inf"), dtype=tl.float32)
            den = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
            num = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
            _, _, s3, r3 = _load_chunk(
                q, u, K, V, Mask, text_ids, own_word_ids, h, offs_d, stride_kt, stride_kl, stride_kh, stride_mt,
                stride_ml, Nt, L, scale_log2, HEAD_DIM, HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I,
                BLOCK_T, BLOCK_L,
            )  # fmt: skip
            m, den, num = _online_update(m, den, num, s3, r3)
        else:
            m, den, num = _softmax_stats(
                q, u, K, V, Mask, text_ids, h, offs_n, offs_d, stride_kt, stride_kl, stride_kh, stride_mt,
                stride_ml, Nt, L, scale_log2, HEAD_DIM, HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_T,
                BLOCK_L,
            )  # fmt: skip
            _, _, s3, r3 = _load_chunk(
                q, u, K, V, Mask, text_ids, own_word_ids, h, offs_d, stride_kt, stride_kl, stride_kh, stride_mt,
                stride_ml, Nt, L, scale_log2, HEAD_DIM, HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I,
                BLOCK_T, BLOCK_L,
            )  # fmt: skip
        m_safe, inv_den, head_out = _finalize(m, den, num)
        ds, dr = _chunk_grads(s3, r3, m_safe, inv_den, head_out, g, scale, BLOCK_I, BLOCK_N)
        dk = _mma(tl.trans(ds.to(q.dtype)), q, dk, INPUT_PRECISION, UPCAST)
        dv = _mma(tl.trans(dr.to(u.dtype)), u, dv, INPUT_PRECISION, UPCAST)
    word_offs = text_ids[:, None] * stride_kt + own_word_ids[:, None] * stride_kl + h * stride_kh + offs_d[None, :]
    word_mask = ((text_ids < Nt) & (own_word_ids < L))[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + word_offs, dk.to(DK.dtype.element_ty), mask=word_mask)
    tl.store(DV + word_offs, dv.to(DV.dtype.element_ty), mask=word_mask)


def _block_sizes(num_words: int, head_dim: int) -> tuple[int, int]:
    block_l = min(triton.next_power_of_2(max(num_words, 1)), MAX_BLOCK_L)
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    return block_l, block_d


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def _prepared(q, u, k, v, word_mask):
    """Unit-stride last dims (the kernels index the head dim directly), one set of strides for q and u and one
    for k and v (the kernels take them once), and the mask as uint8 (or a dummy pointer)."""
    if q.stride() != u.stride() or q.stride(-1) != 1:
        q, u = q.contiguous(), u.contiguous()
    if k.stride() != v.stride() or k.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    if word_mask is None:
        return q, u, k, v, q, (0, 0), False
    mask = word_mask if word_mask.dtype == torch.bool else word_mask != 0
    mask = mask.view(torch.uint8)
    return q, u, k, v, mask, (mask.stride(0), mask.stride(1)), True


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"mscmat_scores (triton): inputs must be float32, float16 or bfloat16, got {q.dtype}")


@triton_op("msa::mscmat_scores_triton", mutates_args=())
def _mscmat_scores_triton_op(
    q: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, word_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    _check_dtype(q)
    num_images, heads, head_dim = q.shape
    num_texts, num_words = k.shape[0], k.shape[1]
    out = torch.empty((num_images, num_texts), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if num_words == 0 or heads == 0:
        return out.zero_()
    q, u, k, v, mask, mask_strides, has_mask = _prepared(q, u, k, v, word_mask)
    block_l, block_d = _block_sizes(num_words, head_dim)

    def grid(meta):
        return (triton.cdiv(num_images, meta["BLOCK_I"]) * triton.cdiv(num_texts, meta["BLOCK_N"] // block_l),)

    wrap_triton(_mscmat_scores_fwd_kernel)[grid](
        q, u, k, v, mask, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), *mask_strides, out.stride(0),
        num_images, num_texts, num_words, heads, scale * 1.4426950408889634,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_L=block_l, HAS_MASK=has_mask,
        INPUT_PRECISION=_input_precision(q.dtype), UPCAST=_upcast(q.dtype),
    )  # fmt: skip
    return out


@triton_op("msa::mscmat_scores_triton_backward", mutates_args=())
def _mscmat_scores_triton_backward_op(
    grad_scores: torch.Tensor,
    q: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    word_mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_dtype(q)
    num_images, heads, head_dim = q.shape
    num_texts, num_words = k.shape[0], k.shape[1]
    dq, du = (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(u, memory_format=torch.contiguous_format),
    )
    dk, dv = (
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )
    if num_images == 0 or num_texts == 0 or num_words == 0 or heads == 0:
        return dq.zero_(), du.zero_(), dk.zero_(), dv.zero_()
    q, u, k, v, mask, mask_strides, has_mask = _prepared(q, u, k, v, word_mask)
    # dq/du and q share strides (both contiguous after _prepared), likewise dk/dv and k.
    q, u, k, v = (t.contiguous() for t in (q, u, k, v))
    block_l, block_d = _block_sizes(num_words, head_dim)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_L=block_l, HAS_MASK=has_mask,
                  INPUT_PRECISION=_input_precision(q.dtype), UPCAST=_upcast(q.dtype),
                  ONE_CHUNK=num_words <= block_l)  # fmt: skip
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), mask_strides[0], mask_strides[1],
               grad_scores.stride(0), grad_scores.stride(1))  # fmt: skip
    sizes = (num_images, num_texts, num_words, heads, scale, scale * 1.4426950408889634)

    def images_grid(meta):
        return (triton.cdiv(num_images, meta["BLOCK_I"]), heads)

    def words_grid(meta):
        text_tiles = triton.cdiv(num_texts, meta["BLOCK_N"] // block_l)
        return (text_tiles * triton.cdiv(num_words, block_l), heads)

    wrap_triton(_mscmat_scores_bwd_images_kernel)[images_grid](
        q, u, k, v, mask, grad_scores, dq, du, *strides, *sizes, **common
    )
    wrap_triton(_mscmat_scores_bwd_words_kernel)[words_grid](
        q, u, k, v, mask, grad_scores, dk, dv, *strides, *sizes, **common
    )
    return dq, du, dk, dv


register_scores_autograd(_mscmat_scores_triton_op.register_autograd, torch.ops.msa.mscmat_scores_triton_backward)


def mscmat_scores_triton(
    q: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    word_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Every image x text score of one MSCMAT scale with the Triton kernels (differentiable, compilable).

    Args:
        q: image queries [Ni, H, Dh], float32/float16/bfloat16 on a CUDA device (or the CPU under
            ``TRITON_INTERPRET=1``).
        u: image readout vectors [Ni, H, Dh].
        k: word keys [Nt, L, H, Dh].
        v: word values [Nt, L, H, Dh].
        word_mask: [Nt, L] bool or integer, nonzero = real token; None = every token is real.
        scale: logit scale, default ``Dh ** -0.5``.

    Returns:
        scores [Ni, Nt] in the inputs' dtype (float32 accumulation).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.msa.mscmat_scores_triton(q, u, k, v, word_mask, float(scale))
