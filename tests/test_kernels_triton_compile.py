"""The Triton kernels compile for a Hopper GPU (sm_90) without one: triton.compile down to PTX and a cubin with
Triton's bundled ptxas (benchmarks/kernel_report.py), bfloat16 with the default tiles, short and chunked texts.
The interpreter tests check the numbers; this checks what the interpreter cannot (constexpr use, layouts,
tensor-core lowering, register spills). Runs in a child process, since TRITON_INTERPRET=1 (set by the interpreter
tests) changes what @triton.jit makes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_triton_kernels

from msa.ops.mscmat import _major_minor

REPO = Path(__file__).resolve().parents[1]
# (L, Dh, mask): the benchmark's short texts at Dh = 64, and long texts (two chunks) at Dh = 128.
CASES = [(32, 64, False), (150, 128, True)]


def _last_line_in_child(code: str, *args: str, timeout: int = 900) -> str:
    """The last line ``code`` prints in a child Python process (from tests/) that compiles Triton kernels: without
    TRITON_INTERPRET, which the interpreter tests set."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO / "tests", capture_output=True,
                         text=True, timeout=timeout)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run.stdout.strip().splitlines()[-1]


def _compile_in_child() -> list[dict]:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import kernel_report as kr\n"
        "specs = [s for c in json.loads(sys.argv[2]) for s in kr._specs_for('bf16', *c, every_tile=False)]\n"
        "print(json.dumps([kr.compile_spec(s) for s in specs]))\n"
    )
    return json.loads(_last_line_in_child(code, str(REPO / "benchmarks"), json.dumps(CASES)))


def require_tuned_triton(difference: str) -> None:
    """Skips a test of the tile tables' compiled properties under a Triton older than those they were tuned on
    (3.6, the GPU machine's, and 3.8), saying what differs there."""
    triton = require_triton_kernels()
    if _major_minor(triton.__version__) < (3, 6):
        pytest.skip(f"the tile tables were tuned under Triton 3.6 and 3.8, not {triton.__version__}: {difference}")


@pytest.fixture(scope="module")
def default_rows():
    triton = require_triton_kernels()
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        pytest.skip(f"triton {triton.__version__} has no offline compiler API: {error}")
    return _compile_in_child()


def test_default_tiles_compile_for_sm90_with_wgmma(default_rows):
    assert len(default_rows) == 3 * len(CASES)
    for row in default_rows:
        assert "error" not in row, row
        assert row["mma"].startswith("wgmma"), row  # Hopper tensor cores, not mma.sync or FMAs


def test_default_bf16_tiles_do_not_spill_at_head_dim_64(default_rows):
    rows = [row for row in default_rows if row["head_dim"] == 64]
    assert {row["kernel"] for row in rows} == {"fwd", "bwd_images", "bwd_words"}
    for row in rows:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row


def test_dq_kernel_splits_texts_when_image_tiles_and_heads_are_too_few():
    require_triton_kernels()
    from msa.kernels.mscmat_triton import MIN_PROGRAMS, _text_splits

    # Training sizes: 2 image tiles x 12 heads would be 24 programs on 132 SMs.
    splits, per_split = _text_splits(128, 128, 12)
    assert 2 * 12 * splits >= MIN_PROGRAMS and splits * per_split >= 128 > (splits - 1) * per_split
    # The benchmark's sizes already fill the card: no workspace.
    assert _text_splits(4096, 4096, 12) == (1, 4096)
    # Never more splits than texts.
    assert _text_splits(1, 3, 1) == (3, 1)


def test_host_integer_helpers_match_triton():
    """The host code sizes grids and blocks with its own integer helpers (triton's are JIT functions, ~2 us a
    call): they must agree with triton's everywhere the host code calls them."""
    triton = require_triton_kernels()
    from msa.kernels.mscmat_triton import _cdiv, _next_power_of_2

    for n in range(1, 4100):
        assert _next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128, 264):
            assert _cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert _cdiv(0, 64) == 0


def test_default_forward_tile_fits_three_blocks_per_sm(default_rows):
    """On an H200, ncu counted three resident blocks of the default forward tile (eight warps) per SM, limited by
    registers. The offline compile lands there only with the launcher's specialisation (aligned pointers, strides
    divisible by 16); without it the same kernel compiled to 255 registers and one block."""
    require_tuned_triton("under 3.4.0 the tile took 82 registers and two blocks per SM")
    row = next(r for r in default_rows if r["kernel"] == "fwd" and r["head_dim"] == 64)
    assert row["registers"] <= 85 and row["ctas_per_sm"] == 3, row
    # With a word mask too: k, v loads predicated on the mask (loaded in the same pipelined loop) took 113-114.
    masked = _compile_one("_specs_for('bf16', 32, 64, True, every_tile=False)[0]")
    assert masked["kernel"] == "fwd" and masked["has_mask"], masked
    assert masked["registers"] <= 85 and masked["ctas_per_sm"] == 3, masked


def test_default_tiles_compute_each_row_once(default_rows):
    """No default tile lets several warps compute the same rows of a product (see configs.BWD_IMAGES_TILES)."""
    for row in default_rows:
        assert not row["replicated"], row


def _compile_one(spec: str) -> dict:
    """kernel_report's row for one Spec (Python source), compiled in a child process."""
    require_triton_kernels()
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import kernel_report as kr\n"
        f"print(json.dumps(kr.compile_spec(kr.{spec})))\n"
    )
    row = json.loads(_last_line_in_child(code, str(REPO / "benchmarks")))
    if "error" in row and "ASTSource" in row["error"]:
        pytest.skip(f"no offline compiler API: {row['error']}")
    return row


def _every_kept_tile(*cases: tuple) -> list[dict]:
    """kernel_report's rows for every tile the pruner keeps, each kernel, for each (dtype label, L, Dh, mask) case,
    compiled in a child process."""
    require_triton_kernels()
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import kernel_report as kr\n"
        "specs = [s for c in json.loads(sys.argv[2]) for s in kr._specs_for(*c, every_tile=True)]\n"
        "print(json.dumps(kr._compile_all(list(dict.fromkeys(specs)), 2)))\n"
    )
    rows = json.loads(_last_line_in_child(code, str(REPO / "benchmarks"), json.dumps(cases)))
    if any("ASTSource" in row.get("error", "") for row in rows):
        pytest.skip("no offline compiler API")
    return rows


def test_forward_register_operand_tile_uses_the_register_a_form():
    """A_IN_REGISTERS (an autotune candidate) must reach wgmma's register-A form, or it is the shared-memory tile
    with more registers."""
    row = _compile_one("Spec('fwd', 'bf16', 32, 64, False, True, (128, 8, 8, 3, 1, 0, 0))")
    assert row["mma"] == "wgmma, A in registers" and row["spill_stores"] == 0, row


def test_report_flags_rows_computed_by_several_warps():
    """64 images on eight warps in the words kernel: Triton gives each of the eight warps 16 rows of the chained
    products, 128 in all, so the two warpgroups compute the same 64. The report must see it (or the check on the
    default tiles above proves nothing)."""
    assert _compile_one("Spec('bwd_words', 'bf16', 32, 64, False, True, (64, 1, 8, 3))")["replicated"]
    assert not _compile_one("Spec('bwd_words', 'bf16', 32, 64, False, True, (128, 1, 8, 3))")["replicated"]


def test_report_sees_replicated_fma_products():
    """float32 products have blocked layouts: one whose warps cover 128 columns of a 64-column result computes
    every element twice."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from kernel_report import replicated_products

    def ttgir(warps: str) -> str:
        return (
            "#blocked1 = #ttg.blocked<{sizePerThread = [2, 2], threadsPerWarp = [1, 32], warpsPerCTA = ["
            + warps
            + "], order = [1, 0]}>\n"
            "    %5 = tt.dot %3, %4, %2 : tensor<16x128xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked1}>> * "
            "tensor<128x64xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked1}>> -> tensor<16x64xf32, #blocked1>\n"
        )

    assert not replicated_products(ttgir("8, 1"))
    assert replicated_products(ttgir("4, 2"))


def test_host_code_traces_with_fake_tensors():
    """torch.compile's first step runs the op's host code on fake tensors and records each kernel launch; no GPU
    needed. The forward and backward must trace, with and without their splits and text blocks."""
    require_triton_kernels()
    code = """
import sys
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from conftest import make_op_inputs
from msa.kernels import mscmat_triton as mt

q, u, k, v, mask = make_op_inputs(5, 7, 9, 2, 16, mask_kind="masked-texts", dtype=torch.bfloat16, seed=0)
grad = torch.randn(5, 7, dtype=torch.bfloat16)

def forward(q, u, k, v, mask):
    return mt._forward(q, u, k, v, mask, 0.25)

def backward(grad, q, u, k, v, mask):
    grads = tuple(torch.empty_like(t) for t in (q, u, k, v))
    return mt._triton_backward(grad, q, u, k, v, mask, 0.25, grads, True, True)

counts = []
for min_programs, budget in ((mt.MIN_PROGRAMS, mt.STATS_BYTES_BUDGET), (1, 2 * 8 * 5 * 2)):
    mt.MIN_PROGRAMS, mt.STATS_BYTES_BUDGET = min_programs, budget
    for fn, args in ((forward, (q, u, k, v, mask)), (backward, (grad, q, u, k, v, mask))):
        graph = make_fx(fn, tracing_mode="fake")(*args).code
        counts.append(graph.count("triton_kernel_wrapper_mutation("))
print(counts)
"""
    # One forward launch; images + words kernel per block of texts (one block, then four of two texts).
    assert _last_line_in_child(code) == "[1, 2, 1, 8]"


def test_fused_backward_kernels_compile_without_spills_and_with_the_same_atomics():
    """bench_gpu_targets times the fused backward of benchmarks/fused_backward.py and its atomic adds alone: both
    must compile for sm_90 without spills, and the adds of the floor must be those of the fused kernel (relaxed,
    four floats an instruction), or the floor would not be one."""
    triton = require_triton_kernels()
    try:
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        pytest.skip(f"triton {triton.__version__} has no offline compiler API: {error}")
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import kernel_report as kr\n"
        "print(json.dumps(kr._compile_fused_backward()))\n"
    )
    lines = json.loads(_last_line_in_child(code, str(REPO / "benchmarks")))
    assert len(lines) == 3 and lines[0].startswith("fused backward, atomics alone"), lines
    for line in lines:
        assert "compiled" in line and "spills 0/0 B" in line, line
        assert line.endswith("atomics atom.global.gpu.relaxed.add.v4.f32"), line


def test_words_kernel_takes_chunks_that_do_not_spill():
    """Texts longer than 64 words: the dk/dv kernel takes 64-word chunks at Dh = 64 (every tile of 128 words
    spilled 52-772 B per thread); its default tile then compiles without spills."""
    require_triton_kernels()
    from msa.kernels.configs import words_chunk

    assert words_chunk("low", 128, 64) == 64 and words_chunk("low", 32, 64) == 32
    assert words_chunk("low", 128, 128) == 64 and words_chunk("low", 64, 64) == 64
    row = _compile_one("_specs_for('bf16', 150, 64, True, every_tile=False)[2]")  # fwd, bwd_images, bwd_words
    assert row["kernel"] == "bwd_words" and "error" not in row, row
    assert row["block_l"] == 64 and row["spill_stores"] == 0 and row["spill_loads"] == 0, row


def test_capped_forward_tiles_run_only_where_their_cap_was_checked():
    """The forward's register-capped candidates compile without spills only for chunks of <= 32 words at Dh <= 64
    (sm_90 compile report): the pruner keeps them there and nowhere else, and never runs one with autotuning off."""
    require_triton_kernels()
    from msa.kernels.configs import FWD_TILES, fitting_tiles

    capped = {tile for tile in FWD_TILES["low"] if tile[6]}
    assert capped
    kept = fitting_tiles(FWD_TILES, "low", 32, 64, "fwd")
    assert capped <= set(kept) and not kept[0][6]
    assert capped <= set(fitting_tiles(FWD_TILES, "low", 16, 32, "fwd"))
    for block_l, block_d in ((64, 64), (32, 128), (128, 64)):
        assert not capped & set(fitting_tiles(FWD_TILES, "low", block_l, block_d, "fwd")), (block_l, block_d)


def test_capped_forward_tiles_fit_one_block_more_without_spills():
    """Each register cap must reach ptxas (registers at most the cap), cost no spills, and fit one block per SM more
    than the same tile uncapped, or it only adds autotuning time. With a word mask, where the uncapped tile takes
    the most registers."""
    require_triton_kernels()
    from msa.kernels.configs import FWD_TILES

    for tile in (tile for tile in FWD_TILES["low"] if tile[6]):
        capped = _compile_one(f"Spec('fwd', 'bf16', 32, 64, True, True, {tile})")
        uncapped = _compile_one(f"Spec('fwd', 'bf16', 32, 64, True, True, {tile[:6] + (0,)})")
        assert capped["registers"] <= tile[6] and capped["spill_stores"] == 0, capped
        assert capped["ctas_per_sm"] > uncapped["ctas_per_sm"], (capped, uncapped)


def test_float32_pruner_keeps_a_tile_for_long_texts_and_large_heads():
    """float32 FMA products: the pruner drops tiles with more than 8 outputs or 2048 multiply-adds per thread (they
    spilled 336 B to 39 KB on the sm_90 report) and still keeps one for texts of 128 words or heads of 128."""
    require_triton_kernels()
    from msa.kernels.configs import BWD_IMAGES_TILES, BWD_WORDS_TILES, FWD_TILES, fitting_tiles, words_chunk

    fp32 = "fp32"
    assert (64, 4, 4, 2, 0, 0, 0) not in fitting_tiles(FWD_TILES, fp32, 32, 64, "fwd")
    assert fitting_tiles(FWD_TILES, fp32, 32, 64, "fwd")[0] == FWD_TILES["fp32"][0]
    assert fitting_tiles(FWD_TILES, fp32, 64, 64, "fwd") == [(32, 4, 8, 2, 0, 0, 0), (16, 4, 8, 2, 0, 0, 0)]
    assert fitting_tiles(FWD_TILES, fp32, 128, 64, "fwd") == [(16, 4, 8, 2, 0, 0, 0)]
    assert fitting_tiles(BWD_IMAGES_TILES, fp32, 64, 128, "bwd_images") == [(16, 1, 8, 2)]
    assert words_chunk(fp32, 128, 128) == 64 and words_chunk(fp32, 64, 64) == 64
    # Nothing fits 128-word chunks at Dh 128: the fewest outputs per thread, not the default tile.
    assert fitting_tiles(FWD_TILES, fp32, 128, 128, "fwd") == [(16, 4, 8, 2, 0, 0, 0)]
    # Tensor-core products (bf16, fp16, TF32) are not bound by the FMA rule.
    assert fitting_tiles(BWD_WORDS_TILES, "low", 32, 64, "bwd_words") == BWD_WORDS_TILES["low"]
    assert fitting_tiles(BWD_WORDS_TILES, "tf32", 32, 64, "bwd_words") == BWD_WORDS_TILES["tf32"]


def test_float32_tiles_the_pruner_keeps_stay_in_registers():
    """Every float32 tile the pruner keeps for 64-word texts at Dh 128 and 128-word texts at Dh 64, each kernel,
    compiles for sm_90 with at most 32 B of spills per thread (the tiles it drops there spill kilobytes)."""
    rows = _every_kept_tile(("fp32", 64, 128, True), ("fp32", 128, 64, True))
    assert {row["kernel"] for row in rows} == {"fwd", "bwd_images", "bwd_words"} and len(rows) >= 7, rows
    for row in rows:
        assert "error" not in row, row
        assert row["spill_stores"] <= 32 and row["spill_loads"] <= 32, row
        assert not row["replicated"], row


def test_tf32_takes_tensor_core_tiles_only_where_they_were_checked():
    """float32 with TF32 on: the tensor-core list for chunks of <= 32 words at a padded Dh of 64, the float32
    (small) tiles elsewhere, where the TF32 tiles spilled or outgrew shared memory; bf16 and fp16 never change."""
    require_triton_kernels()
    import torch

    from msa.kernels.configs import FWD_TILES, fitting_tiles, tile_kind

    fp32 = torch.float32
    assert tile_kind(fp32, "tf32", 32, 64) == "tf32" and tile_kind(fp32, "tf32", 16, 64) == "tf32"
    assert tile_kind(fp32, "ieee", 32, 64) == "fp32"
    for block_l, block_d in ((64, 64), (32, 128), (32, 32)):
        assert tile_kind(fp32, "tf32", block_l, block_d) == "fp32", (block_l, block_d)
    assert tile_kind(torch.bfloat16, "tf32", 128, 128) == "low"
    assert fitting_tiles(FWD_TILES, "tf32", 32, 64, "fwd") == FWD_TILES["tf32"]


def test_tf32_tiles_compile_to_wgmma_without_spills():
    """Every TF32 tile the pruner keeps (short captions, with a word mask, Dh 64), each kernel: wgmma, no spills,
    each product computed once, and at least one block per SM (shared memory at four bytes an element)."""
    require_tuned_triton("under 3.4.0 a TF32 tile of the words kernel spilled 52 B")
    rows = _every_kept_tile(("tf32", 19, 64, True), ("tf32", 12, 64, False))
    assert {row["kernel"] for row in rows} == {"fwd", "bwd_images", "bwd_words"} and len(rows) >= 20, rows
    for row in rows:
        assert "error" not in row and row["dtype"] == "tf32", row
        assert row["mma"].startswith("wgmma") and not row["replicated"], row
        assert row["spill_stores"] == 0 and row["ctas_per_sm"] >= 1, row
