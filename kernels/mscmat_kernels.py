"""The Triton kernels of ``msa::mscmat_scores_triton``: forward, and the two backward kernels.

    scores[i, j] = sum_h sum_l p[i,j,h,l] * r[i,j,h,l]
    p[i,j,h,:]  = softmax over the valid words l of  scale * <q[i,h], k[j,l,h]>
    r[i,j,h,l]  = <u[i,h], v[j,l,h]>

Every product is [BLOCK_I images, Dh] x [Dh, BLOCK_L words of one text] on tensor cores, so the masked softmax
over a text's words is a row reduction in the product's own register layout: no reshape and no layout change
through shared memory (laying several texts side by side in one product needed both, and spilled). L is padded
to a power of two 16 <= BLOCK_L <= 128; longer texts are walked in chunks of 128 words with an online softmax
(ONE_CHUNK is False). The stationary operand of each kernel is loaded once per program; the streamed one is
loaded in the innermost loop, which Triton software-pipelines (the next text's k and v are copied while this
one computes). Scalar base pointers advance once per step; the 2-D offsets inside a tile are int32 and
loop-invariant.

Backward recomputes S and R (nothing but the output is stored by the forward) and forms, from the same
exponentials, dS = g p (r - o) scale and dR = g p (o = sum_l p r per image, text, head); dq = dS K, du = dR V in
one kernel (image tile and head stationary, texts streamed) and dk = dS^T Q, dv = dR^T U in another (a text's
word chunk and head stationary, image tiles streamed): neither needs atomics nor anything of size Ni Nt H L.
Accumulation is float32 throughout.
"""

from __future__ import annotations

import triton
import triton.language as tl

from msa.kernels.configs import AUTOTUNE_KEY, BWD_IMAGES_TILES, BWD_WORDS_TILES, FWD_TILES, all_configs, pruner
from msa.kernels.tiles import NEG_INF, chunk_rows, finalize, load_rows, mma

# Image tiles of the forward that sweep the same text tiles together (see mscmat_scores_fwd_kernel). Passed at
# every launch: torch.compile's capture of a triton_op checks the arguments against the signature and takes no
# constexpr defaults.
FWD_IMAGE_GROUP = 8


@triton.jit
def _text_head_out(
    q, u, K_text, V_text, Mask_text, word_tile, text_ok, offs_l, d_ok, stride_kl, stride_ml, L, scale_log2,
    HAS_MASK: tl.constexpr, ONE_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """o = sum_l p r of BLOCK_I images against one text for one head ([BLOCK_I] float32; 0 for a text without a
    valid word; text_ok False makes every word invalid). The softmax runs along the rows of [BLOCK_I, BLOCK_L]
    products: no reshape, no layout change."""
    if ONE_CHUNK:
        in_bounds, valid = chunk_rows(Mask_text + offs_l * stride_ml, text_ok, offs_l, L, HAS_MASK)
        k = load_rows(K_text + word_tile, valid, d_ok)
        v = load_rows(V_text + word_tile, valid, d_ok)
        s = tl.where(valid[None, :], mma(q, tl.trans(k), None, INPUT_PRECISION, UPCAST), NEG_INF)
        r = mma(u, tl.trans(v), None, INPUT_PRECISION, UPCAST)
        m = tl.max(s, axis=1)
        m_scaled = tl.where(m == NEG_INF, 0.0, m * scale_log2)
        p = tl.exp2(s * scale_log2 - m_scaled[:, None])
        den = tl.sum(p, axis=1)
        num = tl.sum(p * r, axis=1)
        return tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    else:  # longer texts: the online softmax over word chunks
        _, _, head_out = _text_stats(
            q, u, K_text, V_text, Mask_text, word_tile, text_ok, offs_l, d_ok, stride_kl, stride_ml, L, scale_log2,
            HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_L,
        )  # fmt: skip
        return head_out


@triton.autotune(configs=all_configs(FWD_TILES), key=AUTOTUNE_KEY, prune_configs_by=pruner(FWD_TILES, "fwd"))
@triton.jit
def mscmat_scores_fwd_kernel(
    Q, U, K, V, Mask, Out,
    stride_qi, stride_qh, stride_kt, stride_kl, stride_kh, stride_mt, stride_ml, stride_oi,
    Ni, Nt, L, H, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr,
    ONE_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, A_IN_REGISTERS: tl.constexpr, GROUP_I: tl.constexpr,
):  # fmt: skip
    """Scores of BLOCK_I images x BLOCK_T texts. The image tile is stationary: per head, q_h and u_h are loaded
    once and the program's texts stream past them in the inner loop, the loop Triton software-pipelines (the k
    and v of the next text are copied while this one computes). Each product is [BLOCK_I, Dh] x [Dh, BLOCK_L]:
    one text's words, so the softmax is a row reduction of the product's own layout. A_IN_REGISTERS keeps q_h,
    u_h in registers as the products' A operand instead of shared memory (see configs.FWD_TILES)."""
    # Grouped launch order: GROUP_I image tiles sweep the same text tiles together, so k and v stay in L2.
    pid = tl.program_id(0).to(tl.int64)
    tiles_i = tl.cdiv(Ni, BLOCK_I)
    per_group = GROUP_I * tl.cdiv(Nt, BLOCK_T)
    first_i = (pid // per_group) * GROUP_I
    group_size = tl.minimum(tiles_i - first_i, GROUP_I)
    tile_i = first_i + (pid % per_group) % group_size
    first_text = ((pid % per_group) // group_size) * BLOCK_T

    # Scalar base pointers (64-bit) advance per head; the 2-D offsets inside a tile are int32 and loop-invariant,
    # shared by q and u (and by k and v): tiles of 64-bit pointers carried through the loops would hold two
    # registers per element and spill (sm_90 compile report).
    rows_i = tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    image_ok = (tile_i * BLOCK_I + rows_i < Ni)[:, None] & d_ok[None, :]
    image_tile = rows_i[:, None] * stride_qi + offs_d[None, :]
    word_tile = offs_l[:, None] * stride_kl + offs_d[None, :]
    Q_head = Q + tile_i * BLOCK_I * stride_qi
    U_head = U + tile_i * BLOCK_I * stride_qi
    K_head = K
    V_head = V

    acc = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
    for _ in range(H):
        q = tl.load(Q_head + image_tile, mask=image_ok, other=0.0)
        u = tl.load(U_head + image_tile, mask=image_ok, other=0.0)
        if A_IN_REGISTERS:
            # A computed operand stays in registers (wgmma's register-A form); a loaded one is staged in shared
            # memory. Adding +0.0 is exact (a -0.0 becomes +0.0, the same in a product).
            q += 0.0
            u += 0.0
        for t in range(BLOCK_T):
            text = first_text + t
            head_out = _text_head_out(
                q, u, K_head + text * stride_kt, V_head + text * stride_kt, Mask + text * stride_mt, word_tile,
                text < Nt, offs_l, d_ok, stride_kl, stride_ml, L, scale_log2, HAS_MASK, ONE_CHUNK, INPUT_PRECISION,
                UPCAST, BLOCK_I, BLOCK_L,
            )  # fmt: skip
            acc = tl.where(offs_t[None, :] == t, acc + head_out[:, None], acc)
        Q_head += stride_qh
        U_head += stride_qh
        K_head += stride_kh
        V_head += stride_kh
    offs_i = tile_i * BLOCK_I + rows_i
    text_ids = first_text + offs_t
    out_ok = (offs_i < Ni)[:, None] & (text_ids < Nt)[None, :]
    tl.store(Out + offs_i[:, None] * stride_oi + text_ids[None, :], acc.to(Out.dtype.element_ty), mask=out_ok)


@triton.jit
def _text_stats(
    q, u, K_text, V_text, Mask_text, word_tile, text_ok, offs_l, d_ok, stride_kl, stride_ml, L, scale_log2,
    HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Softmax statistics of BLOCK_I images against every word chunk of one long text and head: scaled shift,
    1 / denominator and head output o, each [BLOCK_I] (see finalize); text_ok False makes every word invalid."""
    m = tl.full((BLOCK_I,), NEG_INF, dtype=tl.float32)
    den = tl.zeros((BLOCK_I,), dtype=tl.float32)
    num = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for w0 in range(0, L, BLOCK_L):
        words = w0 + offs_l
        in_bounds, valid = chunk_rows(Mask_text + words * stride_ml, text_ok, words, L, HAS_MASK)
        k = load_rows(K_text + w0 * stride_kl + word_tile, valid, d_ok)
        v = load_rows(V_text + w0 * stride_kl + word_tile, valid, d_ok)
        s = tl.where(valid[None, :], mma(q, tl.trans(k), None, INPUT_PRECISION, UPCAST), NEG_INF)
        r = mma(u, tl.trans(v), None, INPUT_PRECISION, UPCAST)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_scaled = tl.where(m_new == NEG_INF, 0.0, m_new * scale_log2)
        alpha = tl.exp2(m * scale_log2 - m_scaled)
        p = tl.exp2(s * scale_log2 - m_scaled[:, None])
        den = den * alpha + tl.sum(p, axis=1)
        num = num * alpha + tl.sum(p * r, axis=1)
        m = m_new
    return finalize(m, den, num, scale_log2)


@triton.jit
def _product_grads(e, r, inv_den, head_out, g, scale):
    """dS = g p (r - o) scale and dR = g p of one [BLOCK_I, BLOCK_L] product, from the shifted exponentials e
    (p = e / den): the forward's exponentials serve the gradients too, one exponential pass per product."""
    gp = e * (g * inv_den)[:, None]
    return gp * (r - head_out[:, None]) * scale, gp


@triton.autotune(
    configs=all_configs(BWD_IMAGES_TILES), key=AUTOTUNE_KEY, prune_configs_by=pruner(BWD_IMAGES_TILES, "bwd_images")
)
@triton.jit
def mscmat_scores_bwd_images_kernel(
    Q, U, K, V, Mask, GradT, DQ, DU,
    stride_qi, stride_qh, stride_kt, stride_kl, stride_kh, stride_mt, stride_ml, stride_gt, stride_split,
    Ni, Nt, L, H, scale, scale_log2, texts_per_split,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr,
    ONE_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    """dq = dS K and du = dR V of one image tile and one head: q, u stay, the texts stream past them one per step
    (the pipelined loop). GradT is the incoming gradient transposed, [Nt, Ni], so that a text's column of it is
    one contiguous load; dq, du have q's contiguous [Ni, H, Dh] layout. Grid: image tiles x heads x text splits;
    with several splits each program sums texts_per_split texts into its own float32 slice of DQ, DU
    ([splits, Ni, H, Dh], stride_split apart), which the caller adds up: at training sizes (Ni = 128) the image
    tiles and heads alone make too few programs for the SMs."""
    tile_i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    first_text = split * texts_per_split
    rows_i = tl.arange(0, BLOCK_I)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows_ok = tile_i * BLOCK_I + rows_i < Ni
    image_ok = rows_ok[:, None] & d_ok[None, :]
    image_tile = rows_i[:, None] * stride_qi + offs_d[None, :]
    word_tile = offs_l[:, None] * stride_kl + offs_d[None, :]
    image_base = tile_i * BLOCK_I * stride_qi + h * stride_qh
    q = tl.load(Q + image_base + image_tile, mask=image_ok, other=0.0)
    u = tl.load(U + image_base + image_tile, mask=image_ok, other=0.0)
    G_text = GradT + first_text * stride_gt + tile_i * BLOCK_I
    K_text = K + first_text * stride_kt + h * stride_kh
    V_text = V + first_text * stride_kt + h * stride_kh
    Mask_text = Mask + first_text * stride_mt
    dq = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
    du = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
    for _ in range(first_text, tl.minimum(first_text + texts_per_split, Nt)):
        g = tl.load(G_text + rows_i, mask=rows_ok, other=0.0).to(tl.float32)
        if ONE_CHUNK:
            in_bounds, valid = chunk_rows(Mask_text + offs_l * stride_ml, True, offs_l, L, HAS_MASK)
            k = load_rows(K_text + word_tile, valid, d_ok)
            v = load_rows(V_text + word_tile, valid, d_ok)
            s = tl.where(valid[None, :], mma(q, tl.trans(k), None, INPUT_PRECISION, UPCAST), NEG_INF)
            r = mma(u, tl.trans(v), None, INPUT_PRECISION, UPCAST)
            m = tl.max(s, axis=1)
            e = tl.exp2(s * scale_log2 - tl.where(m == NEG_INF, 0.0, m * scale_log2)[:, None])
            _, inv_den, head_out = finalize(m, tl.sum(e, axis=1), tl.sum(e * r, axis=1), scale_log2)
            ds, dr = _product_grads(e, r, inv_den, head_out, g, scale)
            dq = mma(ds.to(k.dtype), k, dq, INPUT_PRECISION, UPCAST)
            du = mma(dr.to(v.dtype), v, du, INPUT_PRECISION, UPCAST)
        else:
            # Long texts: a first pass over the word chunks for the softmax statistics, a second for the grads.
            m_scaled, inv_den, head_out = _text_stats(
                q, u, K_text, V_text, Mask_text, word_tile, True, offs_l, d_ok, stride_kl, stride_ml, L, scale_log2,
                HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_L,
            )  # fmt: skip
            for w0 in range(0, L, BLOCK_L):
                words = w0 + offs_l
                in_bounds, valid = chunk_rows(Mask_text + words * stride_ml, True, words, L, HAS_MASK)
                k = load_rows(K_text + w0 * stride_kl + word_tile, valid, d_ok)
                v = load_rows(V_text + w0 * stride_kl + word_tile, valid, d_ok)
                s = tl.where(valid[None, :], mma(q, tl.trans(k), None, INPUT_PRECISION, UPCAST), NEG_INF)
                r = mma(u, tl.trans(v), None, INPUT_PRECISION, UPCAST)
                e = tl.exp2(s * scale_log2 - m_scaled[:, None])
                ds, dr = _product_grads(e, r, inv_den, head_out, g, scale)
                dq = mma(ds.to(k.dtype), k, dq, INPUT_PRECISION, UPCAST)
                du = mma(dr.to(v.dtype), v, du, INPUT_PRECISION, UPCAST)
        G_text += stride_gt
        K_text += stride_kt
        V_text += stride_kt
        Mask_text += stride_mt
    out_base = split * stride_split + image_base
    tl.store(DQ + out_base + image_tile, dq.to(DQ.dtype.element_ty), mask=image_ok)
    tl.store(DU + out_base + image_tile, du.to(DU.dtype.element_ty), mask=image_ok)


@triton.autotune(
    configs=all_configs(BWD_WORDS_TILES), key=AUTOTUNE_KEY, prune_configs_by=pruner(BWD_WORDS_TILES, "bwd_words")
)
@triton.jit
def mscmat_scores_bwd_words_kernel(
    Q, U, K, V, Mask, GradT, DK, DV,
    stride_qi, stride_qh, stride_kt, stride_kl, stride_kh, stride_mt, stride_ml, stride_gt,
    Ni, Nt, L, H, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr,
    ONE_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    """dk = dS^T Q and dv = dR^T U of one word chunk of one text and one head (grid: texts x chunks, heads): its
    k, v stay, the image tiles stream past. The products are computed transposed, dk^T = Q^T dS: their M is
    Dh >= 64 rows, which Hopper's wgmma needs, where a chunk of 32 words would fall back to mma.sync."""
    num_chunks = tl.cdiv(L, BLOCK_L)
    pid = tl.program_id(0).to(tl.int64)
    text = pid // num_chunks
    w0 = (pid % num_chunks) * BLOCK_L
    h = tl.program_id(1).to(tl.int64)
    rows_i = tl.arange(0, BLOCK_I)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    image_tile = rows_i[:, None] * stride_qi + offs_d[None, :]
    word_tile = offs_l[:, None] * stride_kl + offs_d[None, :]
    K_text = K + text * stride_kt + h * stride_kh
    V_text = V + text * stride_kt + h * stride_kh
    Mask_text = Mask + text * stride_mt
    words = w0 + offs_l
    in_bounds, valid = chunk_rows(Mask_text + words * stride_ml, True, words, L, HAS_MASK)
    k = load_rows(K_text + w0 * stride_kl + word_tile, valid, d_ok)
    v = load_rows(V_text + w0 * stride_kl + word_tile, valid, d_ok)
    Q_tile = Q + h * stride_qh
    U_tile = U + h * stride_qh
    G_tile = GradT + text * stride_gt
    dk_t = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    dv_t = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for i0 in range(0, Ni, BLOCK_I):
        rows_ok = i0 + rows_i < Ni
        image_ok = rows_ok[:, None] & d_ok[None, :]
        q = tl.load(Q_tile + image_tile, mask=image_ok, other=0.0)
        u = tl.load(U_tile + image_tile, mask=image_ok, other=0.0)
        g = tl.load(G_tile + rows_i, mask=rows_ok, other=0.0).to(tl.float32)
        s = tl.where(valid[None, :], mma(q, tl.trans(k), None, INPUT_PRECISION, UPCAST), NEG_INF)
        r = mma(u, tl.trans(v), None, INPUT_PRECISION, UPCAST)
        if ONE_CHUNK:
            m = tl.max(s, axis=1)
            e = tl.exp2(s * scale_log2 - tl.where(m == NEG_INF, 0.0, m * scale_log2)[:, None])
            _, inv_den, head_out = finalize(m, tl.sum(e, axis=1), tl.sum(e * r, axis=1), scale_log2)
        else:
            m_scaled, inv_den, head_out = _text_stats(
                q, u, K_text, V_text, Mask_text, word_tile, True, offs_l, d_ok, stride_kl, stride_ml, L, scale_log2,
                HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_L,
            )  # fmt: skip
            e = tl.exp2(s * scale_log2 - m_scaled[:, None])
        ds, dr = _product_grads(e, r, inv_den, head_out, g, scale)
        dk_t = mma(tl.trans(q), ds.to(q.dtype), dk_t, INPUT_PRECISION, UPCAST)
        dv_t = mma(tl.trans(u), dr.to(u.dtype), dv_t, INPUT_PRECISION, UPCAST)
        Q_tile += BLOCK_I * stride_qi
        U_tile += BLOCK_I * stride_qi
        G_tile += BLOCK_I
    # dk and dv have k's contiguous layout: element (d, l) of dk^T goes to word w0 + l, feature d.
    out_tile = offs_d[:, None] + offs_l[None, :] * stride_kl
    out_ok = d_ok[:, None] & in_bounds[None, :]
    out_base = text * stride_kt + h * stride_kh + w0 * stride_kl
    tl.store(DK + out_base + out_tile, dk_t.to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + out_base + out_tile, dv_t.to(DV.dtype.element_ty), mask=out_ok)
