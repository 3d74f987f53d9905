"""Offline sm_90 (Hopper) compile report of the Triton kernels: no GPU needed.

    python benchmarks/kernel_report.py --out benchmarks/results/offline-sm90     # every kernel x config
    python benchmarks/kernel_report.py --launched --check                       # what tests/benchmarks launch

Each kernel is compiled through triton.compile for the sm_90 target down to a cubin with Triton's bundled ptxas;
the PTX is then assembled again with `ptxas -v` for the resource usage. One row per (kernel, dtype, BLOCK_L,
Dh, tile): registers per thread, spill stores/loads (bytes), shared memory (bytes, Triton's own count), CTAs per
SM (the smallest of the register, shared-memory, warp and block limits of sm_90) and whether the products use
Hopper's wgmma or the older mma.sync. Writes kernel_report_triton-<version>.md and .json into --out.

--launched compiles only the specialisations that tests/test_ops_gpu.py and the benchmarks launch (the tests'
first fitting tile, the benchmarks' every fitting tile) and the kernels of fused_backward.py that
bench_gpu_targets launches, so that a compile error shows up before a GPU is rented; --check exits 1 if any
compile fails. To compile under another Triton, put it first on PYTHONPATH
(`pip install --target DIR triton==3.6.0`; `PYTHONPATH=DIR python benchmarks/kernel_report.py ...`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# sm_90 limits per SM: 64K 32-bit registers, 228 KB shared memory (1 KB of it reserved per block), 64 warps,
# 32 blocks; registers are allocated per warp in units of 256.
SM90_REGISTERS = 65536
SM90_SHARED_BYTES = 228 * 1024
SM90_RESERVED_SHARED_PER_BLOCK = 1024
SM90_WARPS = 64
SM90_BLOCKS = 32
REGISTER_UNIT = 256
KERNELS = ("fwd", "bwd_images", "bwd_words")
# Input dtypes by label; "tf32" is float32 multiplied on tensor cores (torch's TF32 setting on), "fp32" on FMA units.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "tf32": "float32"}
POINTER_TYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "tf32": "fp32"}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compile: a kernel, the input dtype, the constexprs that depend on the shape, and a tile."""

    kernel: str  # one of KERNELS
    dtype: str  # a DTYPES label: bf16, fp16, fp32, tf32
    block_l: int
    head_dim: int
    has_mask: bool
    one_chunk: bool
    # BLOCK_I, BLOCK_N, num_warps, num_stages (forward: and A_IN_REGISTERS, WIDE, MAX_REGISTERS)
    tile: tuple[int, ...]
    # The images kernel's work: dq and du (IMAGE_GRADS), the statistics for the words kernel (STORE_STATS).
    image_grads: bool = True
    store_stats: bool = True

    @property
    def block_d(self) -> int:
        return max(16, 1 << (self.head_dim - 1).bit_length())


def _block_l(num_words: int) -> int:
    from msa.kernels.configs import MAX_BLOCK_L, MIN_PRODUCT_WORDS

    return min(max(1 << max(num_words - 1, 0).bit_length(), MIN_PRODUCT_WORDS), MAX_BLOCK_L)


def _specs_for(dtype: str, num_words: int, head_dim: int, has_mask: bool, every_tile: bool) -> list[Spec]:
    """The specialisations one call of the op (forward and backward) compiles for these inputs."""
    import torch

    from msa.kernels.configs import BWD_IMAGES_TILES, BWD_WORDS_TILES, FWD_TILES, fitting_tiles, tile_kind, words_chunk

    block_l = _block_l(num_words)
    one_chunk = num_words <= block_l
    block_d = Spec("fwd", dtype, block_l, head_dim, has_mask, one_chunk, (0, 0, 0, 0)).block_d

    def kind(words: int) -> str:
        return tile_kind(getattr(torch, DTYPES[dtype]), _input_precision(dtype), words, block_d)

    specs = []
    for kernel, tiles in (("fwd", FWD_TILES), ("bwd_images", BWD_IMAGES_TILES), ("bwd_words", BWD_WORDS_TILES)):
        # The dk/dv kernel takes its own chunks of a long text (words_chunk).
        chunk = words_chunk(kind(block_l), block_l, block_d) if kernel == "bwd_words" else block_l
        fitting = fitting_tiles(tiles, kind(chunk), chunk, block_d, kernel)
        for tile in fitting if every_tile else fitting[:1]:
            specs.append(Spec(kernel, dtype, chunk, head_dim, has_mask, one_chunk, tile))
    return specs


def _input_precision(dtype: str) -> str:
    """The kernels' INPUT_PRECISION for a dtype label (as mscmat_triton._input_precision picks it)."""
    return "ieee" if dtype == "fp32" else "tf32"


def launched_specs() -> list[Spec]:
    """What tests/test_ops_gpu.py (autotuning off: the first fitting tile) and bench_gpu_targets.py,
    bench_backends.py and bench_mscmat.py (autotuned: every fitting tile; L = 32, H = 12, Dh = 64, no mask) and
    bench_train_step.py (autotuned, bf16: captions of 30 words with a word mask, Dh = 64) launch on a GPU."""
    sys.path.insert(0, str(REPO / "tests"))
    import test_ops_gpu

    names = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}
    specs: list[Spec] = []
    for dtype, (_, _, length, _, head_dim, mask_kind) in test_ops_gpu.PARITY:
        specs += _specs_for(names[str(dtype)], length, head_dim, mask_kind is not None, every_tile=False)
    # The other GPU tests: every word masked, 64-bit offsets, a large image x text matrix, opcheck,
    # torch.compile, the current stream, float32 with TF32 on and off.
    for dtype, length, head_dim, has_mask in (
        ("fp16", 9, 64, True), ("bf16", 32, 64, False), ("fp16", 32, 32, True), ("bf16", 7, 32, True),
        ("bf16", 12, 32, True), ("fp16", 16, 64, True), ("tf32", 19, 64, True), ("fp32", 19, 64, True),
    ):  # fmt: skip
        specs += _specs_for(dtype, length, head_dim, has_mask, every_tile=False)
    # Only some gradients asked for (bf16, L 13, Dh 64, masked): the images kernel without dk, dv or without dq, du.
    images = next(spec for spec in _specs_for("bf16", 13, 64, True, every_tile=False) if spec.kernel == "bwd_images")
    specs += [dataclasses.replace(images, store_stats=False), dataclasses.replace(images, image_grads=False)]
    for dtype in ("bf16", "fp16", "fp32"):
        specs += _specs_for(dtype, 32, 64, False, every_tile=True)
    specs += _specs_for("bf16", 30, 64, True, every_tile=True)
    return list(dict.fromkeys(specs))


def report_specs() -> list[Spec]:
    """Every kernel x every config of its table for bf16 at the benchmark's L = 32 and Dh = 64, the forward's with
    a word mask as well; the default tiles for Dh = 128, for fp16, fp32 and TF32, and for long (chunked) texts."""
    from msa.kernels.configs import BWD_IMAGES_TILES, BWD_WORDS_TILES, FWD_TILES

    specs = []
    for kernel, tiles in (("fwd", FWD_TILES), ("bwd_images", BWD_IMAGES_TILES), ("bwd_words", BWD_WORDS_TILES)):
        specs += [Spec(kernel, "bf16", 32, 64, False, True, tile) for tile in tiles["low"]]
    specs += [Spec("fwd", "bf16", 32, 64, True, True, tile) for tile in FWD_TILES["low"]]
    for dtype, num_words, head_dim, has_mask in (("bf16", 32, 128, False), ("fp16", 32, 64, False),
                                                 ("fp32", 32, 64, False), ("tf32", 32, 64, False),
                                                 ("bf16", 150, 64, True)):  # fmt: skip
        specs += _specs_for(dtype, num_words, head_dim, has_mask, every_tile=False)
    return list(dict.fromkeys(specs))


def _kernel_fn(kernel: str):
    from msa.kernels import mscmat_kernels

    return {
        "fwd": mscmat_kernels.mscmat_scores_fwd_kernel,
        "bwd_images": mscmat_kernels.mscmat_scores_bwd_images_kernel,
        "bwd_words": mscmat_kernels.mscmat_scores_bwd_words_kernel,
    }[kernel].fn


POINTERS = {"Q", "U", "K", "V", "Mask", "Out", "GradT", "Stats", "DQ", "DU", "DK", "DV"}
# The sizes the benchmark launches with (bench_gpu_targets: Ni = Nt = 4096, H = 12; the spec's L and Dh).
BENCHMARK_IMAGES = BENCHMARK_TEXTS = 4096
BENCHMARK_HEADS = 12


def _launch_integers(spec: Spec) -> dict[str, int]:
    """The integer arguments of a benchmark launch of spec's kernel (contiguous tensors; L = the word block)."""
    words, heads, head_dim = spec.block_l, BENCHMARK_HEADS, spec.head_dim
    return {
        "stride_qi": heads * head_dim, "stride_qh": head_dim, "stride_kt": words * heads * head_dim,
        "stride_kl": heads * head_dim, "stride_kh": head_dim,
        "stride_mt": words if spec.has_mask else 0, "stride_ml": 1 if spec.has_mask else 0,
        "stride_oi": BENCHMARK_TEXTS, "stride_gt": BENCHMARK_IMAGES,
        "stride_split": BENCHMARK_IMAGES * heads * head_dim, "texts_per_split": BENCHMARK_TEXTS,
        "heads_per_split": heads,
        "stride_sp": heads * BENCHMARK_TEXTS * BENCHMARK_IMAGES, "stride_sh": BENCHMARK_TEXTS * BENCHMARK_IMAGES,
        "stride_st": BENCHMARK_IMAGES,
        "Ni": BENCHMARK_IMAGES, "Nt": BENCHMARK_TEXTS, "L": words, "H": heads,
    }  # fmt: skip


def _launch_specialisation(fn, spec: Spec) -> tuple[dict, dict]:
    """(constants, attrs) as Triton's launcher derives them from a benchmark launch: an integer argument equal to 1
    becomes a constant, and every pointer (the caching allocator aligns them) and every integer divisible by 16
    gets tt.divisibility = 16. Without these hints the loads are not vectorised: the default forward tile compiled
    to 255 registers per thread offline where the H200 ran it with at most 85 (three blocks per SM)."""
    integers = _launch_integers(spec)
    constants = {name: 1 for name, value in integers.items() if value == 1 and name in fn.arg_names}
    attrs = {}
    for index, name in enumerate(fn.arg_names):
        if name in POINTERS or (name in integers and integers[name] % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return constants, attrs


def _signature(fn, spec: Spec, constexprs: dict) -> dict:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "Mask":
            signature[name] = "*i1" if spec.has_mask else "*" + POINTER_TYPES[spec.dtype]
        elif name == "Stats":  # float32; without statistics to store the launch passes q in its place
            signature[name] = "*fp32" if spec.store_stats else "*" + POINTER_TYPES[spec.dtype]
        elif name in POINTERS:
            signature[name] = "*" + POINTER_TYPES[spec.dtype]
        elif name.startswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _ptxas_usage(ptx: str) -> dict:
    """Registers, spill bytes and stack frame of the kernel, from `ptxas -v` on its PTX (Triton's bundled ptxas,
    or TRITON_PTXAS_PATH as Triton itself takes it)."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    ptxas = os.environ.get("TRITON_PTXAS_PATH", str(bundled))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        run = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", str(path), "-o", str(Path(folder) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = run.stdout + run.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
    }


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident blocks per sm_90 SM, limited by registers, shared memory, warps and blocks."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = SM90_REGISTERS // max(per_warp * num_warps, 1)
    by_shared = SM90_SHARED_BYTES // (shared_bytes + SM90_RESERVED_SHARED_PER_BLOCK)
    return min(by_registers, by_shared, SM90_WARPS // num_warps, SM90_BLOCKS)


def replicated_products(ttgir: str) -> bool:
    """Whether a product's layout covers more rows or columns than its result has, so that several warps (or
    threads) compute the same elements. Triton gives every warp of a kernel with chained products (both backward
    kernels) 16 rows of its tensor-core products: with BLOCK_I < 16 x num_warps the products and the softmax around
    them run twice. float32 products (FMA units) have blocked layouts, whose threads and warps can as well
    outnumber the result's elements."""
    cover = {}
    for name, body in re.findall(r"^#(mma\d*) = #ttg\.nvidia_mma<\{(.*)\}>", ttgir, re.MULTILINE):
        warps = re.search(r"warpsPerCTA = \[(\d+), (\d+)\]", body).groups()
        instr = re.search(r"instrShape = \[(\d+), (\d+)", body).groups()
        cover[name] = [int(w) * int(i) for w, i in zip(warps, instr)]
    for name, body in re.findall(r"^#(blocked\d*) = #ttg\.blocked<\{(.*)\}>", ttgir, re.MULTILINE):
        sizes = [re.search(rf"{field} = \[([\d, ]+)\]", body).group(1).split(", ")
                 for field in ("sizePerThread", "threadsPerWarp", "warpsPerCTA")]  # fmt: skip
        cover[name] = [int(a) * int(b) * int(c) for a, b, c in zip(*sizes)]
    dots = re.findall(r"(?:warp_group_dot|tt\.dot) .*-> tensor<(\d+)x(\d+)xf32, #((?:mma|blocked)\d*)>", ttgir)
    return any(cover[name][0] > int(rows) or cover[name][1] > int(cols) for rows, cols, name in dots)


def compile_spec(spec: Spec) -> dict:
    """Compiles one specialisation for sm_90 and returns its report row (``error`` set when it failed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from msa.kernels.configs import max_registers

    fn = _kernel_fn(spec.kernel)
    block_i, block_n, warps, stages = spec.tile[:4]
    options = {"num_warps": warps, "num_stages": stages}
    cap = max_registers(spec.tile, spec.kernel)
    if cap:
        options["maxnreg"] = cap  # as the autotuner's Config passes it
    constexprs = {
        "HEAD_DIM": spec.head_dim, "BLOCK_D": spec.block_d, "BLOCK_L": spec.block_l, "HAS_MASK": spec.has_mask,
        "ONE_CHUNK": spec.one_chunk, "INPUT_PRECISION": _input_precision(spec.dtype),
        "UPCAST": False, "BLOCK_I": block_i, "BLOCK_N": block_n, "BLOCK_T": block_n,
        "A_IN_REGISTERS": spec.kernel == "fwd" and bool(spec.tile[4]),
        "WIDE": spec.kernel == "fwd" and bool(spec.tile[5]),
        "IMAGE_GRADS": spec.image_grads, "STORE_STATS": spec.store_stats,
    }  # fmt: skip
    if "GROUP_I" in fn.arg_names:
        from msa.kernels.mscmat_kernels import FWD_IMAGE_GROUP

        constexprs["GROUP_I"] = FWD_IMAGE_GROUP
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    launch_constants, attrs = _launch_specialisation(fn, spec)
    constexprs |= launch_constants
    row = {**dataclasses.asdict(spec), "block_d": spec.block_d, "triton": triton.__version__}
    started = time.perf_counter()
    try:
        source = ASTSource(
            fn=fn,
            signature=_signature(fn, spec, constexprs),
            constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()},
            attrs=attrs,
        )
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        ptx = compiled.asm["ptx"]
        usage = _ptxas_usage(ptx)
    except Exception as error:  # noqa: BLE001  (a failed compile is a row of the report)
        cause = error.__cause__ or error
        row["error"] = f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
        return row
    shared = int(compiled.metadata.shared)
    row.update(usage)
    row["shared_bytes"] = shared
    row["ctas_per_sm"] = ctas_per_sm(usage["registers"], shared, warps)
    row["mma"] = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
    if re.search(r"wgmma\.mma_async\S*\s+\{[^}]*\},\s*\{", ptx):
        row["mma"] = "wgmma, A in registers"  # the register-A form: {d...}, {a...}, desc_b
    row["replicated"] = replicated_products(compiled.asm["ttgir"])
    row["compile_s"] = round(time.perf_counter() - started, 1)
    return row


def _compile_all(specs: list[Spec], jobs: int) -> list[dict]:
    if jobs <= 1:
        return [compile_spec(spec) for spec in specs]
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_spec, specs))


def _compile_fused_backward() -> list[str]:
    """One line per kernel of fused_backward.py that bench_gpu_targets launches (the atomics alone; the fused
    backward at each of its FUSED_TILES): the sm_90 compile, its registers, spills and atomics; FAILED and why."""
    sys.path.insert(0, str(REPO / "benchmarks"))

    lines = []
    try:
        import fused_backward
    except Exception as error:  # noqa: BLE001  (a failed import is a line of the report)
        return [f"fused backward kernels: FAILED: {type(error).__name__}: {' '.join(str(error).split())[:300]}"]
    for name, args in [("atomics alone", ("atomics",))] + [
        (f"fused {tile}", ("fused", *tile)) for tile in fused_backward.FUSED_TILES
    ]:
        try:
            compiled = fused_backward.compile_for_sm90(*args)
            ptx = compiled.asm["ptx"]
            usage = _ptxas_usage(ptx)
        except Exception as error:  # noqa: BLE001
            cause = error.__cause__ or error
            lines.append(
                f"fused backward, {name}: FAILED: {type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
            )
            continue
        atomics = sorted(set(re.findall(r"\b(?:red|atom)\.[\w.]+", ptx)))
        lines.append(
            f"fused backward, {name}: compiled, {usage['registers']} registers, spills {usage['spill_stores']}/"
            f"{usage['spill_loads']} B, {compiled.metadata.shared / 1024:.1f} KB shared, atomics {', '.join(atomics)}"
        )
    return lines


def _forward_form(tile) -> str:
    """Where the forward keeps q, u, whether its products hold all BLOCK_T texts, and its register cap (empty for
    the backward)."""
    if len(tile) < 7:
        return ""
    cap = f", <= {tile[6]} registers" if tile[6] else ""
    return ("registers" if tile[4] else "shared") + (", one product" if tile[5] else "") + cap


def markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "| kernel | dtype | L block | Dh | mask | one chunk | BLOCK_I | BLOCK_T | warps | stages "
        "| q, u (fwd) | registers | spill st/ld B | shared KB | CTAs/SM | mma |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        tile = row["tile"]
        head = (
            f"| {row['kernel']} | {row['dtype']} | {row['block_l']} | {row['head_dim']} | {row['has_mask']} "
            f"| {row['one_chunk']} | {tile[0]} | {tile[1]} | {tile[2]} | {tile[3]} "
            f"| {_forward_form(tile)} "
        )
        if "error" in row:
            lines.append(head + f"| FAILED: {row['error']} | | | | |")
            continue
        lines.append(
            head + f"| {row['registers']} | {row['spill_stores']}/{row['spill_loads']} "
            f"| {row['shared_bytes'] / 1024:.1f} | {row['ctas_per_sm']} "
            f"| {row['mma']}{', rows replicated' if row['replicated'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for kernel_report_triton-<version>.md and .json")
    parser.add_argument("--launched", action="store_true", help="only what the GPU tests and benchmarks launch")
    parser.add_argument("--check", action="store_true", help="exit 1 when any specialisation fails to compile")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiles in parallel")
    args = parser.parse_args()

    import triton

    specs = launched_specs() if args.launched else report_specs()
    started = time.perf_counter()
    rows = _compile_all(specs, args.jobs)
    failed = [row for row in rows if "error" in row]
    scope = "launched by the GPU tests and benchmarks" if args.launched else "every kernel and config"
    title = f"sm_90 compile report, triton {triton.__version__}: {scope}"
    text = markdown(rows, title)
    print(text)
    if args.launched:
        fused = _compile_fused_backward()
        text += "\n" + "\n".join(fused) + "\n"
        print("\n".join(fused))
        failed += [line for line in fused if "FAILED" in line]
    print(f"{len(rows)} specialisations compiled for sm_90 in {time.perf_counter() - started:.0f} s, "
          f"{len(failed)} failed")  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"kernel_report_{'launched_' if args.launched else ''}triton-{triton.__version__}"
        (args.out / f"{stem}.md").write_text(text)
        (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
