"""What a single fused backward kernel would spend on atomic adds alone: a floor on its time, measured on a card.

The Triton backward runs two kernels: the images kernel (dq, du: a sum over texts) and the words kernel (dk, dv:
a sum over images). Each recomputes the logits S and readouts R, so together they run 8 GEMM-sized products where
one fused kernel would run 6, and two exponential passes instead of one. A fused kernel owns a block of texts
and a head (its dk, dv stay in registers over the image tiles) and must add each image tile's dq, du share into
global memory: per program and image tile 2 x BLOCK_I x Dh float32 atomic adds, Ni H Dh 2 Nt / texts_per_program
in all (6.4e9 at Ni = Nt = 4096, H = 12, Dh = 64 and four 32-word texts per program).

``image_side_atomics`` runs exactly that traffic and nothing else: the same grid (text blocks x heads), each
program loading q, u of every image tile (starting at a tile of its own, as a fused kernel would to spread the
atomics over addresses) and adding them into float32 dq, du with relaxed atomics. What the two kernels spend and
a fused one would not is the words kernel's recompute of S and R (2 of the 8 products) and its exponentials; when
these atomics alone take longer than that share of the measured backward, the two kernels win.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    text_blocks = -(-num_texts // texts_per_program)
    image_tiles = -(-num_images // block_i)
    image_side_atomics_kernel[(text_blocks, heads)](
        q, u, dq, du, num_images, q.stride(0), q.stride(1), image_tiles, HEAD_DIM=head_dim, BLOCK_I=block_i,
        num_warps=4,
    )  # fmt: skip
    return dq, du


def compile_for_sm90(head_dim: int = 64, block_i: int = 64) -> str:
    """The kernel's PTX for sm_90 as the benchmark launches it (bf16, every pointer and integer argument 16-aligned:
    Ni = 4096, H = 12), compiled offline: no GPU needed. Raises what the compiler raises."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = image_side_atomics_kernel
    types = {"Q": "*bf16", "U": "*bf16", "DQ": "*fp32", "DU": "*fp32"}
    signature = {name: types.get(name, "i32") for name in fn.arg_names}
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_I": block_i}
    signature |= dict.fromkeys(constexprs, "constexpr")
    aligned = [index for index, name in enumerate(fn.arg_names) if name not in constexprs]
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()},
        attrs={(index,): [["tt.divisibility", 16]] for index in aligned},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return compiled.asm["ptx"]
