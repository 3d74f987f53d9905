"""The Triton kernels compile for a Hopper GPU (sm_90) without one: triton.compile down to PTX and cubin with
Triton's bundled ptxas, for bfloat16 and float16 with the default tiles, short and chunked texts. The interpreter
tests check the numbers; this checks what the interpreter cannot (constexpr use, layouts, tensor-core lowering).
Runs in a child process, since TRITON_INTERPRET=1 (set by the interpreter tests) changes what @triton.jit makes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def compile_all() -> list[str]:
    """Compiles each kernel for a few specialisations; returns one line per kernel."""
    import torch
    import triton
    from msa.kernels import mscmat_triton as kernels
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer_args = {"Q", "U", "K", "V", "Out", "Grad", "DQ", "DU", "DK", "DV"}
    target = GPUTarget("cuda", 90, 32)
    lines = []

    def compile_one(kernel, dtype: str, constexprs: dict, tile) -> str:
        fn = kernel.fn
        block_i, block_n, warps, stages = tile
        constexprs = {**constexprs, "BLOCK_I": block_i, "BLOCK_N": block_n}
        if "GROUP_I" in fn.arg_names:
            constexprs["GROUP_I"] = 8
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in pointer_args:
                signature[name] = "*" + dtype
            elif name == "Mask":
                signature[name] = "*u8"
            elif name.startswith("scale"):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        source = ASTSource(
            fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}
        )
        compiled = triton.compile(source, target=target, options={"num_warps": warps, "num_stages": stages})
        ptx = compiled.asm["ptx"]
        uses = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "no-mma")
        return f"{fn.__name__} {dtype} {constexprs} {uses}"

    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for block_l, head_dim, one_chunk in ((32, 64, True), (128, 128, False)):
            common = {
                "HEAD_DIM": head_dim,
                "BLOCK_D": head_dim,
                "BLOCK_L": block_l,
                "HAS_MASK": True,
                "INPUT_PRECISION": "tf32",
                "UPCAST": False,
            }
            named = {"Q": torch.empty(1, dtype=torch_dtype)}
            fwd_tile = kernels._tile_of(kernels._mscmat_scores_fwd_kernel.early_config_prune(
                kernels._FWD_CONFIGS, named, BLOCK_L=block_l)[0])  # fmt: skip
            bwd_tile = kernels._tile_of(kernels._mscmat_scores_bwd_images_kernel.early_config_prune(
                kernels._BWD_CONFIGS, named, BLOCK_L=block_l)[0])  # fmt: skip
            lines.append(compile_one(kernels._mscmat_scores_fwd_kernel, dtype, common, fwd_tile))
            for kernel in (kernels._mscmat_scores_bwd_images_kernel, kernels._mscmat_scores_bwd_words_kernel):
                lines.append(compile_one(kernel, dtype, {**common, "ONE_CHUNK": one_chunk}, bwd_tile))
        if os.environ.get("MSA_COMPILE_ONE_DTYPE") == "1":
            break
    return lines


def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["MSA_COMPILE_ONE_DTYPE"] = "1"  # bfloat16 only: float16 lowers the same way and doubles the time
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode == 3:
        pytest.skip(f"this Triton cannot compile offline here: {run.stdout.strip()[-300:]}")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("_mscmat")]
    assert len(lines) == 6, run.stdout
    assert all(line.endswith("wgmma") for line in lines), run.stdout  # Hopper tensor cores, not FMAs


if __name__ == "__main__":
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        print(f"no offline compiler API: {error}")
        sys.exit(3)
    for line in compile_all():
        print(line)
