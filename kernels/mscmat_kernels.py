"""The Triton kernels of ``msa::mscmat_scores_triton``: forward, and the two backward kernels.

    scores[i, j] = sum_h sum_l p[i,j,h,l] * r[i,j,h,l]
    p[i,j,h,:]  = softmax over the valid words l of  scale * <q[i,h], k[j,l,h]>
    r[i,j,h,l]  = <u[i,h], v[j,l,h]>

Every product is [BLOCK_I images, Dh] x [Dh, BLOCK_L words of one text] on tensor cores, so the masked softmax
over a text's words is a row reduction in the product's own register layout, or holds BLOCK_T texts side by side
([Dh, BLOCK_T * BLOCK_L], see tiles.text_columns): a reshape to [BLOCK_I, BLOCK_T, BLOCK_L] then puts each text's
words on the last axis, which Triton's linear layouts do without moving data. L is padded to a power of two
16 <= BLOCK_L <= 128; longer texts are walked in chunks of 128 words with an online softmax (ONE_CHUNK is False),
one text per product. The stationary operand of each kernel is loaded once per program; the streamed one is
loaded in the innermost loop, which Triton software-pipelines (the next text's k and v are copied while this
one computes). Scalar base pointers advance once per step; the 2-D offsets inside a tile are int32 and
loop-invariant.

Backward recomputes S and R (nothing but the output is stored by the forward) and forms, from the same
exponentials, dS = g p (r - o) scale and dR = g p (o = sum_l p r per image, text, head); dq = dS K, du = dR V in
one kernel (image tile and head stationary, texts streamed) and dk = dS^T Q, dv = dR^T U in another (the word
chunks of a few texts and a head stationary, image tiles streamed): neither needs atomics nor anything of size
Ni Nt H L. The first kernel also writes each (image, text, head)'s log-sum-exp and o (8 bytes; the caller bounds
their total), so the second needs no reduction over a text's words: its p is elementwise, which lets one product
hold several texts. Accumulation is float32 throughout.
"""

from __future__ import annotations

import triton
import triton.language as tl

from msa.kernels.configs import AUTOTUNE_KEY, BWD_IMAGES_TILES, BWD_WORDS_TILES, FWD_TILES, all_configs, pruner
from msa.kernels.tiles import (
    chunk_rows,
    column_rows,
    finalize,
    load_rows,
    logits_readouts,
    mma,
    scaled_shift,
    softmax_output,
    store_stats,
    text_columns,
)

# Image tiles of the forward that sweep the same text tiles together (see mscmat_scores_fwd_kernel). Passed at
# every launch: torch.compile's analysis of a triton_op's launches takes no constexpr defaults (it would then take
# the kernel to write every tensor it gets, and a compiled call would copy q, u, k and v first).
FWD_IMAGE_GROUP = 8

# FLOAT_ARGUMENTS: each kernel turns its float arguments (scale, scale_log2) into float32 first. A plain launch
# passes a Python float as float32, but torch.compile's generated code passes it as float64, and a float64 scalar
# makes Triton compute the tiles it multiplies in float64 (the forward then fails to compile: its float32
# accumulator would turn float64 in the loop; the backward ran its softmax in float64).


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
        # k, v by bounds alone: loads predicated on the mask loaded in the same pipelined loop held ~37 registers
        # more (the default tile 113-114 instead of 77-79 on sm_90: two blocks per SM instead of three).
        in_bounds, valid = chunk_rows(Mask_text + offs_l * stride_ml, text_ok, offs_l, L, HAS_MASK)
        k = load_rows(K_text + word_tile, in_bounds, d_ok)
        v = load_rows(V_text + word_tile, in_bounds, d_ok)
        s, r = logits_readouts(q, u, k, v, valid, INPUT_PRECISION, UPCAST, HAS_MASK)
        return softmax_output(s, r, scale_log2, 1)
    else:  # longer texts: the online softmax over word chunks
        _, _, head_out = _text_stats(
            q, u, K_text, V_text, Mask_text, word_tile, text_ok, offs_l, d_ok, stride_kl, stride_ml, L, scale_log2,
            HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_L,
        )  # fmt: skip
        return head_out


@triton.jit
def _texts_logits_readouts(
    q, u, k, v, valid, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ZERO_READOUTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Logits and readouts (see tiles.logits_readouts) of BLOCK_I images against BLOCK_T texts whose words lie side
    by side in k, v (see text_columns), as [BLOCK_I, BLOCK_T, BLOCK_L]: a reshape, which Triton lowers without
    moving data, puts each text's words on the last axis."""
    s, r = logits_readouts(q, u, k, v, valid, INPUT_PRECISION, UPCAST, ZERO_READOUTS)
    rows: tl.constexpr = s.shape[0]
    return tl.reshape(s, (rows, BLOCK_T, BLOCK_L)), tl.reshape(r, (rows, BLOCK_T, BLOCK_L))


@triton.jit
def _texts_head_out(
    q, u, K_texts, V_texts, word_tile, in_bounds, valid, d_ok, scale_log2,
    HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    """o of BLOCK_I images against BLOCK_T texts for one head ([BLOCK_I, BLOCK_T]) from one product per operand
    pair, [BLOCK_I, Dh] x [Dh, BLOCK_T * BLOCK_L] with the texts' words side by side (see
    _texts_logits_readouts), the softmax along each text's words. k, v by bounds alone, as in _text_head_out."""
    k = load_rows(K_texts + word_tile, in_bounds, d_ok)
    v = load_rows(V_texts + word_tile, in_bounds, d_ok)
    s, r = _texts_logits_readouts(q, u, k, v, valid, INPUT_PRECISION, UPCAST, HAS_MASK, BLOCK_T, BLOCK_L)
    return softmax_output(s, r, scale_log2, 2)


@triton.autotune(configs=all_configs(FWD_TILES), key=AUTOTUNE_KEY, prune_configs_by=pruner(FWD_TILES, "fwd"))
@triton.jit
def mscmat_scores_fwd_kernel(
    Q, U, K, V, Mask, Out,
    stride_qi, stride_qh, stride_kt, stride_kl, stride_kh, stride_mt, stride_ml, stride_oi, stride_split,
    Ni, Nt, L, H, scale_log2, heads_per_split,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr,
    ONE_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, A_IN_REGISTERS: tl.constexpr, WIDE: tl.constexpr,
    GROUP_I: tl.constexpr,
):  # fmt: skip
    """Scores of BLOCK_I images x BLOCK_T texts. The image tile is stationary: per head, q_h and u_h are loaded
    once and the program's texts stream past them in the inner loop, the loop Triton software-pipelines (the k
    and v of the next text are copied while this one computes). Each product is [BLOCK_I, Dh] x [Dh, BLOCK_L]:
    one text's words, so the softmax is a row reduction of the product's own layout. A_IN_REGISTERS keeps q_h,
    u_h in registers as the products' A operand instead of shared memory (see configs.FWD_TILES). WIDE (texts
    of one chunk) puts all BLOCK_T texts in one product per head instead: the head loop is the pipelined one,
    and q_h, u_h are read from shared memory once per BLOCK_T texts rather than once per text.
    Grid: tiles x head splits. With several splits (small problems: image and text tiles alone make too few
    programs for the SMs) each program sums heads_per_split heads into its own float32 slice of Out (stride_split
    apart), which the caller adds up."""
    scale_log2 = tl.cast(scale_log2, tl.float32)  # (see FLOAT_ARGUMENTS)
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
    first_head = tl.program_id(1).to(tl.int64) * heads_per_split
    Q_head = Q + tile_i * BLOCK_I * stride_qi + first_head * stride_qh
    U_head = U + tile_i * BLOCK_I * stride_qi + first_head * stride_qh
    K_head = K + first_head * stride_kh
    V_head = V + first_head * stride_kh
    one_product: tl.constexpr = WIDE and ONE_CHUNK
    if one_product:
        texts_in_bounds, texts_valid = text_columns(
            Mask + first_text * stride_mt, Nt - first_text, L, stride_mt, stride_ml, HAS_MASK, BLOCK_T, BLOCK_L
        )
        texts_tile = column_rows(stride_kt, stride_kl, BLOCK_T, BLOCK_L)[:, None] + offs_d[None, :]
        K_head += first_text * stride_kt
        V_head += first_text * stride_kt

    acc = tl.zeros((BLOCK_I, BLOCK_T), dtype=tl.float32)
    for _ in range(first_head, tl.minimum(first_head + heads_per_split, H)):
        q = tl.load(Q_head + image_tile, mask=image_ok, other=0.0)
        u = tl.load(U_head + image_tile, mask=image_ok, other=0.0)
        if A_IN_REGISTERS:
            # A computed operand stays in registers (wgmma's register-A form); a loaded one is staged in shared
            # memory. Adding +0.0 is exact (a -0.0 becomes +0.0, the same in a product).
            q += 0.0
            u += 0.0
        if one_product:
            acc += _texts_head_out(
                q, u, K_head, V_head, texts_tile, texts_in_bounds, texts_valid, d_ok, scale_log2, HAS_MASK,
                INPUT_PRECISION, UPCAST, BLOCK_T, BLOCK_L,
            )  # fmt: skip
        else:
            for t in range(BLOCK_T):
                text = first_text + t
                head_out = _text_head_out(
                    q, u, K_head + text * stride_kt, V_head + text * stride_kt, Mask + text * stride_mt, word_tile,
                    text < Nt, offs_l, d_ok, stride_kl, stride_ml, L, scale_log2, HAS_MASK, ONE_CHUNK,
                    INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_L,
                )  # fmt: skip
                acc = tl.where(offs_t[None, :] == t, acc + head_out[:, None], acc)
        Q_head += stride_qh
        U_head += stride_qh
        K_head += stride_kh
        V_head += stride_kh
    offs_i = tile_i * BLOCK_I + rows_i
    text_ids = first_text + offs_t
    out_ok = (offs_i < Ni)[:, None] & (text_ids < Nt)[None, :]
    Out_split = Out + tl.program_id(1).to(tl.int64) * stride_split
    tl.store(Out_split + offs_i[:, None] * stride_oi + text_ids[None, :], acc.to(Out.dtype.element_ty), mask=out_ok)


@triton.jit
def _chunk_products(
    q, u, K_text, V_text, Mask_text, w0, word_tile, text_ok, offs_l, d_ok, stride_kl, stride_ml, L,
    HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """k and v of the BLOCK_L words of a long text from word w0 on (zeros at masked words), and the logits (-inf
    there) and readouts of BLOCK_I images against them."""
    words = w0 + offs_l
    _, valid = chunk_rows(Mask_text + words * stride_ml, text_ok, words, L, HAS_MASK)
    k = load_rows(K_text + w0 * stride_kl + word_tile, valid, d_ok)
    v = load_rows(V_text + w0 * stride_kl + word_tile, valid, d_ok)
    s, r = logits_readouts(q, u, k, v, valid, INPUT_PRECISION, UPCAST, False)
    return k, v, s, r


@triton.jit
def _text_stats(
    q, u, K_text, V_text, Mask_text, word_tile, text_ok, offs_l, d_ok, stride_kl, stride_ml, L, scale_log2,
    HAS_MASK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Softmax statistics of BLOCK_I images against every word chunk of one long text and head: scaled shift,
    1 / denominator and head output o, each [BLOCK_I] (see scaled_shift, finalize); text_ok False makes every word
    invalid."""
    m = tl.full((BLOCK_I,), float("-inf"), dtype=tl.float32)
    den = tl.zeros((BLOCK_I,), dtype=tl.float32)
    num = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for w0 in range(0, L, BLOCK_L):
        _, _, s, r = _chunk_products(
            q, u, K_text, V_text, Mask_text, w0, word_tile, text_ok, offs_l, d_ok, stride_kl, stride_ml, L, HAS_MASK,
            INPUT_PRECISION, UPCAST,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_scaled = scaled_shift(m_new, scale_log2)
        alpha = tl.exp2(m * scale_log2 - m_scaled)
        p = tl.exp2(s * scale_log2 - m_scaled[:, None])
        den = den * alpha + tl.sum(p, axis=1)
        num = num * alpha + tl.sum(p * r, axis=1)
        m = m_new
    inv_den, head_out = finalize(den, num)
    return scaled_shift(m, scale_log2), inv_den, head_out


@triton.jit
def _texts_exponentials(
    q, u, k, v, valid, scale_log2,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """The shifted exponentials e and the readouts r of BLOCK_I images against BLOCK_T texts whose words lie side by
    side in k, v (see text_columns), as [BLOCK_I, BLOCK_T, BLOCK_L] with a text's words on the last axis, and each
    (image, text)'s scaled shift, 1 / denominator and head output o (see scaled_shift, finalize): one product per
    operand pair and one exponential pass, which the backward's gradients reuse (see _product_grads)."""
    s, r = _texts_logits_readouts(q, u, k, v, valid, INPUT_PRECISION, UPCAST, False, BLOCK_T, BLOCK_L)
    m_scaled = scaled_shift(tl.max(s, axis=2), scale_log2)
    e = tl.exp2(s * scale_log2 - m_scaled[:, :, None])
    inv_den, head_out = finalize(tl.sum(e, axis=2), tl.sum(e * r, axis=2))
    return e, r, m_scaled, inv_den, head_out


@triton.jit
def _product_grads(e, r, inv_den, head_out, g, scale, AXIS: tl.constexpr):
    """dS = g p (r - o) scale and dR = g p of one product, from the shifted exponentials e (p = e / den; a text's
    words along AXIS, one statistic per image and text in inv_den, head_out, g): the forward's exponentials serve
    the gradients too, one exponential pass per product."""
    gp = e * tl.expand_dims(g * inv_den, AXIS)
    return gp * (r - tl.expand_dims(head_out, AXIS)) * scale, gp


@triton.autotune(
    configs=all_configs(BWD_IMAGES_TILES), key=AUTOTUNE_KEY, prune_configs_by=pruner(BWD_IMAGES_TILES, "bwd_images")
)
@triton.jit
def mscmat_scores_bwd_images_kernel(
    Q, U, K, V, Mask, GradT, DQ, DU, Stats,
    stride_qi, stride_qh, stride_kt, stride_kl, stride_kh, stride_mt, stride_ml, stride_gt, stride_split,
    stride_sp, stride_sh, stride_st,
    Ni, Nt, L, H, scale, scale_log2, texts_per_split,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr,
    ONE_CHUNK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    IMAGE_GRADS: tl.constexpr, STORE_STATS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """dq = dS K and du = dR V of one image tile and one head: q, u stay, the texts stream past them, BLOCK_T per
    step side by side in one product (texts of one chunk; longer ones one per step), in the pipelined loop. GradT
    is the incoming gradient transposed, [Nt, Ni], so that a text's column of it is one contiguous load; dq, du
    have q's contiguous [Ni, H, Dh] layout. Grid: image tiles x heads x text splits;
    with several splits each program sums texts_per_split texts into its own float32 slice of DQ, DU
    ([splits, Ni, H, Dh], stride_split apart), which the caller adds up: at training sizes (Ni = 128) the image
    tiles and heads alone make too few programs for the SMs.
    STORE_STATS writes each (image, text, head)'s softmax statistics to Stats ([2, H, Nt, Ni] float32: lse, o)
    for the words kernel; IMAGE_GRADS False computes only those (a frozen image side)."""
    scale, scale_log2 = tl.cast(scale, tl.float32), tl.cast(scale_log2, tl.float32)  # (see FLOAT_ARGUMENTS)
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
    last_text = tl.minimum(first_text + texts_per_split, Nt)
    G_text = GradT + first_text * stride_gt + tile_i * BLOCK_I
    S_text = Stats + h * stride_sh + first_text * stride_st + tile_i * BLOCK_I
    K_text = K + first_text * stride_kt + h * stride_kh
    V_text = V + first_text * stride_kt + h * stride_kh
    Mask_text = Mask + first_text * stride_mt
    dq = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
    du = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float32)
    # Texts of one chunk: BLOCK_T per step, side by side in one product (see text_columns), with [BLOCK_I, BLOCK_T]
    # statistics. Long texts: one per step, a first pass over the word chunks for the softmax statistics, a second
    # for the grads.
    texts_per_step: tl.constexpr = BLOCK_T if ONE_CHUNK else 1
    offs_t = tl.arange(0, BLOCK_T)
    stats_tile = rows_i[:, None] + (offs_t * stride_st)[None, :]
    grad_tile = rows_i[:, None] + (offs_t * stride_gt)[None, :]
    for text in range(first_text, last_text, texts_per_step):
        if ONE_CHUNK:
            _, valid = text_columns(Mask_text, last_text - text, L, stride_mt, stride_ml, HAS_MASK, BLOCK_T, BLOCK_L)
            texts_tile = column_rows(stride_kt, stride_kl, BLOCK_T, BLOCK_L)[:, None] + offs_d[None, :]
            k = load_rows(K_text + texts_tile, valid, d_ok)
            v = load_rows(V_text + texts_tile, valid, d_ok)
            e, r, m_scaled, inv_den, head_out = _texts_exponentials(
                q, u, k, v, valid, scale_log2, INPUT_PRECISION, UPCAST, BLOCK_T, BLOCK_L
            )
            # Texts past the split belong to another program: their statistics must not be stored from here.
            texts_ok = rows_ok[:, None] & (offs_t < last_text - text)[None, :]
            if IMAGE_GRADS:
                g = tl.load(G_text + grad_tile, mask=texts_ok, other=0.0).to(tl.float32)
                ds, dr = _product_grads(e, r, inv_den, head_out, g, scale, 2)
                ds = tl.reshape(ds, (BLOCK_I, BLOCK_T * BLOCK_L))
                dr = tl.reshape(dr, (BLOCK_I, BLOCK_T * BLOCK_L))
                dq = mma(ds.to(k.dtype), k, dq, INPUT_PRECISION, UPCAST)
                du = mma(dr.to(v.dtype), v, du, INPUT_PRECISION, UPCAST)
            if STORE_STATS:
                store_stats(S_text + stats_tile, stride_sp, m_scaled, inv_den, head_out, texts_ok)
        else:
            m_scaled, inv_den, head_out = _text_stats(
                q, u, K_text, V_text, Mask_text, word_tile, True, offs_l, d_ok, stride_kl, stride_ml, L, scale_log2,
                HAS_MASK, INPUT_PRECISION, UPCAST, BLOCK_I, BLOCK_L,
            )  # fmt: skip
            if STORE_STATS:
                store_stats(S_text + rows_i, stride_sp, m_scaled, inv_den, head_out, rows_ok)
            if IMAGE_GRADS:
                g = tl.load(G_text + rows_i, mask=rows_ok, other=0.0).to(tl.float32)
                for w0 in range(0, L, BLOCK_L):
                    k, v, s, r = _chunk_products(
                        q, u, K_text, V_text, Mask_text, w0, word_tile, True, offs_l, d_ok, stride_kl, stride_ml, L,
                        HAS_MASK, INPUT_PRECISION, UPCAST,
                    )  # fmt: skip
                    e = tl.exp2(s * scale_log2 - m_scaled[:, None])
                    ds, dr = _product_grads(e, r, inv_den, head_out, g, scale, 1)
                    dq = mma(ds.to(k.dtype), k, dq, INPUT_PRECISION, UPCAST)
                    du = mma(dr.to(v.dtype), v, du, INPUT_PRECISION, UPCAST)
        G_text += texts_per_step * stride_gt
        S_text += texts_per_step * stride_st
        K_text += texts_per_step * stride_kt
        V_text += texts_per_step * stride_kt
        Mask_text += texts_per_step * stride_mt
    if IMAGE_GRADS:
        out_base = split * stride_split + image_base
        tl.store(DQ + out_base + image_tile, dq.to(DQ.dtype.element_ty), mask=image_ok)
        tl.store(DU + out_base + image_tile, du.to(DU.dtype.element_ty), mask=image_ok)


@triton.jit
def _per_column(per_text, BLOCK_L: tl.constexpr):
    """[BLOCK_I, BLOCK_T] values per image and text as [BLOCK_I, BLOCK_T * BLOCK_L], one per image and column
    (column c belongs to text c // BLOCK_L)."""
    rows: tl.constexpr = per_text.shape[0]
    texts: tl.constexpr = per_text.shape[1]
    widened = tl.broadcast_to(per_text[:, :, None], (rows, texts, BLOCK_L))
    return tl.reshape(widened, (rows, texts * BLOCK_L))


@triton.autotune(
    configs=all_configs(BWD_WORDS_TILES), key=AUTOTUNE_KEY, prune_configs_by=pruner(BWD_WORDS_TILES, "bwd_words")
)
@triton.jit
def mscmat_scores_bwd_words_kernel(
    Q, U, K, V, Mask, GradT, Stats, DK, DV,
    stride_qi, stride_qh, stride_kt, stride_kl, stride_kh, stride_mt, stride_ml, stride_gt,
    stride_sp, stride_sh, stride_st,
    Ni, Nt, L, H, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """dk = dS^T Q and dv = dR^T U of one word chunk of BLOCK_T consecutive texts and one head (grid: text tiles x
    chunks, heads): their k, v stay, side by side as the columns of one product (column c is word c % BLOCK_L of
    text c // BLOCK_L), and the image tiles stream past. The softmax statistics come from the images kernel
    (Stats, see mscmat_scores_bwd_images_kernel), so p = exp2(s * scale_log2 - lse) is elementwise: no reduction
    across a text's words, and the columns may belong to several texts. Each q, u byte read from L2 then serves
    BLOCK_T texts. The products are computed transposed, dk^T = Q^T dS: their M is Dh >= 64 rows, which Hopper's
    wgmma needs, where a chunk of 32 words would fall back to mma.sync."""
    scale, scale_log2 = tl.cast(scale, tl.float32), tl.cast(scale_log2, tl.float32)  # (see FLOAT_ARGUMENTS)
    num_chunks = tl.cdiv(L, BLOCK_L)
    pid = tl.program_id(0).to(tl.int64)
    first_text = (pid // num_chunks) * BLOCK_T
    w0 = (pid % num_chunks) * BLOCK_L
    h = tl.program_id(1).to(tl.int64)
    rows_i = tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # The 64-bit parts of the offsets sit in the base pointers; word_rows are int32.
    in_bounds, valid = text_columns(
        Mask + first_text * stride_mt + w0 * stride_ml, Nt - first_text, L - w0, stride_mt, stride_ml, HAS_MASK,
        BLOCK_T, BLOCK_L,
    )  # fmt: skip
    word_rows = column_rows(stride_kt, stride_kl, BLOCK_T, BLOCK_L)
    word_tile = word_rows[:, None] + offs_d[None, :]
    K_chunk = K + first_text * stride_kt + w0 * stride_kl + h * stride_kh
    V_chunk = V + first_text * stride_kt + w0 * stride_kl + h * stride_kh
    k = load_rows(K_chunk + word_tile, valid, d_ok)
    v = load_rows(V_chunk + word_tile, valid, d_ok)
    image_tile = rows_i[:, None] * stride_qi + offs_d[None, :]
    # Statistics and gradient per image and text: [BLOCK_I, BLOCK_T] loads, widened to the columns in registers.
    offs_t = tl.arange(0, BLOCK_T)
    texts_ok = first_text + offs_t < Nt
    grad_tile = rows_i[:, None] + (offs_t * stride_gt)[None, :]
    stats_tile = rows_i[:, None] + (offs_t * stride_st)[None, :]
    Q_tile = Q + h * stride_qh
    U_tile = U + h * stride_qh
    G_tile = GradT + first_text * stride_gt
    S_tile = Stats + h * stride_sh + first_text * stride_st
    dk_t = tl.zeros((BLOCK_D, BLOCK_T * BLOCK_L), dtype=tl.float32)
    dv_t = tl.zeros((BLOCK_D, BLOCK_T * BLOCK_L), dtype=tl.float32)
    for i0 in range(0, Ni, BLOCK_I):
        rows_ok = i0 + rows_i < Ni
        image_ok = rows_ok[:, None] & d_ok[None, :]
        stats_ok = rows_ok[:, None] & texts_ok[None, :]
        q = tl.load(Q_tile + image_tile, mask=image_ok, other=0.0)
        u = tl.load(U_tile + image_tile, mask=image_ok, other=0.0)
        g = _per_column(tl.load(G_tile + grad_tile, mask=stats_ok, other=0.0).to(tl.float32), BLOCK_L)
        lse = _per_column(tl.load(S_tile + stats_tile, mask=stats_ok, other=0.0), BLOCK_L)
        head_out = _per_column(tl.load(S_tile + stride_sp + stats_tile, mask=stats_ok, other=0.0), BLOCK_L)
        s = mma(q, tl.trans(k), None, INPUT_PRECISION, UPCAST)
        r = mma(u, tl.trans(v), None, INPUT_PRECISION, UPCAST)
        dr = tl.where(valid[None, :], g * tl.exp2(s * scale_log2 - lse), 0.0)
        ds = dr * (r - head_out) * scale
        dk_t = mma(tl.trans(q), ds.to(q.dtype), dk_t, INPUT_PRECISION, UPCAST)
        dv_t = mma(tl.trans(u), dr.to(u.dtype), dv_t, INPUT_PRECISION, UPCAST)
        Q_tile += BLOCK_I * stride_qi
        U_tile += BLOCK_I * stride_qi
        G_tile += BLOCK_I
        S_tile += BLOCK_I
    # dk and dv have k's contiguous layout: element (d, c) of dk^T goes to column c's word, feature d.
    out_tile = offs_d[:, None] + word_rows[None, :]
    out_ok = d_ok[:, None] & in_bounds[None, :]
    out_base = first_text * stride_kt + w0 * stride_kl + h * stride_kh
    tl.store(DK + out_base + out_tile, dk_t.to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + out_base + out_tile, dv_t.to(DV.dtype.element_ty), mask=out_ok)
