"""Short GPU checks for benchmarks/device_check.sh.

    python benchmarks/device_smoke.py smoke --out DIR     # every GPU backend x dtype, one odd shape, fwd + grads
    python benchmarks/device_smoke.py profile --backend triton   # one forward + backward at the target shape

smoke: each available GPU backend ("triton", "cuda") and dtype (bf16 first) on one odd shape (Ni, Nt, L, H, Dh =
97, 75, 19, 3, 64, a random mask, one text without words) against the float64 einsum reference, forward and all
four gradients, relative error ||got - want|| / ||want||. The caching allocator's free memory is filled with NaN
before each call (outputs come from it), so an element a kernel never writes fails. One JSON line per check is
appended to DIR/smoke.jsonl as it finishes.

profile: one forward and backward at the benchmark's target shape (bf16, 4096 x 4096, L = 32, H = 12, Dh = 64)
with the first fitting tile of each kernel, after a warm-up call, between cudaProfilerStart and cudaProfilerStop:
for `ncu --profile-from-start off`, which then sees just that call's kernels.

Both modes end with the registers, spills and shared memory of every Triton kernel this process compiled, as the
driver reports them when it loads the kernel (smoke: DIR/triton_kernels.md), to check the offline sm_90 report
(benchmarks/kernel_report.py) against: on the first H200 run they disagreed (255 registers offline for the default
forward tile, at most 85 on the card) until the report compiled with the launcher's specialisation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from msa.ops import backend_available, mscmat_scores, mscmat_scores_ref

# Relative-error bounds against float64: float32 products may run on TF32 tensor cores in torch's default
# settings here (off: allow_tf32 is left False), bf16/fp16 operands land between 1e-3 and 1e-2.
BOUNDS = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}
SMOKE_SHAPE = (97, 75, 19, 3, 64)
TARGET_SHAPE = (4096, 4096, 32, 12, 64)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def make_inputs(shape, dtype, seed):
    ni, nt, length, heads, head_dim = shape
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, device="cuda", generator=generator).to(dtype)

    q, u = randn(ni, heads, head_dim), randn(ni, heads, head_dim)
    k, v = randn(nt, length, heads, head_dim), randn(nt, length, heads, head_dim)
    mask = torch.rand(nt, length, device="cuda", generator=generator) > 0.3
    mask[:, 0] = True
    mask[nt // 2] = False
    return q, u, k, v, mask


def poison_free_memory(megabytes: int = 256) -> None:
    """Fills memory the caching allocator will hand out next with NaN (the op's outputs are torch.empty)."""
    blocks = [torch.full((megabytes << 18,), float("nan"), device="cuda") for _ in range(4)]
    del blocks


def smoke_one(backend: str, dtype: torch.dtype, seed: int) -> dict:
    q, u, k, v, mask = make_inputs(SMOKE_SHAPE, dtype, seed)
    exact_inputs = [t.double().requires_grad_(True) for t in (q, u, k, v)]
    exact = mscmat_scores_ref(*exact_inputs, mask)
    grad = torch.randn(exact.shape, device="cuda", dtype=torch.float64)
    exact_grads = torch.autograd.grad(exact, exact_inputs, grad)

    inputs = [t.clone().requires_grad_(True) for t in (q, u, k, v)]
    poison_free_memory()
    started = time.perf_counter()
    scores = mscmat_scores(*inputs, mask, backend=backend)
    grads = torch.autograd.grad(scores, inputs, grad.to(dtype))
    torch.cuda.synchronize()
    errors = {"scores": relative_error(scores, exact)}
    errors.update({f"d{name}": relative_error(g, w) for name, g, w in zip("qukv", grads, exact_grads)})
    worst = max(errors.values())
    return {
        "backend": backend,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": SMOKE_SHAPE,
        "seconds_with_compile": round(time.perf_counter() - started, 2),
        "relative_errors": errors,
        "bound": BOUNDS[dtype],
        "empty_text_scores_zero": bool((scores[:, SMOKE_SHAPE[1] // 2] == 0).all()),
        "ok": worst <= BOUNDS[dtype] and bool((scores[:, SMOKE_SHAPE[1] // 2] == 0).all()),
    }


KERNEL_CONSTANTS = ("HEAD_DIM", "BLOCK_L", "HAS_MASK", "ONE_CHUNK", "IMAGE_GRADS", "STORE_STATS", "BLOCK_I", "BLOCK_T")


def triton_kernel_resources() -> list[str]:
    """One markdown row per Triton kernel compiled and loaded in this process: its constants, warps, stages,
    shared memory, and the registers and spills the driver reports."""
    from msa.kernels import mscmat_kernels

    rows = []
    for name in ("mscmat_scores_fwd_kernel", "mscmat_scores_bwd_images_kernel", "mscmat_scores_bwd_words_kernel"):
        jit = getattr(mscmat_kernels, name).fn  # the autotuner's JIT function
        for caches in getattr(jit, "device_caches", {}).values():
            for kernel in caches[0].values():
                try:
                    kernel._init_handles()  # loads it (a no-op when it ran): sets n_regs and n_spills
                    names = {jit.arg_names[key[0]]: value for key, value in kernel.src.constants.items()}
                    constants = ", ".join(f"{c}={names[c]}" for c in KERNEL_CONSTANTS if c in names)
                    meta = kernel.metadata
                    rows.append(
                        f"| {name.removeprefix('mscmat_scores_')} | {constants} | {meta.num_warps} | "
                        f"{meta.num_stages} | {meta.shared} | {kernel.n_regs} | {kernel.n_spills} |"
                    )
                except Exception as error:  # noqa: BLE001  (a diagnostic: report and go on)
                    rows.append(f"| {name} | unavailable: {type(error).__name__}: {error} | | | | | |")
    header = "| kernel | constants | warps | stages | shared B | registers | spills |\n|---|---|---|---|---|---|---|"
    return [header, *rows]


def smoke(out: Path) -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    backends = [name for name in ("triton", "cuda") if backend_available(name, "cuda")]
    if not backends:
        print("smoke: no GPU backend is available", file=sys.stderr)
        return 1
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for seed, backend in enumerate(backends):
            try:
                row = smoke_one(backend, dtype, seed)
            except Exception as error:  # noqa: BLE001  (a crash is a failed check; the next one still runs)
                row = {"backend": backend, "dtype": str(dtype), "ok": False, "error": repr(error)[:500]}
            failures += not row["ok"]
            with open(out / "smoke.jsonl", "a") as file:
                file.write(json.dumps(row) + "\n")
            worst = max(row.get("relative_errors", {"crash": float("inf")}).values())
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {backend:6s} {row['dtype']:8s} worst rel. error {worst:.2e}")
    if "triton" in backends:
        (out / "triton_kernels.md").write_text("\n".join(triton_kernel_resources()) + "\n")
    return 1 if failures else 0


def profile(backend: str) -> int:
    os.environ["MSA_TRITON_AUTOTUNE"] = "0"  # one config per kernel
    q, u, k, v, mask = make_inputs(TARGET_SHAPE, torch.bfloat16, 0)
    inputs = [t.requires_grad_(True) for t in (q, u, k, v)]

    def forward_backward():
        scores = mscmat_scores(*inputs, backend=backend)
        torch.autograd.grad(scores, inputs, torch.ones_like(scores))

    # The first call compiles and, even with one config left, lets Triton's autotuner time it (dozens of launches
    # of each kernel); under `ncu --profile-from-start off` only the call between start and stop is profiled.
    forward_backward()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    forward_backward()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    if backend == "triton":
        print("\n".join(triton_kernel_resources()))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("smoke", "profile"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for smoke.jsonl")
    parser.add_argument("--backend", default="triton", help="profile: the backend to run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("device_smoke: needs a CUDA device", file=sys.stderr)
        return 1
    return smoke(args.out) if args.mode == "smoke" else profile(args.backend)


if __name__ == "__main__":
    sys.exit(main())
