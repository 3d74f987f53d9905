"""Autotune configurations of the Triton kernels, and the pruning that keeps only those that fit the card.

A tile is (BLOCK_I, BLOCK_N, num_warps, num_stages): BLOCK_I images against BLOCK_N word rows (BLOCK_N // BLOCK_L
texts). The lists are in order of preference; with autotuning off (MSA_TRITON_AUTOTUNE=0, as in the tests) the
first one that fits runs. A config is dropped before any compile when
- it cannot hold one chunk of words (BLOCK_N < BLOCK_L),
- its pipelined stages exceed the shared memory of an sm_90 block (SHARED_MEMORY_BUDGET), or
- its float32 register tiles exceed REGISTER_TILE_BUDGET values per thread (beyond that ptxas spills).
float32 runs its products on FMA units (no TF32 unless torch allows it) and gets small tiles.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Texts longer than this are processed in chunks of this many words (online softmax).
MAX_BLOCK_L = 128
# Dynamic shared memory of one sm_90 block is 227 KB; Triton adds scratch for layout conversions and reductions.
SHARED_MEMORY_BUDGET = 200 * 1024
# float32 tile values per thread that stay in registers (255 per thread at most; addresses, masks and the
# softmax statistics need the rest). Calibrated on the sm_90 compile report (benchmarks/kernel_report.py).
REGISTER_TILE_BUDGET = 128
WARP_SIZE = 32

Tile = tuple[int, int, int, int]

FWD_TILES: dict[str, list[Tile]] = {
    "low": [(64, 128, 4, 2), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 8, 3)],
    "fp32": [(32, 64, 4, 1), (16, 128, 4, 1), (32, 128, 4, 1)],
}
BWD_TILES: dict[str, list[Tile]] = {
    "low": [(64, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (32, 128, 4, 2), (64, 128, 4, 3)],
    "fp32": [(32, 64, 4, 1), (16, 128, 4, 1)],
}
# Sizes are in the key: the best tile differs between a 128-text batch and a 5465-caption test split.
AUTOTUNE_KEY = ["Ni", "Nt", "L", "H", "HEAD_DIM", "HAS_MASK", "INPUT_PRECISION", "UPCAST"]


def tile_of(config: triton.Config) -> Tile:
    return config.kwargs["BLOCK_I"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def all_configs(tiles: dict[str, list[Tile]]) -> list[triton.Config]:
    if INTERPRET:
        # The interpreter runs every config it is given: one keeps CPU tests fast. A single config is never
        # pruned, so BLOCK_N is the largest BLOCK_L.
        return [triton.Config({"BLOCK_I": 16, "BLOCK_N": MAX_BLOCK_L}, num_warps=4, num_stages=1)]
    unique = dict.fromkeys(tile for kind in tiles.values() for tile in kind)
    return [
        triton.Config({"BLOCK_I": bi, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bi, bn, warps, stages in unique
    ]


def shared_memory_bytes(tile: Tile, block_d: int, element_bytes: int) -> int:
    """Shared memory the software pipeline stages: q, u, k and v tiles per stage (the products read them there)."""
    block_i, block_n, _, stages = tile
    return max(stages, 1) * 2 * (block_i + block_n) * block_d * element_bytes


def register_tile_values(tile: Tile, block_d: int, role: str) -> int:
    """float32 values per thread in the kernel's live register tiles: logits and readouts [BLOCK_I, BLOCK_N],
    plus the gradient accumulators of the backward kernels (dq, du [BLOCK_I, Dh]; dk, dv [BLOCK_N, Dh])."""
    block_i, block_n, warps, _ = tile
    values = 2 * block_i * block_n
    if role == "bwd_images":
        values += 2 * block_i * block_d
    elif role == "bwd_words":
        values += 2 * block_n * block_d
    return values // (warps * WARP_SIZE)


def tile_fits(tile: Tile, block_l: int, block_d: int, element_bytes: int, role: str) -> bool:
    return (
        tile[1] >= block_l
        and shared_memory_bytes(tile, block_d, element_bytes) <= SHARED_MEMORY_BUDGET
        and register_tile_values(tile, block_d, role) <= REGISTER_TILE_BUDGET
    )


def fitting_tiles(tiles: dict[str, list[Tile]], dtype: torch.dtype, block_l: int, block_d: int, role: str):
    """The tiles of ``tiles`` for ``dtype`` that fit, in order of preference; never empty (the smallest tile of
    the list is kept when none fits, so that a launch always has a config)."""
    wanted = tiles["fp32" if dtype == torch.float32 else "low"]
    element_bytes = torch.finfo(dtype).bits // 8
    kept = [tile for tile in wanted if tile_fits(tile, block_l, block_d, element_bytes, role)]
    if kept:
        return kept
    holding = [tile for tile in wanted if tile[1] >= block_l] or wanted
    return [min(holding, key=lambda tile: (tile[0] * tile[1], tile[3]))]


def pruner(tiles: dict[str, list[Tile]], role: str):
    """``prune_configs_by`` of triton.autotune: the fitting tiles, or the first of them with autotuning off."""

    def prune(configs, named_args, **kwargs):
        block_l = kwargs.get("BLOCK_L", named_args.get("BLOCK_L"))
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        by_tile = {tile_of(config): config for config in configs}
        fitting = fitting_tiles(tiles, named_args["Q"].dtype, block_l, block_d, role)
        kept = [by_tile[tile] for tile in fitting if tile in by_tile]
        if os.environ.get("MSA_TRITON_AUTOTUNE", "1") == "0":
            return kept[:1]
        return kept

    return {"early_config_prune": prune}
