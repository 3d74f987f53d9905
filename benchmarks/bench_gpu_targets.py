"""The GPU targets of the mscmat_scores kernels, measured side by side in one run on one card.

    python benchmarks/bench_gpu_targets.py --out DIR

At bf16, Ni = Nt = 4096, L = 32, H = 12, Dh = 64, for each GPU backend ("triton", "cuda"): forward, backward
and forward+backward time, TFLOP/s and the fraction of the dense bf16 matmul rate measured here (forward FLOPs
4 L H Dh per pair; backward counted as twice the forward, as in bench_mscmat.py), speed-up over the einsum
reference (run over image chunks that fit in memory), peak extra memory; a single fused Triton backward kernel
and its atomic adds alone against the op's two backward kernels (fused_backward.py); then a full evaluation of
RSICD's test split (1093 images x 5465 captions, 4 scales) through MSCMAT. Writes bench_gpu_targets_<card>.json
and .md, with the configuration the Triton autotuner chose for each kernel and size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mscmat import chunked_reference, environment, make_inputs, matmul_rate, median_seconds  # noqa: E402

from msa.mscmat import MSCMAT  # noqa: E402
from msa.ops import backend_available, mscmat_scores  # noqa: E402

TARGETS = {"forward": 0.40, "backward": 0.25}
RSICD_TARGET_MS = 50.0


def peak_extra_mib(fn, device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def op_rows(backends, shape, dtype, rate, repeats, device) -> list[dict]:
    ni, nt, length, heads, head_dim = shape
    forward_flops = 4 * length * heads * head_dim * ni * nt
    flops = {"forward": forward_flops, "backward": 2 * forward_flops, "forward+backward": 3 * forward_flops}
    q, u, k, v = make_inputs(ni, nt, length, heads, head_dim, device, dtype, requires_grad=True)
    inputs = (q, u, k, v)
    with torch.no_grad():
        reference_seconds = median_seconds(lambda: chunked_reference(q, u, k, v), device, repeats=1, warmup=0)
    rows = [{"provider": "reference (chunked)", "mode": "forward", "median_ms": reference_seconds * 1e3}]
    grad = torch.randn(ni, nt, device=device, dtype=dtype)
    for backend in backends:

        def forward(backend=backend):
            with torch.no_grad():
                return mscmat_scores(q, u, k, v, backend=backend)

        scores = mscmat_scores(q, u, k, v, backend=backend)

        def backward(scores=scores):
            return torch.autograd.grad(scores, inputs, grad, retain_graph=True)

        def forward_backward(backend=backend):
            return torch.autograd.grad(mscmat_scores(q, u, k, v, backend=backend), inputs, grad)

        for mode, fn in (("forward", forward), ("backward", backward), ("forward+backward", forward_backward)):
            seconds = median_seconds(fn, device, repeats, warmup=2)
            achieved = flops[mode] / seconds
            row = {
                "provider": backend,
                "mode": mode,
                "median_ms": seconds * 1e3,
                "tflops": achieved / 1e12,
                "fraction_of_matmul": achieved / rate,
                "peak_extra_mib": peak_extra_mib(fn, device),
            }
            if mode in TARGETS:
                row["target_fraction"] = TARGETS[mode]
            if mode == "forward":
                row["speedup_vs_reference"] = reference_seconds / seconds
            rows.append(row)
        del scores
    return rows


def fused_backward_rows(shape, backward_ms, rate, repeats, device) -> list[dict]:
    """The fused backward kernel of fused_backward.py against the op's two kernels (backward_ms, measured in this
    run), and its atomic adds alone with four and with two texts a program (each a share of the two-kernel
    backward): the measurement behind one backward kernel or two."""
    from fused_backward import FUSED_TILES, fused_backward, image_side_atomics

    ni, nt, length, heads, head_dim = shape
    q, u, k, v = make_inputs(ni, nt, length, heads, head_dim, device, torch.bfloat16)
    grad = torch.randn(ni, nt, device=device, dtype=torch.bfloat16)
    flops = 2 * 4 * length * heads * head_dim * ni * nt  # counted as the backward rows count it
    rows = []
    for texts, images, warps in FUSED_TILES:

        def run(texts=texts, images=images, warps=warps):
            return fused_backward(grad, q, u, k, v, texts_per_program=texts, block_i=images, num_warps=warps)

        seconds = median_seconds(run, device, repeats, warmup=2)
        speedup = backward_ms / (seconds * 1e3)
        rows.append(
            {
                "provider": "triton",
                "mode": f"fused backward, {texts} texts x {images} images, {warps} warps (vs two kernels "
                f"{speedup:.2f}x)",
                "median_ms": seconds * 1e3,
                "tflops": flops / seconds / 1e12,
                "fraction_of_matmul": flops / seconds / rate,
                "speedup_vs_two_kernels": speedup,
            }
        )
    for texts in (4, 2):
        seconds = median_seconds(lambda texts=texts: image_side_atomics(q, u, nt, texts), device, repeats, warmup=2)
        share = seconds * 1e3 / backward_ms
        rows.append(
            {
                "provider": "triton",
                "mode": f"fused-backward floor, {texts} texts a program: dq, du atomic adds alone "
                f"({share:.0%} of the backward)",
                "median_ms": seconds * 1e3,
                "share_of_backward": share,
                "texts_per_program": texts,
            }
        )
    return rows


def rsicd_rows(backends, device, repeats) -> list[dict]:
    channels, dim, heads, length = (256, 512, 1024, 2048), 768, 12, 30
    torch.manual_seed(0)
    layer = MSCMAT(channels, dim=dim, num_heads=heads).to(device).eval()
    features = [torch.randn(1093, c, device=device) for c in channels]
    words = torch.randn(5465, length, dim, device=device)
    text_global = torch.randn(5465, dim, device=device)
    rows = []
    for backend in backends:
        layer.backend = backend
        for precision in ("bf16-autocast", "fp32"):

            def evaluate(precision=precision):
                with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=precision != "fp32"):
                    return layer(features, words, text_global)

            seconds = median_seconds(evaluate, device, repeats, warmup=1)
            rows.append(
                {"provider": backend, "mode": f"RSICD test eval, 4 scales, {precision}", "median_ms": seconds * 1e3,
                 "target_ms": RSICD_TARGET_MS}
            )  # fmt: skip
    return rows


def autotuned_tiles() -> list[dict]:
    """The configuration Triton's autotuner chose for each kernel and autotune key timed in this process."""
    try:
        from msa.kernels import mscmat_kernels
    except ImportError:  # no Triton backend
        return []
    chosen = []
    for name in ("mscmat_scores_fwd_kernel", "mscmat_scores_bwd_images_kernel", "mscmat_scores_bwd_words_kernel"):
        for key, config in getattr(getattr(mscmat_kernels, name), "cache", {}).items():
            chosen.append(
                {
                    "kernel": name.removeprefix("mscmat_scores_").removesuffix("_kernel"),
                    "key": str(key),
                    "config": str(config),
                }
            )
    return chosen


def markdown(rows, rate, env, shape, tiles=()) -> str:
    lines = [
        f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}, git {env['git_sha']}",
        f"measured dense bf16 matmul rate: {rate / 1e12:.1f} TFLOP/s; op shape Ni, Nt, L, H, Dh = {shape}, bf16",
        "",
        "| provider | mode | median ms | TFLOP/s | of matmul (target) | vs reference | peak extra MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def fmt(row, key, pattern):
        return pattern.format(row[key]) if key in row else ""

    for row in rows:
        fraction = fmt(row, "fraction_of_matmul", "{:.0%}")
        if "target_fraction" in row:
            fraction += f" ({row['target_fraction']:.0%})"
        if "target_ms" in row:
            fraction = f"(target < {row['target_ms']:.0f} ms)"
        lines.append(
            f"| {row['provider']} | {row['mode']} | {row['median_ms']:.2f} | {fmt(row, 'tflops', '{:.1f}')} "
            f"| {fraction} | {fmt(row, 'speedup_vs_reference', '{:.1f}x')} | {fmt(row, 'peak_extra_mib', '{:.0f}')} |"
        )
    if tiles:
        lines += ["", "Triton autotuner's choices:", "", "| kernel | key | config |", "|---|---|---|"]
        lines += [f"| {tile['kernel']} | {tile['key']} | {tile['config']} |" for tile in tiles]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output folder")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats (median)")
    parser.add_argument("--size", type=int, default=4096, help="Ni = Nt of the op benchmark")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_targets: needs a CUDA device", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    env = environment(device)
    backends = [name for name in ("triton", "cuda") if backend_available(name, device)]
    rate = matmul_rate(device, torch.bfloat16)
    shape = (args.size, args.size, 32, 12, 64)
    print(f"bf16 matmul {rate / 1e12:.1f} TFLOP/s; op benchmark {shape} on {backends} ...", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = env["device"].replace(" ", "_")

    def write(rows):  # after each part, so that a run cut by a time limit keeps what it measured
        tiles = autotuned_tiles()
        table = markdown(rows, rate, env, shape, tiles)
        (args.out / f"bench_gpu_targets_{tag}.md").write_text(table)
        record = {"matmul_rate_flops": rate, "shape": shape, "environment": env, "rows": rows, "autotuned": tiles}
        (args.out / f"bench_gpu_targets_{tag}.json").write_text(json.dumps(record, indent=1) + "\n")
        return table

    rows = []
    for backend in backends:
        measured = op_rows([backend], shape, torch.bfloat16, rate, args.repeats, device)
        rows += measured if not rows else measured[1:]  # the reference row once
        write(rows)
    print("RSICD test split through MSCMAT ...", file=sys.stderr)
    rows += rsicd_rows(backends, device, max(3, args.repeats // 3))
    table = write(rows)
    # A side measurement, last: its compiles and a failure must not cost a target row under a time limit.
    triton_backward = [row for row in rows if row["provider"] == "triton" and row["mode"] == "backward"]
    if triton_backward:
        try:
            rows += fused_backward_rows(shape, triton_backward[0]["median_ms"], rate, args.repeats, device)
            table = write(rows)
        except Exception as error:  # noqa: BLE001
            print(f"fused backward failed: {type(error).__name__}: {error}", file=sys.stderr)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
