"""Time of the retrieval metrics (``msa.evaluation.retrieval_metrics``) on benchmark-size similarity matrices.

    python benchmarks/bench_eval.py                  # RSICD test size (1093 x 5465) and NWPU test size (3150 x 15750)
    python benchmarks/bench_eval.py --quick          # RSICD size only
    python benchmarks/bench_eval.py --out DIR        # where the JSON rows and the markdown table go

The matrix is synthetic (Gaussian scores plus a signal on the matching pairs, with RSICD-like duplicate captions so
that ties occur), 5 captions per image in image-major order. The baseline is the per-query sort loop most RSITR
codebases inherited from VSE++ (``numpy.argsort`` of each row and column, then the position of the first match);
it agrees with the chunked protocol when there are no ties, which is checked on every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from msa.evaluation import retrieval_metrics, retrieval_ranks

REPO = Path(__file__).resolve().parents[1]
CASES = {"rsicd-test": (1093, 5), "nwpu-test": (3150, 5)}


def sort_loop_ranks(similarity: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The usual per-query argsort loop (ties broken by sort position): 0-based ranks both ways."""
    num_images, num_texts = similarity.shape
    i2t = np.zeros(num_images, dtype=np.int64)
    for image in range(num_images):
        order = np.argsort(similarity[image])[::-1]
        i2t[image] = np.flatnonzero(text_to_image[order] == image).min()
    t2i = np.zeros(num_texts, dtype=np.int64)
    for text in range(num_texts):
        order = np.argsort(similarity[:, text])[::-1]
        t2i[text] = np.flatnonzero(order == text_to_image[text])[0]
    return i2t, t2i


def synthetic(
    num_images: int, per_image: int, ties: bool, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    owner = torch.arange(num_images).repeat_interleave(per_image)
    similarity = torch.randn(num_images, num_images * per_image, generator=generator, dtype=dtype)
    similarity[owner, torch.arange(owner.numel())] += 2.0
    if ties:
        # ~40% of the captions duplicate another caption (RSICD test: 3331 distinct strings of 5465): equal columns.
        duplicates = torch.randperm(owner.numel(), generator=generator)[: int(0.4 * owner.numel())]
        similarity[:, duplicates] = similarity[:, torch.roll(duplicates, 1)]
    return similarity.to(device), owner.to(device)


def timed(repeats: int, device: torch.device, function, *args, **kwargs) -> tuple[list[float], object]:
    """Wall times of ``repeats`` calls and the last result."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, result


def environment(device: torch.device) -> dict:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": name,
        "load_average_1min": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "git": sha.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="RSICD size only")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=11, help="timed repetitions (median reported)")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 1024, 4096], help="chunk sizes to time")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output folder")
    args = parser.parse_args()
    device = torch.device(args.device)
    env = environment(device)
    rows = []
    cases = {"rsicd-test": CASES["rsicd-test"]} if args.quick else CASES
    for case, (num_images, per_image) in cases.items():
        similarity, owner = synthetic(num_images, per_image, ties=True, device=device)
        shape = [num_images, num_images * per_image]
        retrieval_metrics(similarity, owner)  # warm-up
        for chunk in args.chunk_sizes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            times, _ = timed(args.repeats, device, retrieval_metrics, similarity, owner, chunk_size=chunk)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
            # The largest temporaries: two [chunk, N_txt] bool masks and their int32 column counts.
            bound = (min(chunk, shape[0]) * shape[1] * 2 + shape[1] * 4) / 2**20
            rows.append(
                {
                    "case": case,
                    "provider": f"msa chunk={chunk}",
                    "shape": shape,
                    "median_ms": 1e3 * statistics.median(times),
                    "min_ms": 1e3 * min(times),
                    "peak_extra_mib": peak,
                    "temporary_bound_mib": bound,
                    **env,
                }
            )
        # The sort-loop baseline on the CPU, on a tie-free matrix where both must agree exactly (float64: float32
        # Gaussians tie by chance in a 3150 x 15750 matrix).
        clean, clean_owner = synthetic(num_images, per_image, False, torch.device("cpu"), torch.float64)
        baseline_times, theirs = timed(3, torch.device("cpu"), sort_loop_ranks, clean.numpy(), clean_owner.numpy())
        ours = retrieval_ranks(clean, clean_owner)
        agree = bool(np.array_equal(ours[0].numpy(), theirs[0]) and np.array_equal(ours[1].numpy(), theirs[1]))
        rows.append(
            {
                "case": case,
                "provider": "numpy argsort loop (baseline)",
                "shape": shape,
                "median_ms": 1e3 * statistics.median(baseline_times),
                "min_ms": 1e3 * min(baseline_times),
                "peak_extra_mib": None,
                "temporary_bound_mib": None,
                "agrees_without_ties": agree,
                **{**env, "device": platform.processor() or platform.machine()},
            }
        )
        if not agree:
            raise AssertionError(f"{case}: chunked ranks differ from the sort loop on a tie-free matrix")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"device: {env['device']} ({env['threads']} threads, 1-min load average {env['load_average_1min']:.1f}), "
        f"torch {env['torch']}, git {env['git']}",
        "",
        "| case | N_img x N_txt | provider | median ms | min ms | peak extra MiB (CUDA) | temporaries bound MiB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        peak = "" if row["peak_extra_mib"] is None else f"{row['peak_extra_mib']:.1f}"
        bound = "" if row["temporary_bound_mib"] is None else f"{row['temporary_bound_mib']:.1f}"
        lines.append(
            f"| {row['case']} | {row['shape'][0]} x {row['shape'][1]} | {row['provider']} | {row['median_ms']:.1f} "
            f"| {row['min_ms']:.1f} "
            f"| {peak} | {bound} |"
        )
    table = "\n".join(lines)
    print(table)
    tag = "cuda" if device.type == "cuda" else "cpu"
    (out / f"bench_eval_{tag}.md").write_text(table + "\n")
    (out / f"bench_eval_{tag}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
