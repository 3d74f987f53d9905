"""One fused Triton backward kernel of ``mscmat_scores``, and the atomic adds it needs timed alone: the
measurements that decide between it and the op's two backward kernels.

The op's backward runs two kernels: the images kernel (dq, du: a sum over texts) and the words kernel (dk, dv: a
sum over images). Each recomputes the logits S and readouts R, so together they run 8 GEMM-sized products and two
exponential passes. ``fused_backward`` runs 6 and one: a program owns BLOCK_T texts (one word chunk each) and a
head, keeps their k, v and dk, dv, and streams every image tile past them; each tile's dq, du share is added into
float32 dq, du in global memory with atomics, per program and image tile 2 x BLOCK_I x Dh adds, Ni H Dh 2 Nt /
BLOCK_T in all (6.4e9 at Ni = Nt = 4096, H = 12, Dh = 64 and four 32-word texts a program).

``image_side_atomics`` runs exactly that atomic traffic and nothing else: the same grid (text blocks x heads), each
program loading q, u of every image tile (starting at a tile of its own, as the fused kernel does, to spread the
adds over addresses) and adding them into float32 dq, du with relaxed atomics. What the two kernels spend and the
fused one does not is the words kernel's recompute of S and R (2 of the 8 products) and its exponentials.

Benchmark code: the op does not dispatch to it. Texts of one chunk only (BLOCK_T x BLOCK_L <= MAX_BLOCK_L).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa.kernels.configs import MAX_BLOCK_L
from msa.kernels.mscmat_kernels import _product_grads, _texts_exponentials
from msa.kernels.mscmat_triton import LOG2_E, _block_sizes, _cdiv, _input_precision, _prepared, _upcast
from msa.kernels.tiles import column_rows, load_rows, mma, text_columns

# The tiles bench_gpu_targets times: (texts a program, images a tile, warps). Two 32-word texts is the most that
# compiles without spills at Dh 64 (four spilled 160-936 B per thread on the sm_90 compile, Triton 3.6.0 and 3.8.0;
# two take 216-255 registers, one 178-210).
FUSED_TILES = ((2, 64, 4), (2, 128, 8))


@triton.jit
def image_side_atomics_kernel(
    Q, U, DQ, DU, num_images, stride_i, stride_h, image_tiles, HEAD_DIM: tl.constexpr, BLOCK_I: tl.constexpr
):
    text_block = tl.program_id(0)
    head = tl.program_id(1)
    rows = tl.arange(0, BLOCK_I)
    cols = tl.arange(0, HEAD_DIM)
    for step in range(image_tiles):
        tile = (step + text_block) % image_tiles
        images = tile * BLOCK_I + rows
        offsets = images[:, None] * stride_i + head * stride_h + cols[None, :]
        inside = (images < num_images)[:, None]
        q = tl.load(Q + offsets, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(U + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.atomic_add(DQ + offsets, q, mask=inside, sem="relaxed")
        tl.atomic_add(DU + offsets, u, mask=inside, sem="relaxed")


def image_side_atomics(
    q: torch.Tensor, u: torch.Tensor, num_texts: int, texts_per_program: int = 4, block_i: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 dq, du [Ni, H, Dh] after every text block's program has added q, u of every image into them, i.e.
    ``cdiv(num_texts, texts_per_program) * q`` (and u): the atomics of a fused backward, without its products.
    q, u: contiguous [Ni, H, Dh] with a power-of-two Dh >= 16."""
    num_images, heads, head_dim = q.shape
    if q.shape != u.shape or not (q.is_contiguous() and u.is_contiguous()):
        raise ValueError("image_side_atomics: q and u must be contiguous tensors of one shape [Ni, H, Dh]")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"image_side_atomics: Dh must be a power of two >= 16, got {head_dim}")
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    du = torch.zeros(u.shape, dtype=torch.float32, device=u.device)
    grid = (_cdiv(num_texts, texts_per_program), heads)
    image_side_atomics_kernel[grid](
        q, u, dq, du, num_images, q.stride(0), q.stride(1), _cdiv(num_images, block_i), HEAD_DIM=head_dim,
        BLOCK_I=block_i, num_warps=4,
    )  # fmt: skip
    return dq, du


@triton.jit
def fused_backward_kernel(
    Q, U, K, V, Mask, GradT, DQ, DU, DK, DV,
    stride_qi, stride_qh, stride_kt, stride_kl, stride_kh, stride_mt, stride_ml, stride_gt,
    Ni, Nt, L, scale, scale_log2, image_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """dq, du, dk, dv of BLOCK_T texts and one head (grid: text blocks, heads): k, v and dk, dv of the texts stay
    (their words side by side as the products' columns, see tiles.text_columns); the image tiles stream past, each
    step forming S, R, the softmax and dS, dR once and adding its dq = dS K, du = dR V into float32 DQ, DU
    ([Ni, H, Dh], q's layout) with relaxed atomics. Programs start at different image tiles, so that they add
    into different rows at a time."""
    text_block = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    first_text = text_block * BLOCK_T
    rows_i = tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_t = tl.arange(0, BLOCK_T)
    in_bounds, valid = text_columns(
        Mask + first_text * stride_mt, Nt - first_text, L, stride_mt, stride_ml, HAS_MASK, BLOCK_T, BLOCK_L
    )
    word_rows = column_rows(stride_kt, stride_kl, BLOCK_T, BLOCK_L)
    words_base = first_text * stride_kt + h * stride_kh
    k = load_rows(K + words_base + word_rows[:, None] + offs_d[None, :], valid, d_ok)
    v = load_rows(V + words_base + word_rows[:, None] + offs_d[None, :], valid, d_ok)
    texts_ok = first_text + offs_t < Nt
    image_tile = rows_i[:, None] * stride_qi + offs_d[None, :]
    grad_tile = rows_i[:, None] + (offs_t * stride_gt)[None, :]
    G_texts = GradT + first_text * stride_gt
    dk_t = tl.zeros((BLOCK_D, BLOCK_T * BLOCK_L), dtype=tl.float32)
    dv_t = tl.zeros((BLOCK_D, BLOCK_T * BLOCK_L), dtype=tl.float32)
    for step in range(image_tiles):
        first_image = ((step + text_block) % image_tiles) * BLOCK_I
        rows_ok = first_image + rows_i < Ni
        image_ok = rows_ok[:, None] & d_ok[None, :]
        image_base = first_image * stride_qi + h * stride_qh
        q = tl.load(Q + image_base + image_tile, mask=image_ok, other=0.0)
        u = tl.load(U + image_base + image_tile, mask=image_ok, other=0.0)
        g = tl.load(G_texts + first_image + grad_tile, mask=rows_ok[:, None] & texts_ok[None, :], other=0.0)
        e, r, _, inv_den, head_out = _texts_exponentials(
            q, u, k, v, valid, scale_log2, INPUT_PRECISION, UPCAST, BLOCK_T, BLOCK_L
        )
        ds, dr = _product_grads(e, r, inv_den, head_out, g.to(tl.float32), scale, 2)
        ds = tl.reshape(ds, (BLOCK_I, BLOCK_T * BLOCK_L)).to(k.dtype)
        dr = tl.reshape(dr, (BLOCK_I, BLOCK_T * BLOCK_L)).to(v.dtype)
        dk_t = mma(tl.trans(q), ds, dk_t, INPUT_PRECISION, UPCAST)
        dv_t = mma(tl.trans(u), dr, dv_t, INPUT_PRECISION, UPCAST)
        dq = mma(ds, k, None, INPUT_PRECISION, UPCAST)
        du = mma(dr, v, None, INPUT_PRECISION, UPCAST)
        tl.atomic_add(DQ + image_base + image_tile, dq, mask=image_ok, sem="relaxed")
        tl.atomic_add(DU + image_base + image_tile, du, mask=image_ok, sem="relaxed")
    # dk and dv have k's contiguous layout: element (d, c) of dk^T goes to column c's word, feature d.
    out_tile = offs_d[:, None] + word_rows[None, :]
    out_ok = d_ok[:, None] & in_bounds[None, :]
    tl.store(DK + words_base + out_tile, dk_t.to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + words_base + out_tile, dv_t.to(DV.dtype.element_ty), mask=out_ok)


def fused_backward(
    grad_scores: torch.Tensor,
    q: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    word_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    texts_per_program: int = 2,
    block_i: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, du, dk, dv of ``mscmat_scores(q, u, k, v, word_mask, scale=scale)`` for the incoming gradient
    ``grad_scores`` [Ni, Nt], with the fused kernel (same arguments and layouts as the op). Texts of at most
    MAX_BLOCK_L / texts_per_program words."""
    num_images, heads, head_dim = q.shape
    num_texts, num_words = k.shape[0], k.shape[1]
    block_l, block_d = _block_sizes(num_words, head_dim)
    if num_words > block_l or texts_per_program * block_l > MAX_BLOCK_L:
        raise ValueError(
            f"fused_backward: {texts_per_program} texts of {num_words} words exceed one product of {MAX_BLOCK_L}"
        )
    scale = head_dim**-0.5 if scale is None else float(scale)
    q, u, k, v, mask, mask_strides, has_mask = _prepared(q, u, k, v, word_mask)
    q, u, k, v = (t.contiguous() for t in (q, u, k, v))
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    du = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    grad_t = grad_scores.t().contiguous()
    grid = (_cdiv(num_texts, texts_per_program), heads)
    fused_backward_kernel[grid](
        q, u, k, v, mask, grad_t, dq, du, dk, dv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), *mask_strides, grad_t.stride(0),
        num_images, num_texts, num_words, scale, scale * LOG2_E, _cdiv(num_images, block_i),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_L=block_l, HAS_MASK=has_mask,
        INPUT_PRECISION=_input_precision(q.dtype), UPCAST=_upcast(q.dtype), BLOCK_I=block_i,
        BLOCK_T=texts_per_program, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return dq.to(q.dtype), du.to(u.dtype), dk, dv


def _compile(fn, types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: types.get(name, "i32") for name in fn.arg_names}
    signature |= dict.fromkeys(constexprs, "constexpr")
    aligned = [index for index, name in enumerate(fn.arg_names) if name not in constexprs and types.get(name) != "fp32"]
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()},
        attrs={(index,): [["tt.divisibility", 16]] for index in aligned},
    )
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def compile_for_sm90(kernel: str = "atomics", texts_per_program: int = 2, block_i: int = 64, num_warps: int = 4):
    """One of this file's kernels ("atomics" or "fused") compiled offline for sm_90 as the targets benchmark
    launches it (bf16, L 32, Dh 64, no mask; every pointer and integer argument 16-aligned: Ni = Nt = 4096, H = 12).
    Returns Triton's compiled kernel (``.asm["ptx"]``, ``.metadata``); raises what the compiler raises."""
    if kernel == "atomics":
        types = {"Q": "*bf16", "U": "*bf16", "DQ": "*fp32", "DU": "*fp32"}
        return _compile(image_side_atomics_kernel, types, {"HEAD_DIM": 64, "BLOCK_I": 64}, 4, 2)
    types = {name: "*bf16" for name in ("Q", "U", "K", "V", "Mask", "GradT", "DK", "DV")}
    types |= {"DQ": "*fp32", "DU": "*fp32", "scale": "fp32", "scale_log2": "fp32"}
    constexprs = {
        "HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_L": 32, "HAS_MASK": False, "INPUT_PRECISION": "tf32", "UPCAST": False,
        "BLOCK_I": block_i, "BLOCK_T": texts_per_program,
    }  # fmt: skip
    return _compile(fused_backward_kernel, types, constexprs, num_warps, 2)
