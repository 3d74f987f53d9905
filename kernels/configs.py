"""Autotune configurations of the Triton kernels, and the pruning that keeps only those that fit the card.

Forward tile: (BLOCK_I, BLOCK_T, num_warps, num_stages, A_IN_REGISTERS, WIDE, MAX_REGISTERS), BLOCK_I images
against BLOCK_T texts, one text (BLOCK_L words) per product, or with WIDE 1 all BLOCK_T texts in one product per
head; A_IN_REGISTERS 1 keeps the image tile's q, u in registers as the products' A operand, 0 in shared memory;
MAX_REGISTERS caps the registers per thread (Triton's maxnreg; 0: the compiler's choice).
Backward tile: (BLOCK_I, BLOCK_T, num_warps, num_stages), BLOCK_T texts per product. Each table has a list per
kind of product (tile_kind): "low" (bf16, fp16 on tensor cores), "tf32" (float32 on tensor cores where torch
allows TF32, for the texts and heads its tiles were checked at) and "fp32" (float32 on FMA units, and TF32
elsewhere). The lists are in order of preference; with autotuning off (MSA_TRITON_AUTOTUNE=0, as in the tests)
the first one that fits runs. A config is dropped before any compile when
- its products would have more than MAX_BLOCK_L columns (BLOCK_T texts of a long chunk), or
- its pipelined stages exceed the shared memory of an sm_90 block (SHARED_MEMORY_BUDGET), or
- its float32 register tiles exceed REGISTER_TILE_BUDGET values per thread (beyond that ptxas spills), or
- it caps the registers for texts or heads longer than the cap was checked for (CAPPED_MAX_BLOCK_L, _D), or
- (float32) its FMA products hold more outputs or do more multiply-adds per thread than ptxas keeps in registers.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Texts longer than this are processed in chunks of this many words (online softmax).
MAX_BLOCK_L = 128
# The forward's products are [BLOCK_I, Dh] x [Dh, one text's words]: tl.dot needs 16 columns at least, so
# shorter texts are padded with masked words.
MIN_PRODUCT_WORDS = 16
# Dynamic shared memory of one sm_90 block is 227 KB; Triton adds scratch for layout conversions and reductions.
SHARED_MEMORY_BUDGET = 200 * 1024
# float32 tile values per thread that stay in registers (255 per thread at most; addresses, masks and the
# softmax statistics need the rest). From the sm_90 compile report (benchmarks/kernel_report.py): the dq kernel
# with 128 images on four warps holds 192 such values and spills, the default tiles hold 32-96 and do not.
REGISTER_TILE_BUDGET = 160
# A register cap buys a block per SM where the compiler takes a few registers more than a block count allows. Under
# the caps of FWD_TILES the sm_90 compile report shows no spills (Triton 3.6 and 3.8, with and without a word mask)
# for chunks of at most 32 words and Dh <= 64, the paper's captions and heads; at 64-word chunks, and at Dh 128, the
# capped tile spilled (112-932 B per thread), so the pruner drops them there.
CAPPED_MAX_BLOCK_L = 32
CAPPED_MAX_BLOCK_D = 64
# float32 products run on FMA units, whose operands ptxas keeps in registers for the whole product. sm_90 compile
# reports of 150 float32 specialisations (L 16-128, Dh 32-128, 16-64 images on 1-8 warps): every one whose products
# held at most FMA_OUTPUTS_PER_THREAD outputs per thread and whose step (forward: S and R; backward: S, R and two
# gradient products) did at most FMA_MULTIPLY_ADDS_PER_THREAD multiply-adds per thread spilled at most 28 B; every
# other one bar a few at Dh 32 spilled 336 B to 39 KB.
FMA_OUTPUTS_PER_THREAD = 8
FMA_MULTIPLY_ADDS_PER_THREAD = 2048
WARP_SIZE = 32

Tile = tuple[int, ...]

# 128 images per program: each k, v byte read from L2 then feeds 128 FLOPs (bf16), half the L2 traffic of 64.
# Eight warps: two warpgroups of 64 image rows, 75-77 registers, three blocks per SM (as ncu counted on an H200);
# on four warps the same tile takes 172-180 registers and two blocks (sm_90 compile report). Few texts per program
# keep the grid full at training sizes (Ni = Nt = 128); more amortise the q, u loads.
# With q, u in shared memory each text and head reads 40 KB of operands there per MFLOP (bf16, Dh 64, L 32), which
# an H200 found 72% busy at 34% of the tensor rate; in registers (A_IN_REGISTERS) only k, v are read there (8 KB)
# but the tile takes 96-118 registers and two blocks per SM instead of 75-77 and three (Triton 3.8 / 3.6): the
# autotuner measures which wins.
# WIDE tiles cut the same reads another way: one [BLOCK_I, BLOCK_T * L] product per head reads q, u from shared
# memory once for BLOCK_T texts (16-24 KB per text and head at 2-4 texts), with N = 64-128 per wgmma instead of 32;
# the head loop streams q, u and k, v together (two stages), at 124-136 registers and two or one blocks per SM
# (two texts on eight warps; Triton 3.8 / 3.6), 216-224 and one (four texts), 240-242 and two (four texts, 64
# images on four warps).
# The two-text WIDE tile comes again capped at 128 registers, the last candidate (L <= 32, Dh <= 64 only): two blocks
# per SM where it took 136 (Triton 3.6) or, with a word mask, 142-143 (both) and one.
FWD_TILES: dict[str, list[Tile]] = {
    "low": [
        (128, 8, 8, 3, 0, 0, 0),
        (64, 4, 4, 3, 0, 0, 0),
        (128, 4, 8, 3, 0, 0, 0),
        (64, 2, 4, 3, 0, 0, 0),
        (128, 16, 8, 3, 0, 0, 0),
        (64, 8, 4, 3, 0, 0, 0),
        (128, 8, 8, 3, 1, 0, 0),
        (64, 4, 4, 3, 1, 0, 0),
        (128, 4, 8, 2, 0, 1, 0),
        (128, 2, 8, 2, 0, 1, 0),
        (64, 4, 4, 2, 0, 1, 0),
        (128, 2, 8, 2, 0, 1, 128),
    ],
    # float32: 32 images on four warps first (3 blocks per SM at L 32, Dh 64); 16 images on eight warps fit up to
    # 128-word chunks, 32 on eight up to 64 (see FMA_OUTPUTS_PER_THREAD).
    "fp32": [
        (32, 4, 4, 2, 0, 0, 0),
        (32, 8, 4, 2, 0, 0, 0),
        (64, 4, 8, 2, 0, 0, 0),
        (32, 4, 8, 2, 0, 0, 0),
        (16, 4, 8, 2, 0, 0, 0),
    ],
}
# Backward tiles are (BLOCK_I, BLOCK_T, num_warps, num_stages). Both backward kernels chain products (a product's
# result feeds another), for which Triton gives every warp 16 rows of the tile: BLOCK_I >= 16 x num_warps, or
# the warps compute the same rows (kernel_report flags it; the words kernel's former default, 64 images on eight
# warps, did so). Both lay BLOCK_T texts' chunks side by side as their products' columns (at most MAX_BLOCK_L):
# the images kernel then reads q, u from shared memory once per BLOCK_T texts, the words kernel streams each q, u
# tile from L2 once for BLOCK_T texts. At Dh = 64, L = 32 (sm_90 compile report, Triton 3.8): images kernel, 64
# images on four warps 154 registers (three blocks per SM), two texts 218 (two); words kernel 118 (three), 128
# images on eight warps 106 (two), two texts on 64 / 4 216 (two), on 128 / 8 186 (one). The autotuner measures
# which wins.
BWD_IMAGES_TILES: dict[str, list[Tile]] = {
    "low": [(64, 1, 4, 3), (128, 1, 8, 3), (64, 1, 4, 2), (64, 2, 4, 2), (32, 1, 4, 3)],
    "fp32": [(32, 1, 4, 2), (16, 1, 4, 2), (32, 1, 8, 2), (16, 1, 8, 2)],
}
BWD_WORDS_TILES: dict[str, list[Tile]] = {
    "low": [(64, 1, 4, 3), (128, 1, 8, 2), (64, 2, 4, 2), (128, 2, 8, 2)],
    "fp32": [(32, 1, 4, 2), (16, 1, 4, 2), (32, 1, 8, 2), (16, 1, 8, 2)],
}
# TF32 (wgmma at four bytes an element): the 16-bit lists less the tiles that did not compile cleanly for sm_90 at L 32,
# Dh 64 (Triton 3.6 and 3.8): in the forward the 64-image WIDE tile (spilled 52-244 B), the capped one (172-176 B)
# and the four-text WIDE (256 KB of shared memory); in the images kernel two texts (320 B) and 32 images on four
# warps (rows computed twice); in the words kernel the 16-bit default (4 B with a word mask under Triton 3.6).
# The forward's default then takes 116-148 registers and 112 KB, one or two blocks per SM.
FWD_TILES["tf32"] = [
    tile
    for tile in FWD_TILES["low"]
    if tile not in {(128, 4, 8, 2, 0, 1, 0), (64, 4, 4, 2, 0, 1, 0), (128, 2, 8, 2, 0, 1, 128)}
]
BWD_IMAGES_TILES["tf32"] = [tile for tile in BWD_IMAGES_TILES["low"] if tile not in {(64, 2, 4, 2), (32, 1, 4, 3)}]
BWD_WORDS_TILES["tf32"] = [tile for tile in BWD_WORDS_TILES["low"] if tile != (64, 1, 4, 3)]
# Sizes are in the key: the best tile differs between a 128-text batch and a 5465-caption test split.
AUTOTUNE_KEY = ["Ni", "Nt", "L", "H", "HEAD_DIM", "HAS_MASK", "INPUT_PRECISION", "UPCAST"]


# Bytes of an operand element per kind of product.
ELEMENT_BYTES = {"low": 2, "tf32": 4, "fp32": 4}
# The TF32 tiles compile without spills, each product computed once, for chunks of <= 32 words at a padded Dh of 64
# (sm_90 compile report): at 64-word chunks or Dh 128 they spilled 20 B to 1.2 KB per thread or outgrew shared
# memory (Triton stages float32 q, u there for register-A tiles as well), at Dh 32 the words kernel spilled and
# computed its rows twice. Elsewhere TF32 products take the float32 list's small tiles.
TF32_MAX_BLOCK_L = 32
TF32_BLOCK_D = 64


def tile_kind(dtype: torch.dtype, input_precision: str, block_l: int, block_d: int) -> str:
    """The tile list that serves inputs of ``dtype`` multiplied at ``input_precision`` (the kernels'
    INPUT_PRECISION) in products of ``block_l`` words at a padded head dim ``block_d``: "low" for bf16 and fp16,
    "tf32" for float32 on tensor cores where its tiles were checked, else "fp32"."""
    if dtype != torch.float32:
        return "low"
    tf32_tiles = input_precision == "tf32" and block_l <= TF32_MAX_BLOCK_L and block_d == TF32_BLOCK_D
    return "tf32" if tf32_tiles else "fp32"


def _kwargs(tiles: dict[str, list[Tile]], tile: Tile) -> dict[str, int]:
    if tiles is FWD_TILES:
        return {"BLOCK_I": tile[0], "BLOCK_T": tile[1], "A_IN_REGISTERS": bool(tile[4]), "WIDE": bool(tile[5])}
    return {"BLOCK_I": tile[0], "BLOCK_T": tile[1]}


def tile_of(config: triton.Config) -> Tile:
    tile = config.kwargs["BLOCK_I"], config.kwargs.get("BLOCK_T", 1), config.num_warps, config.num_stages
    if "A_IN_REGISTERS" in config.kwargs:
        return (*tile, int(config.kwargs["A_IN_REGISTERS"]), int(config.kwargs["WIDE"]), config.maxnreg or 0)
    return tile


def max_registers(tile: Tile, role: str) -> int:
    """The tile's register cap per thread, 0 for none (only forward tiles have one)."""
    return tile[6] if role == "fwd" else 0


def config_of(tiles: dict[str, list[Tile]], tile: Tile) -> triton.Config:
    cap = max_registers(tile, "fwd" if tiles is FWD_TILES else "bwd")
    return triton.Config(_kwargs(tiles, tile), num_warps=tile[2], num_stages=tile[3], maxnreg=cap or None)


def all_configs(tiles: dict[str, list[Tile]]) -> list[triton.Config]:
    if INTERPRET:
        # The interpreter runs every config it is given: one keeps CPU tests fast (a single one is never pruned).
        # The forward's runs with q, u as computed values, the path that differs from a plain load.
        return [config_of(tiles, (16, 2, 4, 1, 1, 0, 0))]
    unique = dict.fromkeys(tile for kind in tiles.values() for tile in kind)
    return [config_of(tiles, tile) for tile in unique]


def product_words(tile: Tile, block_l: int, role: str) -> int:
    """Columns of the kernel's products: BLOCK_T texts' word chunks side by side (backward kernels, a WIDE forward
    tile), or one text's."""
    return block_l if role == "fwd" and not tile[5] else tile[1] * block_l


def shared_memory_bytes(tile: Tile, block_l: int, block_d: int, element_bytes: int, role: str) -> int:
    """Shared memory the software pipeline stages (the products read their operands there): the streamed
    operand pair per stage (k, v of a text; q, u of an image tile in the words kernel) next to the stationary one
    (unless the forward holds it in registers)."""
    block_i, stages = tile[0], tile[3]
    words = product_words(tile, block_l, role)
    streamed, stationary = (block_i, words) if role == "bwd_words" else (words, block_i)
    if role == "fwd" and tile[5]:  # the head loop streams both pairs
        streamed, stationary = words + block_i, 0
    if role == "fwd" and tile[4]:
        stationary = 0
    return (2 * max(stages, 1) * streamed + 2 * stationary) * block_d * element_bytes


def register_tile_values(tile: Tile, block_l: int, block_d: int, role: str) -> int:
    """float32 values per thread in the kernel's live register tiles: logits and readouts [BLOCK_I, words],
    plus the gradient accumulators of the backward kernels (dq, du [BLOCK_I, Dh]; dk, dv [words, Dh]) or the
    forward's q, u held in registers (two 16-bit values per register)."""
    block_i, warps = tile[0], tile[2]
    words = product_words(tile, block_l, role)
    values = 2 * block_i * words
    if role == "fwd" and tile[4]:
        values += block_i * block_d
    elif role == "bwd_images":
        values += 2 * block_i * block_d
    elif role == "bwd_words":
        values += 2 * words * block_d
    return values // (warps * WARP_SIZE)


def fma_products_fit(tile: Tile, block_l: int, block_d: int, role: str) -> bool:
    """Whether the kernel's float32 FMA products stay in registers: outputs per thread of each product and
    multiply-adds per thread of a step (two products of that size in the forward, four in the backward kernels;
    the gradient products have as many multiply-adds as S and R)."""
    outputs = tile[0] * product_words(tile, block_l, role) // (tile[2] * WARP_SIZE)
    products = 2 if role == "fwd" else 4
    return outputs <= FMA_OUTPUTS_PER_THREAD and products * outputs * block_d <= FMA_MULTIPLY_ADDS_PER_THREAD


def tile_fits(tile: Tile, block_l: int, block_d: int, kind: str, role: str) -> bool:
    capped = max_registers(tile, role) > 0
    return (
        shared_memory_bytes(tile, block_l, block_d, ELEMENT_BYTES[kind], role) <= SHARED_MEMORY_BUDGET
        and register_tile_values(tile, block_l, block_d, role) <= REGISTER_TILE_BUDGET
        and not (capped and (block_l > CAPPED_MAX_BLOCK_L or block_d > CAPPED_MAX_BLOCK_D))
        and (kind != "fp32" or fma_products_fit(tile, block_l, block_d, role))
    )


def fitting_tiles(tiles: dict[str, list[Tile]], kind: str, block_l: int, block_d: int, role: str):
    """The tiles of ``tiles`` for products of ``kind`` (see tile_kind) that fit, in order of preference; never
    empty: when none fits (long texts at a large Dh) the first of the list with products of at most MAX_BLOCK_L
    words runs, with spills, rather than a small tile that would give up wgmma (64 rows per warpgroup) as well; on
    FMA units (no wgmma) the one whose products hold the fewest outputs per thread, which spills least."""
    wanted = [tile for tile in tiles[kind] if product_words(tile, block_l, role) <= MAX_BLOCK_L]
    kept = [tile for tile in wanted if tile_fits(tile, block_l, block_d, kind, role)]
    if kept or kind != "fp32":
        return kept or wanted[:1]
    return [min(wanted, key=lambda tile: tile[0] * product_words(tile, block_l, role) / tile[2])]


@functools.cache  # the backward's host code asks on every call: 2.5-7 us computed, ~0.1 us looked up
def words_chunk(kind: str, block_l: int, block_d: int) -> int:
    """Words per program of the dk/dv kernel for products of ``kind`` (see tile_kind): ``block_l`` halved while
    none of its tiles fits. Its softmax is elementwise (the statistics come from the dq/du kernel), so its chunks
    need not be the forward's; its dk, dv accumulators grow with the chunk, and at 128 words every tile spilled
    (bf16, Dh = 64: 52-772 B per thread on the sm_90 compile report), at 64 none."""
    while block_l > MIN_PRODUCT_WORDS and not any(
        tile_fits(tile, block_l, block_d, kind, "bwd_words") for tile in BWD_WORDS_TILES[kind]
    ):
        block_l //= 2
    return block_l


def pruner(tiles: dict[str, list[Tile]], role: str):
    """``prune_configs_by`` of triton.autotune: the fitting tiles, or the first of them with autotuning off."""

    def prune(configs, named_args, **kwargs):
        block_l = kwargs.get("BLOCK_L", named_args.get("BLOCK_L"))
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        precision = kwargs.get("INPUT_PRECISION", named_args.get("INPUT_PRECISION"))
        kind = tile_kind(named_args["Q"].dtype, precision, block_l, block_d)
        by_tile = {tile_of(config): config for config in configs}
        fitting = fitting_tiles(tiles, kind, block_l, block_d, role)
        kept = [by_tile[tile] for tile in fitting if tile in by_tile]
        if os.environ.get("MSA_TRITON_AUTOTUNE", "1") == "0":
            return kept[:1]
        return kept

    return {"early_config_prune": prune}
