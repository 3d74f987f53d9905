"""Registration of the Triton kernels as the custom ops ``msa::mscmat_scores_triton`` (forward) and
``msa::mscmat_scores_triton_backward``, with autograd, so that ``torch.compile`` and ``opcheck`` see through them,
and the public function :func:`mscmat_scores_triton`. The kernels are in ``mscmat_kernels.py``, their tile helpers
in ``tiles.py``, the autotune configurations in ``configs.py``. float32 inputs use TF32 tensor cores only where
torch's own float32 matmul would (``torch.backends.cuda.matmul.fp32_precision`` "tf32", or ``allow_tf32`` before
torch 2.9)."""

from __future__ import annotations

import math

import torch
from torch.library import triton_op, wrap_triton

from msa._autograd import register_scores_autograd
from msa._tf32 import tf32_allowed
from msa.kernels.configs import (
    FWD_TILES,
    INTERPRET,
    MAX_BLOCK_L,
    MIN_PRODUCT_WORDS,
    config_of,
    tile_kind,
    words_chunk,
)
from msa.kernels.mscmat_kernels import (
    FWD_IMAGE_GROUP,
    mscmat_scores_bwd_images_kernel,
    mscmat_scores_bwd_words_kernel,
    mscmat_scores_fwd_kernel,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2_E = math.log2(math.e)
# Programs the forward and the dq/du kernel should have at least (two per SM of a 132-SM H100), counted with tiles
# of 64 images (and 4 texts, the forward).
MIN_PROGRAMS = 264
IMAGES_PER_SPLIT_ESTIMATE = 64
TEXTS_PER_SPLIT_ESTIMATE = 4
# The words kernel reads the softmax statistics of every (image, text, head) from the images kernel, 8 bytes
# each; beyond this many bytes the backward walks the texts in blocks (1 GiB: Ni = Nt = 4096 at H = 12 is 1.6).
STATS_BYTES_BUDGET = 1 << 30


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv and triton.next_power_of_2 are JIT functions: each host call costs ~2 us against ~50 ns here,
    # and the host code runs a dozen of them per forward + backward.
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1."""
    return 1 << (n - 1).bit_length()


def _block_sizes(num_words: int, head_dim: int) -> tuple[int, int]:
    """Words per product (a power of two, at least MIN_PRODUCT_WORDS, at most MAX_BLOCK_L: longer texts are
    walked in chunks) and the head dim padded to a power of two (tl.dot needs K >= 16)."""
    block_l = min(max(_next_power_of_2(max(num_words, 1)), MIN_PRODUCT_WORDS), MAX_BLOCK_L)
    block_d = max(16, _next_power_of_2(head_dim))
    return block_l, block_d


def _splits(programs: int, items: int) -> tuple[int, int]:
    """(splits, items per split) of a loop over ``items`` so that ``programs`` per split reach MIN_PROGRAMS (two per
    SM of an H100); one split (no workspace) when they already do."""
    splits = max(1, min(items, _cdiv(MIN_PROGRAMS, programs)))
    per_split = _cdiv(items, splits)
    return _cdiv(items, per_split), per_split


def _text_splits(num_images: int, num_texts: int, heads: int) -> tuple[int, int]:
    """(splits, texts per split) of the dq/du kernel's text loop: image tiles x heads fall short of MIN_PROGRAMS at
    training sizes."""
    return _splits(_cdiv(num_images, IMAGES_PER_SPLIT_ESTIMATE) * heads, num_texts)


def _head_splits(num_images: int, num_texts: int, heads: int) -> tuple[int, int]:
    """(splits, heads per split) of the forward's head loop: image x text tiles fall short of MIN_PROGRAMS at
    training sizes (Ni = Nt = 128)."""
    tiles = _cdiv(num_images, IMAGES_PER_SPLIT_ESTIMATE) * _cdiv(num_texts, TEXTS_PER_SPLIT_ESTIMATE)
    return _splits(tiles, heads)


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _prepared(q, u, k, v, word_mask):
    """Unit-stride last dims (the kernels index the head dim directly), one set of strides for q and u and one
    for k and v (the kernels take them once), and the mask as bool (or a dummy pointer). The kernels read a bool
    mask as bytes; viewing it as uint8 here instead breaks torch.compile on torch 2.11, whose Inductor cannot lower
    a bool -> uint8 dtype view."""
    if q.stride() != u.stride() or q.stride(-1) != 1:
        q, u = q.contiguous(), u.contiguous()
    if k.stride() != v.stride() or k.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    if word_mask is None:
        return q, u, k, v, q, (0, 0), False
    mask = word_mask if word_mask.dtype == torch.bool else word_mask != 0
    return q, u, k, v, mask, (mask.stride(0), mask.stride(1)), True


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"mscmat_scores (triton): inputs must be float32, float16 or bfloat16, got {q.dtype}")


@triton_op("msa::mscmat_scores_triton", mutates_args=())
def _mscmat_scores_triton_op(
    q: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, word_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    return _forward(q, u, k, v, word_mask, scale)


def _forward(q, u, k, v, word_mask, scale, tile=None):
    """The forward kernel's scores; ``tile`` (one of configs.FWD_TILES) runs that tile instead of the autotuned
    one, as the interpreter tests do with tiles their single config does not reach."""
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
    launch, tile_kwargs = wrap_triton(mscmat_scores_fwd_kernel), {}
    if tile is not None:
        # The JIT function under the autotuner with the tile's meta-parameters, launched as is: tests call this
        # eagerly, and torch 2.11's wrap_triton refuses the interpreter's stand-in for a JIT function (2.14's takes it).
        launch, tile_kwargs = mscmat_scores_fwd_kernel.fn, config_of(FWD_TILES, tile).all_kwargs()
    splits, heads_per_split = _head_splits(num_images, num_texts, heads)
    parts = out if splits == 1 else q.new_empty((splits, num_images, num_texts), dtype=torch.float32)

    def grid(meta):
        return (_cdiv(num_images, meta["BLOCK_I"]) * _cdiv(num_texts, meta["BLOCK_T"]), splits)

    launch[grid](
        q, u, k, v, mask, parts,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), *mask_strides, out.stride(0),
        num_images * num_texts, num_images, num_texts, num_words, heads, scale * LOG2_E, heads_per_split,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_L=block_l, HAS_MASK=has_mask, ONE_CHUNK=num_words <= block_l,
        INPUT_PRECISION=_input_precision(q.dtype), UPCAST=_upcast(q.dtype), GROUP_I=FWD_IMAGE_GROUP, **tile_kwargs,
    )  # fmt: skip
    if splits > 1:
        out.copy_(parts.sum(0))
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
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, du, dk, dv; a gradient not flagged in ``needs_grad`` is an empty tensor. The images kernel writes dq and
    du, the words kernel dk and dv: each runs only when one of its pair is asked for."""
    _check_dtype(q)
    images_grads, words_grads = needs_grad[0] or needs_grad[1], needs_grad[2] or needs_grad[3]
    dq, du, dk, dv = (
        torch.empty_like(t, memory_format=torch.contiguous_format) if pair_needed else t.new_empty((0,))
        for t, pair_needed in ((q, images_grads), (u, images_grads), (k, words_grads), (v, words_grads))
    )
    num_images, heads, head_dim = q.shape
    num_texts, num_words = k.shape[0], k.shape[1]
    if num_images == 0 or num_texts == 0 or num_words == 0 or heads == 0:
        grads = (dq.zero_(), du.zero_(), dk.zero_(), dv.zero_())
    else:
        grads = _triton_backward(grad_scores, q, u, k, v, word_mask, scale, (dq, du, dk, dv), images_grads, words_grads)
    return tuple(grad if needed else grad.new_empty((0,)) for grad, needed in zip(grads, needs_grad))


def _triton_backward(grad_scores, q, u, k, v, word_mask, scale, grads, images_grads, words_grads):
    dq, du, dk, dv = grads
    num_images, heads, _ = q.shape
    num_texts = k.shape[0]
    q, u, k, v, mask, mask_strides, has_mask = _prepared(q, u, k, v, word_mask)
    # dq/du and q share strides (both contiguous after _prepared), likewise dk/dv and k.
    q, u, k, v = (t.contiguous() for t in (q, u, k, v))
    # Transposed, a text's column of the gradient is one contiguous row: both kernels read it per text.
    grad_t = grad_scores.t().contiguous()
    inputs = (q, u, k, v, mask, mask_strides, has_mask, grad_t, scale)
    block = _texts_per_stats_block(num_images, num_texts, heads) if words_grads else num_texts
    if block >= num_texts:
        _backward_texts(*inputs, (dq, du, dk, dv), images_grads, words_grads)
        return dq, du, dk, dv
    # Texts in blocks, so that the statistics stay within STATS_BYTES_BUDGET: dq and du are sums over the blocks.
    sums = [torch.zeros(q.shape, dtype=torch.float32, device=q.device) for _ in range(2 if images_grads else 0)]
    for first in range(0, num_texts, block):
        texts = slice(first, first + block)
        parts = [torch.empty_like(total) for total in sums] or [dq, du]
        block_mask = mask[texts] if has_mask else mask
        block_inputs = (q, u, k[texts], v[texts], block_mask, mask_strides, has_mask, grad_t[texts], scale)
        _backward_texts(*block_inputs, (*parts, dk[texts], dv[texts]), images_grads, words_grads)
        for total, part in zip(sums, parts):
            total += part
    for grad, total in zip((dq, du), sums):
        grad.copy_(total)
    return dq, du, dk, dv


def _texts_per_stats_block(num_images: int, num_texts: int, heads: int) -> int:
    """Texts whose softmax statistics (8 bytes per image, text and head) fit STATS_BYTES_BUDGET."""
    return max(1, min(num_texts, STATS_BYTES_BUDGET // (8 * num_images * heads)))


def _backward_texts(q, u, k, v, mask, mask_strides, has_mask, grad_t, scale, grads, images_grads, words_grads):
    """The images kernel (dq, du, and the softmax statistics when dk or dv are asked for), then the words kernel
    (dk, dv) from those statistics, for all of k's texts."""
    dq, du, dk, dv = grads
    num_images, heads, head_dim = q.shape
    num_texts, num_words = k.shape[0], k.shape[1]
    block_l, block_d = _block_sizes(num_words, head_dim)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_L=block_l, HAS_MASK=has_mask,
                  INPUT_PRECISION=_input_precision(q.dtype), UPCAST=_upcast(q.dtype))  # fmt: skip
    # Statistics [2, H, Nt, Ni]: lse and o of every (image, text, head), a text's row contiguous over images.
    stats = q.new_empty((2, heads, num_texts, num_images), dtype=torch.float32) if words_grads else q
    stats_strides = (heads * num_texts * num_images, num_texts * num_images, num_images) if words_grads else (0, 0, 0)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), *mask_strides, grad_t.stride(0))
    sizes = (num_images, num_texts, num_words, heads, scale, scale * LOG2_E)
    splits, texts_per_split = _text_splits(num_images, num_texts, heads)
    dq_parts, du_parts = dq, du
    if images_grads and splits > 1:
        dq_parts = q.new_empty((splits, *q.shape), dtype=torch.float32)
        du_parts = q.new_empty((splits, *q.shape), dtype=torch.float32)

    def images_grid(meta):
        return (_cdiv(num_images, meta["BLOCK_I"]), heads, splits)

    wrap_triton(mscmat_scores_bwd_images_kernel)[images_grid](
        q, u, k, v, mask, grad_t, dq_parts, du_parts, stats, *strides, q.numel(), *stats_strides, *sizes,
        texts_per_split, ONE_CHUNK=num_words <= block_l, IMAGE_GRADS=images_grads, STORE_STATS=words_grads,
        **common,
    )  # fmt: skip
    if images_grads and splits > 1:
        dq.copy_(dq_parts.sum(0))
        du.copy_(du_parts.sum(0))
    if words_grads:
        words_l = words_chunk(tile_kind(q.dtype, common["INPUT_PRECISION"], block_l, block_d), block_l, block_d)

        def words_grid(meta):
            return (_cdiv(num_texts, meta["BLOCK_T"]) * _cdiv(num_words, words_l), heads)

        wrap_triton(mscmat_scores_bwd_words_kernel)[words_grid](
            q, u, k, v, mask, grad_t, stats, dk, dv, *strides, *stats_strides, *sizes, **(common | {"BLOCK_L": words_l})
        )


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
