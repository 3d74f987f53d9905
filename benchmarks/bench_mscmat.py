"""Speed, memory and accuracy of ``msa.ops.mscmat_scores`` against its einsum reference, on this machine.

    python benchmarks/bench_mscmat.py                 # every case for this device
    python benchmarks/bench_mscmat.py --quick         # small shapes only (a smoke run)
    python benchmarks/bench_mscmat.py --out DIR       # where the JSON rows and the markdown table go
    python benchmarks/bench_mscmat.py --targets       # only the cases with a target (see TARGETS)
    python benchmarks/bench_mscmat.py --cases "B=128 forward+backward" RSICD   # cases whose "name mode" matches

Every figure that matters is a ratio measured side by side in this one run: the fused op against the reference,
and its achieved FLOP rate against this device's dense matmul rate measured here too (fp32 on a CPU, bf16 on a
GPU). FLOPs are counted as 4 * L * H * Dh per (image, text) pair forward (two dot products of length Dh per word
and head); backward as twice that.

Built for a shared, noisy machine: after a warm-up call, the providers of a case and the dense matmul take turns
(the order rotates every round), so that a load spike hits all of them; each ratio is computed per round and
reported as min / median / max over the rounds, with the load average at the start and end of the case. A speed-up
whose spread crosses 1.0 (or a matmul fraction whose spread crosses its target) is flagged "noisy": rerun it on a
quieter machine before quoting it.
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
from msa.ops import available_backends, empty_cache, mscmat_scores, mscmat_scores_ref

REPO = Path(__file__).resolve().parents[1]
# The unchunked reference is run only while its [Ni, Nt, H, L] temporaries fit in this budget.
REFERENCE_MEMORY_BUDGET = 6 * 2**30
# Cases with a target on a CPU: the fused op's speed-up over the reference under autograd, and its forward FLOP rate
# as a fraction of the dense fp32 matmul rate measured in the same rounds.
TARGETS = {
    ("train B=128", "forward+backward"): ("speedup", 2.0),
    ("RSITMD test", "forward"): ("of_matmul", 0.75),
    ("RSICD test", "forward"): ("of_matmul", 0.75),
}


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
    # Spread over the timed rounds: (min, median, max) of the time, of the speed-up over the reference measured in
    # the same round, and of the fraction of that round's matmul rate; the load average before and after.
    ms_spread: tuple | None = None
    speedup_spread: tuple | None = None
    of_matmul_spread: tuple | None = None
    load_average: tuple | None = None
    target: str = ""


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


def caption_mask(nt, length, device, seed=0) -> torch.Tensor:
    """[Nt, L] word mask of captions padded to L: 8 to 19 real tokens each (mean 13.5, ~58% padding at L = 32, as
    RSITMD's and RSICD's captions, 12-13 tokens with [CLS] and [SEP] on average, padded to the published 31)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(8, 20, (nt,), generator=generator)
    return (torch.arange(length)[None, :] < lengths[:, None]).to(device)


def reference_bytes(ni, nt, length, heads, dtype) -> int:
    # logits, readouts, softmax weights and their product are each [Ni, Nt, H, L].
    return 4 * ni * nt * heads * length * torch.finfo(dtype).bits // 8


def chunked_reference(q, u, k, v, budget: int = REFERENCE_MEMORY_BUDGET, word_mask=None) -> torch.Tensor:
    """The reference over image chunks, each within the memory budget (forward only)."""
    per_image = reference_bytes(1, k.shape[0], k.shape[1], k.shape[2], q.dtype)
    chunk = max(1, budget // max(per_image, 1))
    return torch.cat(
        [mscmat_scores_ref(q[i : i + chunk], u[i : i + chunk], k, v, word_mask) for i in range(0, q.shape[0], chunk)]
    )


def max_error_vs_float64(
    scores: torch.Tensor, q, u, k, v, rows: int | None = None, word_mask=None
) -> tuple[float, str]:
    """Max |scores - float64 reference| (on the first `rows` images when the whole matrix would be too slow)."""
    note = ""
    if rows is not None and rows < q.shape[0]:
        q, u, scores = q[:rows], u[:rows], scores[:rows]
        note = f"error on the first {rows} image rows"
    expected = chunked_reference(*(t.detach().double() for t in (q, u, k, v)), word_mask=word_mask)
    return (scores.detach().double() - expected).abs().max().item(), note


def op_providers(device: torch.device) -> list[str]:
    """Fused backends of this device (fastest first), then the reference (and on a GPU its compiled form)."""
    fused = [name for name in available_backends(device) if name != "reference"]
    if device.type == "cuda":
        return [*fused, "reference", "reference-compiled"]
    return [*fused, "reference"]


def run_provider(provider: str, q, u, k, v, mode: str, word_mask=None):
    if provider == "reference-compiled":
        fn = _compiled_reference()
    else:

        def fn(q, u, k, v, word_mask):
            return mscmat_scores(q, u, k, v, word_mask, backend=provider)

    if mode == "forward":
        with torch.no_grad():
            return fn(q, u, k, v, word_mask)
    scores = fn(q, u, k, v, word_mask)
    if mode == "forward+graph":
        return scores
    scores.backward(torch.ones_like(scores))
    return scores


_COMPILED = {}


def _compiled_reference():
    if "reference" not in _COMPILED:
        _COMPILED["reference"] = torch.compile(mscmat_scores_ref)
    return _COMPILED["reference"]


def op_call(provider: str, mode: str, q, u, k, v, chunked: bool, word_mask=None) -> Callable[[], torch.Tensor]:
    if chunked:

        def call():
            with torch.no_grad():
                return chunked_reference(q, u, k, v, word_mask=word_mask)

        return call

    if mode == "backward":
        scores = run_provider(provider, q, u, k, v, "forward+graph", word_mask)
        grad = torch.ones_like(scores)
        return lambda: torch.autograd.grad(scores, (q, u, k, v), grad, retain_graph=True) and scores

    def call():
        for tensor in (q, u, k, v):
            tensor.grad = None
        return run_provider(provider, q, u, k, v, mode, word_mask)

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
    word_mask = caption_mask(nt, length, device) if spec.get("captions") else None
    return op_call(spec["provider"], spec["mode"], q, u, k, v, spec["chunked"], word_mask)


def spread(values: list[float]) -> tuple[float, float, float] | None:
    return (min(values), statistics.median(values), max(values)) if values else None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def interleaved_seconds(calls: dict, device: torch.device, rounds: int, once: set) -> dict[str, list[float]]:
    """Per-round seconds of every call, the calls taking turns in an order that rotates each round; each is warmed
    up once first. Calls in `once` (too slow to repeat) are timed once, in the first round, without a warm-up."""
    names = list(calls)
    for name in names:
        if name not in once:
            calls[name]()
    synchronize(device)
    times = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if name in once and times[name]:
                continue
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def matmul_call(device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], object], float]:
    """A dense square matmul and its FLOP count: the rate every fused row is compared with, in the same rounds."""
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * size**3


def target_note(name: str, mode: str, row: Row) -> str:
    kind, goal = TARGETS.get((name, mode), (None, None))
    values = {"speedup": row.speedup_spread, "of_matmul": row.of_matmul_spread}.get(kind)
    if values is None:
        return ""
    low, median, high = values
    verdict = "met" if median >= goal else "missed"
    if low < goal <= high:
        verdict += ", noisy"
    return f"target {kind} >= {goal:g}: median {median:.2f} ({verdict})"


def bench_op_case(name, ni, nt, length, heads, head_dim, dtype, mode, device, rate_dtype, repeats, env) -> list[Row]:
    rows = []
    requires_grad = mode != "forward"
    q, u, k, v = make_inputs(ni, nt, length, heads, head_dim, device, dtype, requires_grad)
    captions = name.endswith("captions")
    word_mask = caption_mask(nt, length, device) if captions else None
    shape = {"Ni": ni, "Nt": nt, "L": length, "H": heads, "Dh": head_dim}
    if captions:
        shape["valid"] = f"{word_mask.float().mean().item():.0%}"
    # FLOPs of every word, padding included (the reference computes them all; the fused CPU kernel skips padding).
    flops = 4 * length * heads * head_dim * ni * nt * {"forward": 1, "backward": 2, "forward+backward": 3}[mode]
    error_rows = None if ni * nt <= 300_000 else 64
    calls, notes, once, chunked_providers = {}, {}, set(), set()
    for provider in op_providers(device):
        needs = reference_bytes(ni, nt, length, heads, dtype) * (2 if requires_grad else 1)
        chunked = provider.startswith("reference") and needs > REFERENCE_MEMORY_BUDGET
        if chunked and (requires_grad or provider == "reference-compiled"):
            note = f"needs {needs / 2**30:.1f} GB for its [Ni, Nt, H, L] temporaries: not run"
            rows.append(Row(name, provider, mode, str(dtype), shape, None, None, None, None, None, note, env))
            continue
        notes[provider] = [f"chunked over images (unchunked it needs {needs / 2**30:.1f} GB)"] if chunked else []
        calls[provider] = op_call(provider, mode, q, u, k, v, chunked, word_mask)
        if provider.startswith("reference") and ni * nt > 300_000:
            once.add(provider)  # minutes per call at test-split sizes: one timed call
            notes[provider].append("one timed call")
        if chunked:
            chunked_providers.add(provider)
    matmul, matmul_flops = matmul_call(device, rate_dtype)
    loads = [load_average()]
    times = interleaved_seconds({**calls, "matmul": matmul}, device, repeats, once)
    loads.append(load_average())
    rates = [matmul_flops / seconds for seconds in times["matmul"]]
    reference = next((p for p in ("reference",) if p in calls and p not in once), None)
    for provider, call in calls.items():
        scores = call()
        error, error_note = max_error_vs_float64(scores, q, u, k, v, error_rows, word_mask)
        del scores
        spec = {"kind": "op", "shape": [ni, nt, length, heads, head_dim], "dtype": str(dtype), "mode": mode}
        spec["captions"] = captions
        peak = peak_extra_mib({**spec, "provider": provider, "chunked": provider in chunked_providers}, device)
        seconds = times[provider]
        median = statistics.median(seconds)
        row = Row(name, provider, mode, str(dtype), shape, median * 1e3, peak, error, flops / median / 1e12,
                  flops / median / statistics.median(rates), "; ".join(filter(None, [*notes[provider], error_note])),
                  env, ms_spread=spread([t * 1e3 for t in seconds]), load_average=tuple(loads))  # fmt: skip
        if provider not in once:
            row.of_matmul_spread = spread([flops / t / r for t, r in zip(seconds, rates)])
            if reference is not None and provider != reference:
                row.speedup_spread = spread([r / t for r, t in zip(times[reference], seconds)])
        row.target = target_note(name, mode, row) if not provider.startswith("reference") else ""
        rows.append(row)
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
    if device.type == "cpu":  # real captions: most of the 32 positions are padding
        found.append(("train B=128 captions", 128, 128, 32, 12, 64, torch.float32, "forward+backward"))
    for name, ni, nt in (("RSITMD test", 452, 2260), ("RSICD test", 1093, 5465)):
        for dtype in dtypes:
            found.append((name, ni, nt, 32, 12, 64, dtype, "forward"))
    return found


def _range(values, pattern: str) -> str:
    if values is None:
        return ""
    low, median, high = (pattern.format(x) for x in values)
    return f"{median} [{low}–{high}]"


def markdown(rows: list[Row], rate: float, rate_dtype: str, env: dict) -> str:
    lines = [
        f"device: {env['device']} ({env['threads']} threads), torch {env['torch']}, triton {env['triton']}, "
        f"git {env['git_sha']}",
        f"dense {rate_dtype} matmul rate at the start: {rate / 1e12:.3f} TFLOP/s (each row uses the rate measured in "
        "its own rounds)",
        "",
        "| case | shape | dtype | mode | provider | ms: median [min–max] | vs reference | TFLOP/s | of matmul "
        "| peak extra MiB | max abs err | load avg | target | note |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    pairs_ms = {}
    for row in rows:
        if row.provider == "pairs" and row.median_ms is not None:
            pairs_ms[(row.case, row.mode, row.dtype)] = row.median_ms
    for row in rows:

        def fmt(value, pattern):
            return "" if value is None else pattern.format(value)

        speedup = _range(row.speedup_spread, "{:.2f}x")
        baseline = pairs_ms.get((row.case, row.mode, row.dtype))
        if not speedup and baseline and row.median_ms and row.provider != "pairs":
            speedup = f"{baseline / row.median_ms:.1f}x (vs pairs)"
        if row.speedup_spread and row.speedup_spread[0] < 1.0 <= row.speedup_spread[2]:
            speedup += " noisy"
        of_matmul = _range(row.of_matmul_spread, "{:.0%}") or fmt(row.fraction_of_matmul, "{:.0%}")
        time_ms = _range(row.ms_spread, "{:.2f}") or fmt(row.median_ms, "{:.2f}")
        load = "–".join(f"{x:.1f}" for x in row.load_average) if row.load_average else ""
        shape = " ".join(f"{k}={v}" for k, v in row.shape.items())
        lines.append(
            f"| {row.case} | {shape} | {row.dtype.replace('torch.', '')} | {row.mode} | {row.provider} "
            f"| {time_ms} | {speedup} | {fmt(row.tflops, '{:.3f}')} | {of_matmul} "
            f"| {fmt(row.peak_extra_mib, '{:.0f}')} | {fmt(row.max_abs_error, '{:.1e}')} | {load} | {row.target} "
            f"| {row.note} |"
        )
    lines.append("")
    lines.append(
        "'vs reference': the einsum reference's time / this row's, per round (median [min–max]); 'noisy': the spread "
        "crosses 1.0. 'of matmul': this row's FLOP rate / the dense matmul's in the same round. 'load avg': the "
        "1-minute load average before and after the case."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only, as a smoke test")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out", help="folder for JSON and markdown")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per case (providers take turns)")
    parser.add_argument("--cases", nargs="+", metavar="TEXT", help='only cases whose "name mode" contains a TEXT')
    parser.add_argument("--targets", action="store_true", help="only the cases with a target (and no layer runs)")
    parser.add_argument("--no-pairs", action="store_true", help="skip the published pairs computation (slow)")
    parser.add_argument("--peak-memory-of", help=argparse.SUPPRESS)  # internal: one measurement, in a child
    args = parser.parse_args(argv)
    if args.peak_memory_of:
        spec = json.loads(args.peak_memory_of)
        call = call_from_spec(spec, torch.device(args.device))
        if not spec.get("chunked") and spec.get("provider") != "pairs":
            call()  # the first call also pays one-time allocations (BLAS buffers, thread pools): not the op's
            empty_cache()  # but the blocks the CPU kernel holds for reuse are: the measured call allocates them again
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
    suffix = "-quick" if args.quick else "-targets" if args.targets else "-cases" if args.cases else ""
    stem = args.out / f"bench_mscmat_{tag}{suffix}"
    rows: list[Row] = []

    def save() -> str:
        # Rewritten after every case, so that a run cut short (a time limit on a GPU machine) keeps what it measured.
        table = markdown(rows, rate, str(rate_dtype).replace("torch.", ""), env)
        stem.with_suffix(".md").write_text(table + "\n")
        record = {"matmul_rate_flops": rate, "matmul_dtype": str(rate_dtype), "environment": env}
        record["rows"] = [asdict(row) for row in rows]
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        return table

    todo = cases(device, args.quick)
    if args.targets:
        todo = [case for case in todo if (case[0], case[-1]) in TARGETS and case[-2] == torch.float32]
    if args.cases:
        todo = [case for case in todo if any(text in f"{case[0]} {case[-1]}" for text in args.cases)]
        if not todo:
            parser.error(f"--cases {' '.join(args.cases)} matches no case of this device")
    for index, (name, ni, nt, length, heads, head_dim, dtype, mode) in enumerate(todo, 1):
        print(f"[{index}/{len(todo)}] {name} {mode} {dtype} (load {load_average()}) ...", file=sys.stderr)
        rows += bench_op_case(name, ni, nt, length, heads, head_dim, dtype, mode, device, rate_dtype, args.repeats, env)
        save()
    if args.targets or args.cases:
        print(save())
        print(f"wrote {stem}.json and .md", file=sys.stderr)
        return 0
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
