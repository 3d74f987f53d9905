"""Speed, memory and accuracy of ``msa.ops.mscmat_scores`` against its einsum reference, on this machine.

    python benchmarks/bench_mscmat.py                 # every case for this device
    python benchmarks/bench_mscmat.py --quick         # small shapes only (a smoke run)
    python benchmarks/bench_mscmat.py --out DIR       # where the JSON rows and the markdown table go

Every figure that matters is a ratio measured side by side in this one run: the fused op against the reference,
and its achieved FLOP rate against this device's dense matmul rate measured here too (fp32 on a CPU, bf16 on a
GPU). FLOPs are counted as 4 * L * H * Dh per (image, text) pair forward (two dot products of length Dh per word
and head); backward as twice that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from msa.mscmat import MSCMAT, mscmat_pairs_ref
from msa.ops import available_backends, mscmat_scores, mscmat_scores_ref

REPO = Path(__file__).resolve().parents[1]
# The unchunked reference is run only while its [Ni, Nt, H, L] temporaries fit in this budget.
REFERENCE_MEMORY_BUDGET = 6 * 2**30


@dataclass
class Row:
    case: str
    provider: str
    mode: str
    dtype: str
    shape: dict
    median_ms: float | None
    peak_extra_mib: float | None
    max_abs_error: float | None
    tflops: float | None
    fraction_of_matmul: float | None
    note: str = ""
    environment: dict = field(default_factory=dict)


def environment(device: torch.device) -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    except OSError:
        sha = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": name,
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_sha": sha.strip(),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Peak extra memory of the block, in bytes (result[0] after exit). On a CPU this is the peak resident set
    above the level at entry (Linux: VmHWM, reset through /proc/self/clear_refs), so it counts the kernels'
    own scratch buffers as well as torch's allocations."""
    result = [None]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result[0] = torch.cuda.max_memory_allocated(device) - base
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        base = _rss_bytes("VmRSS:")
    except OSError:
        yield result
        return
    yield result
    result[0] = max(0, _rss_bytes("VmHWM:") - base)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Dense square matmul FLOP/s of this device, measured now."""
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, repeats=5, warmup=2)
    return 2 * size**3 / seconds


def make_inputs(ni, nt, length, heads, head_dim, device, dtype, requires_grad=False, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return (
        randn(ni, heads, head_dim),
        randn(ni, heads, head_dim),
        randn(nt, length, heads, head_dim),
        randn(nt, length, heads, head_dim),
    )


def reference_bytes(ni, nt, length, heads, dtype) -> int:
    # logits, readouts, softmax weights and their product are each [Ni, Nt, H, L].
    return 4 * ni * nt * heads * length * torch.finfo(dtype).bits // 8


def chunked_reference(q, u, k, v, budget: int = REFERENCE_MEMORY_BUDGET) -> torch.Tensor:
    """The reference over image chunks, each within the memory budget (forward only)."""
    per_image = reference_bytes(1, k.shape[0], k.shape[1], k.shape[2], q.dtype)
    chunk = max(1, budget // max(per_image, 1))
    return torch.cat([mscmat_scores_ref(q[i : i + chunk], u[i : i + chunk], k, v) for i in range(0, q.shape[0], chunk)])


def max_error_vs_float64(scores: torch.Tensor, q, u, k, v, rows: int | None = None) -> tuple[float, str]:
    """Max |scores - float64 reference| (on the first `rows` images when the whole matrix would be too slow)."""
    note = ""
    if rows is not None and rows < q.shape[0]:
        q, u, scores = q[:rows], u[:rows], scores[:rows]
        note = f"error on the first {rows} image rows"
    expected = chunked_reference(*(t.detach().double() for t in (q, u, k, v)))
    return (scores.detach().double() - expected).abs().max().item(), note


def op_providers(device: torch.device) -> list[str]:
    """Fused backends of this device (fastest first), then the reference (and on a GPU its compiled form)."""
    fused = [name for name in available_backends(device) if name != "reference"]
    if device.type == "cuda":
        return [*fused, "reference", "reference-compiled"]
    return [*fused, "reference"]


def run_provider(provider: str, q, u, k, v, mode: str):
    if provider == "reference-compiled":
        fn = _compiled_reference()
    else:

        def fn(q, u, k, v):
            return mscmat_scores(q, u, k, v, backend=provider)

    if mode == "forward":
        with torch.no_grad():
            return fn(q, u, k, v)
    scores = fn(q, u, k, v)
    if mode == "forward+graph":
        return scores
    scores.backward(torch.ones_like(scores))
    return scores


_COMPILED = {}


def _compiled_reference():
    if "reference" not in _COMPILED:
        _COMPILED["reference"] = torch.compile(mscmat_scores_ref)
    return _COMPILED["reference"]


def op_call(provider: str, mode: str, q, u, k, v, chunked: bool) -> Callable[[], torch.Tensor]:
    if chunked:

        def call():
            with torch.no_grad():
                return chunked_reference(q, u, k, v)

        return call

    if mode == "backward":
        scores = run_provider(provider, q, u, k, v, "forward+graph")
        grad = torch.ones_like(scores)
        return lambda: torch.autograd.grad(scores, (q, u, k, v), grad, retain_graph=True) and scores

    def call():
        for tensor in (q, u, k, v):
            tensor.grad = None
        return run_provider(provider, q, u, k, v, mode)

    return call


def layer_inputs(ni: int, nt: int, device: torch.device):
    """The published layer sizes: 4 scales of ResNet-50 channels, D = 768, 12 heads, 30 word tokens."""
    channels, dim, heads, length = (256, 512, 1024, 2048), 768, 12, 30
    torch.manual_seed(0)
    layer = MSCMAT(channels, dim=dim, num_heads=heads).to(device).eval()
    features = [torch.randn(ni, c, device=device) for c in channels]
    words = torch.randn(nt, length, dim, device=device)
    text_global = torch.randn(nt, dim, device=device)
    shape = {"Ni": ni, "Nt": nt, "scales": list(channels), "D": dim, "H": heads, "L": length}
    return layer, (features, words, text_global), shape


def layer_call(provider: str, layer: MSCMAT, inputs) -> Callable[[], list[torch.Tensor]]:
    def call():
        with torch.no_grad():
            if provider == "pairs":
                return mscmat_pairs_ref(layer, *inputs)
            layer.backend = provider
            return layer(*inputs)

    return call


def peak_extra_mib(spec: dict, device: torch.device) -> float | None:
    """Peak extra memory of one call described by `spec`. On a CPU it runs in a child process whose glibc returns
    large blocks to the system on free (so the resident-set peak means something, and the timings of this
    process are left alone); on a GPU it reads the CUDA allocator's peak here."""
    if device.type == "cuda":
        call = call_from_spec(spec, device)
        with peak_memory(device) as peak:
            call()
        return None if peak[0] is None else peak[0] / 2**20
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
    child = subprocess.run(
        [sys.executable, __file__, "--peak-memory-of", json.dumps(spec)], env=env, capture_output=True, text=True
    )
    try:
        return float(child.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def call_from_spec(spec: dict, device: torch.device) -> Callable[[], object]:
    if spec["kind"] == "layer":
        layer, inputs, _ = layer_inputs(spec["ni"], spec["nt"], device)
        return layer_call(spec["provider"], layer, inputs)
    ni, nt, length, heads, head_dim = spec["shape"]
    dtype = getattr(torch, spec["dtype"].replace("torch.", ""))
    requires_grad = spec["mode"] != "forward"
    q, u, k, v = make_inputs(ni, nt, length, heads, head_dim, device, dtype, requires_grad)
    return op_call(spec["provider"], spec["mode"], q, u, k, v, spec["chunked"])


def bench_op_case(name, ni, nt, length, heads, head_dim, dtype, mode, device, rate, repeats, env) -> list[Row]:
    rows = []
    requires_grad = mode != "forward"
    q, u, k, v = make_inputs(ni, nt, length, heads, head_dim, device, dtype, requires_grad)
    shape = {"Ni": ni, "Nt": nt, "L": length, "H": heads, "Dh": head_dim}
    flops = 4 * length * heads * head_dim * ni * nt * {"forward": 1, "backward": 2, "forward+backward": 3}[mode]
    error_rows = None if ni * nt <= 300_000 else 64
    for provider in op_providers(device):
        note = ""
        needs = reference_bytes(ni, nt, length, heads, dtype) * (2 if requires_grad else 1)
        chunked = provider.startswith("reference") and needs > REFERENCE_MEMORY_BUDGET
        if chunked:
            if requires_grad or provider == "reference-compiled":
                rows.append(
                    Row(name, provider, mode, str(dtype), shape, None, None, None, None, None,
                        f"needs {needs / 2**30:.1f} GB for its [Ni, Nt, H, L] temporaries: not run", env)
                )  # fmt: skip
                continue
            note = f"chunked over images (unchunked it needs {needs / 2**30:.1f} GB)"
        call = op_call(provider, mode, q, u, k, v, chunked)
        provider_repeats = 1 if provider.startswith("reference") and ni * nt > 300_000 else repeats
        scores = call()
        seconds = median_seconds(call, device, provider_repeats, warmup=0)
        error, error_note = max_error_vs_float64(scores, q, u, k, v, error_rows)
        del scores
        spec = {"kind": "op", "shape": [ni, nt, length, heads, head_dim], "dtype": str(dtype), "mode": mode}
        peak = peak_extra_mib({**spec, "provider": provider, "chunked": chunked}, device)
        achieved = flops / seconds
        rows.append(
            Row(name, provider, mode, str(dtype), shape, seconds * 1e3, peak, error, achieved / 1e12,
                achieved / rate, "; ".join(filter(None, [note, error_note])), env)
        )  # fmt: skip
    return rows


def bench_layer(name, ni, nt, device, repeats, env, providers) -> list[Row]:
    """The full MSCMAT layer (4 scales) forward: fused op, einsum reference, and the published pairs approach."""
    layer, inputs, shape = layer_inputs(ni, nt, device)
    expected = layer_call("pairs", layer, inputs)() if "pairs" in providers else None
    rows = []
    for provider in providers:
        call = layer_call(provider, layer, inputs)
        scores = call()
        seconds = median_seconds(call, device, 1 if provider == "pairs" else repeats, warmup=0)
        error = None
        if expected is not None:
            error = max((s - e).abs().max().item() for s, e in zip(scores, expected))
        del scores
        peak = peak_extra_mib({"kind": "layer", "ni": ni, "nt": nt, "provider": provider}, device)
        rows.append(
            Row(name, provider, "forward", "torch.float32", shape, seconds * 1e3, peak, error, None, None,
                "error vs the pairs computation (sigmoid scores)" if error is not None else "", env)
        )  # fmt: skip
    layer.backend = "auto"
    return rows


def cases(device: torch.device, quick: bool):
    """(name, Ni, Nt, L, H, Dh, dtype, mode) of this device's cases."""
    if quick:
        return [("train B=32", 32, 32, 32, 12, 64, torch.float32, m) for m in ("forward", "forward+backward")]
    found = []
    # On a GPU bf16 first: the training dtype, and the rows that matter most when a time limit cuts the run.
    dtypes = [torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float16, torch.float32]
    for dtype in dtypes:
        for batch in (32, 64, 128) if device.type == "cpu" else (128, 1024, 4096):
            for mode in (
                ("forward", "forward+backward") if device.type == "cpu" else ("forward", "backward", "forward+backward")
            ):
                found.append((f"train B={batch}", batch, batch, 32, 12, 64, dtype, mode))
    for name, ni, nt in (("RSITMD test", 452, 2260), ("RSICD test", 1093, 5465)):
        for dtype in dtypes:
            found.append((name, ni, nt, 32, 12, 64, dtype, "forward"))
    return found


def markdown(rows: list[Row], rate: float, rate_dtype: str, env: dict) -> str:
    lines = [
        f"device: {env['device']} ({env['threads']} threads), torch {env['torch']}, triton {env['triton']}, "
        f"git {env['git_sha']}",
        f"measured dense {rate_dtype} matmul rate: {rate / 1e12:.3f} TFLOP/s",
        "",
        "| case | shape | dtype | mode | provider | median ms | vs reference | TFLOP/s | of matmul | peak extra MiB "
        "| max abs err | note |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    reference_ms = {}
    for row in rows:
        if row.provider in ("reference", "pairs") and row.median_ms is not None:
            reference_ms.setdefault((row.case, row.mode, row.dtype), {})[row.provider] = row.median_ms
    for row in rows:
        baselines = reference_ms.get((row.case, row.mode, row.dtype), {})
        baseline = baselines.get("pairs", baselines.get("reference"))
        speedup = f"{baseline / row.median_ms:.1f}x" if baseline and row.median_ms else ""

        def fmt(value, pattern):
            return "" if value is None else pattern.format(value)

        shape = " ".join(f"{k}={v}" for k, v in row.shape.items())
        lines.append(
            f"| {row.case} | {shape} | {row.dtype.replace('torch.', '')} | {row.mode} | {row.provider} "
            f"| {fmt(row.median_ms, '{:.2f}')} | {speedup} | {fmt(row.tflops, '{:.3f}')} "
            f"| {fmt(row.fraction_of_matmul, '{:.0%}')} | {fmt(row.peak_extra_mib, '{:.0f}')} "
            f"| {fmt(row.max_abs_error, '{:.1e}')} | {row.note} |"
        )
    lines.append("")
    lines.append("'vs reference': the einsum reference's time (the pairs computation's for the layer) / this row's.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only, as a smoke test")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out", help="folder for JSON and markdown")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per fused measurement (median)")
    parser.add_argument("--no-pairs", action="store_true", help="skip the published pairs computation (slow)")
    parser.add_argument("--peak-memory-of", help=argparse.SUPPRESS)  # internal: one measurement, in a child
    args = parser.parse_args(argv)
    if args.peak_memory_of:
        call = call_from_spec(json.loads(args.peak_memory_of), torch.device(args.device))
        with peak_memory(torch.device(args.device)) as peak:
            call()
        print("nan" if peak[0] is None else peak[0] / 2**20)
        return 0

    device = torch.device(args.device)
    env = environment(device)
    rate_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    print(f"measuring the dense {rate_dtype} matmul rate of {env['device']} ...", file=sys.stderr)
    rate = matmul_rate(device, rate_dtype)

    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda-" + env["device"].replace(" ", "_") if device.type == "cuda" else "cpu"
    stem = args.out / f"bench_mscmat_{tag}{'-quick' if args.quick else ''}"
    rows: list[Row] = []

    def save() -> str:
        # Rewritten after every case, so that a run cut short (a time limit on a lent GPU) keeps what it measured.
        table = markdown(rows, rate, str(rate_dtype).replace("torch.", ""), env)
        stem.with_suffix(".md").write_text(table + "\n")
        record = {"matmul_rate_flops": rate, "matmul_dtype": str(rate_dtype), "environment": env}
        record["rows"] = [asdict(row) for row in rows]
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        return table

    todo = cases(device, args.quick)
    for index, (name, ni, nt, length, heads, head_dim, dtype, mode) in enumerate(todo, 1):
        print(f"[{index}/{len(todo)}] {name} {mode} {dtype} ...", file=sys.stderr)
        rows += bench_op_case(name, ni, nt, length, heads, head_dim, dtype, mode, device, rate, args.repeats, env)
        save()
    fused = [name for name in op_providers(device) if not name.startswith("reference")]
    batch = 8 if args.quick else 64
    print(f"[layer] MSCMAT layer forward, B={batch} ...", file=sys.stderr)
    providers = [*fused, "reference", *([] if args.no_pairs else ["pairs"])]
    rows += bench_layer(f"MSCMAT layer B={batch}", batch, batch, device, args.repeats, env, providers)
    save()
    if not args.quick:
        # A whole test split scored through MSCMAT, all 4 scales: what the published code never does at test time.
        print("[layer] MSCMAT over RSICD's test split (1093 x 5465, 4 scales) ...", file=sys.stderr)
        rows += bench_layer("MSCMAT eval RSICD test", 1093, 5465, device, 1, env, fused)
    print(save())
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
