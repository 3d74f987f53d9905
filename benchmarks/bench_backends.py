"""Which GPU backend ``backend="auto"`` takes on this card: the Triton and CUDA kernels of mscmat_scores timed side
by side at the published head shape (L 32, H 12, Dh 64) over square batch sizes Ni = Nt, for inference (forward
without autograd) and training (forward + backward), in bf16 and fp32.

    python benchmarks/bench_backends.py --out DIR        # on a GPU: DIR/backend_choice.json (rows, table) and .md
    python benchmarks/bench_backends.py --install FILE   # anywhere: FILE's table into msa/ops/backend_choices.json

After a warm-up (which compiles and autotunes), the backends take turns round by round (the order rotates); a
sample is as many calls as take ~5 ms. Each row gives both medians, the ratio cuda / triton per round (median
[min-max]) and the faster backend by median. The files are rewritten after every row, so a run cut by a time
limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mscmat import environment, make_inputs, spread, synchronize  # noqa: E402

from msa.ops import backend_available, mscmat_scores  # noqa: E402
from msa.ops.backend_choice import CHOICES_FILE, GPU_BACKENDS, USES, load_choices  # noqa: E402

SIZES = {"bfloat16": (128, 512, 2048, 4096), "float32": (128, 512, 2048)}
SHAPE = {"length": 32, "heads": 12, "head_dim": 64}
SAMPLE_SECONDS = 5e-3


def work_of(size: int) -> int:
    return size * size * SHAPE["length"] * SHAPE["heads"] * SHAPE["head_dim"]


def make_call(backend: str, use: str, size: int, dtype: torch.dtype, device: torch.device):
    q, u, k, v = make_inputs(size, size, *SHAPE.values(), device, dtype, requires_grad=use == "training")
    grad = torch.randn(size, size, device=device, dtype=dtype)

    def call():
        if use == "inference":
            with torch.no_grad():
                mscmat_scores(q, u, k, v, backend=backend)
        else:
            torch.autograd.grad(mscmat_scores(q, u, k, v, backend=backend), (q, u, k, v), grad)

    return call


def seconds_per_call(call, calls: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def measure(
    dtype_name: str, use: str, size: int, repeats: int, device: torch.device, backends: tuple = GPU_BACKENDS
) -> dict:
    """One row: ``backends`` (two of them) timed side by side; ratio = the second's time / the first's, per round."""
    dtype = getattr(torch, dtype_name)
    calls = {backend: make_call(backend, use, size, dtype, device) for backend in backends}
    per_sample = {}
    for backend, call in calls.items():
        call(), call()  # compile, autotune, warm up
        per_sample[backend] = max(1, min(50, math.ceil(SAMPLE_SECONDS / seconds_per_call(call, 1, device))))
    times = {backend: [] for backend in calls}
    order = list(calls)
    for repeat in range(repeats):
        shift = repeat % len(order)
        for backend in order[shift:] + order[:shift]:
            times[backend].append(seconds_per_call(calls[backend], per_sample[backend], device))
    medians = {backend: statistics.median(t) * 1e3 for backend, t in times.items()}
    first, second = backends
    return {
        "dtype": dtype_name,
        "use": use,
        "size": size,
        "work": work_of(size),
        "median_ms": medians,
        "ratio": spread([b / a for a, b in zip(times[first], times[second])]),
        "faster": min(medians, key=medians.get),
    }


def choice_table(rows: list[dict], env: dict) -> dict:
    """{card: {"measured": ..., dtype: {use: [[work, faster], ...]}}} from the rows of one card."""
    entry = {"measured": f"git {env['git_sha']}, torch {env['torch']}, triton {env['triton']}, {env['date']}"}
    for row in sorted(rows, key=lambda r: r["work"]):
        entry.setdefault(row["dtype"], {}).setdefault(row["use"], []).append([row["work"], row["faster"]])
    return {env["device"]: entry}


def merge_into(choices_file: Path, table: dict) -> dict:
    """Merges ``table`` (one or more cards) into ``choices_file``: a card's measured dtypes and uses replace its old
    ones, everything else stays."""
    merged = load_choices(choices_file)
    for card, entry in table.items():
        old = merged.setdefault(card, {})
        old["measured"] = entry["measured"]
        for dtype, uses in entry.items():
            if dtype != "measured":
                old.setdefault(dtype, {}).update(uses)
    choices_file.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    load_choices(choices_file)  # what was written reads back as a valid table
    return merged


def markdown(rows: list[dict], env: dict) -> str:
    first, second = list(rows[0]["median_ms"]) if rows else GPU_BACKENDS
    lines = [
        f"{first} vs {second} on {env['device']}, torch {env['torch']}, triton {env['triton']}, git "
        f"{env['git_sha']}; L {SHAPE['length']}, H {SHAPE['heads']}, Dh {SHAPE['head_dim']}, no mask.",
        "",
        f"| dtype | use | Ni = Nt | {first} ms | {second} ms | {second} / {first}, per round | faster |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        low, median, high = r["ratio"]
        lines.append(
            f"| {r['dtype']} | {r['use']} | {r['size']} | {r['median_ms'][first]:.3f} | {r['median_ms'][second]:.3f} "
            f"| {median:.2f}x [{low:.2f}x-{high:.2f}x] | {r['faster']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output folder")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per row")
    parser.add_argument("--dtypes", default=",".join(SIZES), help="comma list of: " + ", ".join(SIZES))
    parser.add_argument("--install", type=Path, metavar="FILE", help="merge FILE's table into " + str(CHOICES_FILE))
    args = parser.parse_args(argv)
    if args.install is not None:
        if not args.install.is_file():
            parser.error(f"--install: {args.install} is not a file")
        try:
            table = json.loads(args.install.read_text())["table"]
        except (ValueError, KeyError) as error:
            parser.error(f"--install: {args.install} is not a backend_choice.json ({error})")
        merge_into(CHOICES_FILE, table)
        print(f"merged {', '.join(table)} into {CHOICES_FILE}")
        return 0
    dtypes = args.dtypes.split(",")
    if [d for d in dtypes if d not in SIZES]:
        parser.error(f"--dtypes must be among {list(SIZES)}")
    device = torch.device("cuda")
    if not torch.cuda.is_available() or not all(backend_available(b, device) for b in GPU_BACKENDS):
        parser.error("needs a CUDA device with both GPU backends (triton, cuda) available")
    env = environment(device) | {"date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dtype in dtypes:
        for use in USES:
            for size in SIZES[dtype]:
                rows.append(measure(dtype, use, size, args.repeats, device))
                print(markdown(rows[-1:], env).splitlines()[-1], flush=True)
                result = {"environment": env, "rows": rows, "table": choice_table(rows, env)}
                (args.out / "backend_choice.json").write_text(json.dumps(result, indent=1) + "\n")
                (args.out / "backend_choice.md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
