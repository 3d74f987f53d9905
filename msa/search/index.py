"""Build and update an archive index: ``msa-index build --model M --images DIR --out INDEX_DIR``.

Every image under DIR (recursively; jpg, jpeg, png, tif, tiff, bmp, webp in any case) is decoded and resized as
training does and encoded once by the model's image encoder; the index keeps the global embeddings and the pooled
scale features in float16 (see :mod:`msa.search.storage` for the format). ``update`` re-encodes only new and
changed files (size or mtime differ) and drops deleted ones. Files that cannot be read are listed in
``INDEX_DIR/skipped.txt`` with the reason.

Scale out with ``torchrun --nproc-per-node N -m msa.search.index build ...``: each rank encodes every N-th file,
rank 0 merges the shards into the same index a single process writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msa.search.models import load_model, model_fingerprint, model_spec
from msa.search.storage import (
    EMBEDDINGS_NAME,
    MANIFEST_NAME,
    METADATA_NAME,
    STORAGE_DTYPE,
    VECTORS_NAME,
    FileRecord,
    IndexFormatError,
    ModelMismatchError,
    SearchIndexError,
    commit_generation,
    index_lock,
    new_generation,
    open_matrix,
    read_manifest,
    read_metadata,
    remove_stale_generations,
    scale_name,
    sha256_file,
    write_metadata,
)
from msa.search.vectors import VECTOR_KINDS, resolve_kind, train_vector_index, write_vector_index

logger = logging.getLogger("msa.search.index")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_COPY_ROWS = 8192


@dataclass
class IndexReport:
    """What a build or update did: ``indexed`` rows in the index now, ``encoded`` this run, ``reused`` unchanged
    rows kept from the previous index, ``removed`` rows of deleted or changed files, ``skipped`` (path, reason)
    pairs, and the seconds spent in all and in encoding."""

    indexed: int = 0
    encoded: int = 0
    reused: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    encode_seconds: float = 0.0


@dataclass
class IndexOptions:
    """How to encode: ``device``, ``batch_size``, ``num_workers`` (image-loading processes), the vector index
    ``kind`` (see :data:`msa.search.vectors.VECTOR_KINDS`) and its ``nlist``, ``wait`` for the lock instead of
    refusing, and ``progress`` (an iterable wrapper such as ``tqdm``)."""

    device: str = "cpu"
    batch_size: int = 64
    num_workers: int = 0
    vector_index: str = "auto"
    nlist: int | None = None
    wait: bool = False
    progress: Callable | None = None


# ------------------------------------------------------------------------------------------------- walking
def walk_images(root: Path, exclude: Path | None = None) -> list[FileRecord]:
    """Image files under ``root`` (recursively, symlinked folders not followed), sorted by relative path; the
    SHA-256 is left empty (computed when the file is read). ``exclude``: a folder to leave out (the index itself
    when it lies inside ``root``)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        if exclude is not None:
            subfolders[:] = [d for d in subfolders if (Path(folder) / d).resolve() != exclude]
        for name in files:
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:
                continue  # vanished or a dangling link: nothing to index
            found.append(FileRecord(path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns, ""))
    return sorted(found, key=lambda record: record.path)


# ------------------------------------------------------------------------------------------------ encoding
class _ArchiveImages(torch.utils.data.Dataset):
    """Decodes one file per item: ``(record with its SHA-256, pixels)`` or ``(record, reason)`` when unreadable."""

    def __init__(self, root: Path, records: list[FileRecord], transform: Callable) -> None:
        self.root = root
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[FileRecord, torch.Tensor | str]:
        from msa.data import load_image

        record = self.records[index]
        path = self.root / record.path
        try:
            if record.size == 0:
                return record, "empty file"
            digest = sha256_file(path)
            pixels = self.transform(load_image(path))
        except Exception as error:  # noqa: BLE001  (any decoder failure is a skipped file, never a crash)
            return record, f"{type(error).__name__}: {error}".replace("\n", " ").replace("\t", " ")
        return FileRecord(record.path, record.size, record.mtime_ns, digest), pixels


def _keep_batch(items: list[tuple[FileRecord, torch.Tensor | str]]) -> list[tuple[FileRecord, torch.Tensor | str]]:
    return items


class _MatrixWriter:
    """Appends float16 rows to the matrices of one part (global embeddings and each scale)."""

    def __init__(self, folder: Path, num_scales: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        names = [EMBEDDINGS_NAME] + [scale_name(s) for s in range(num_scales)]
        self.handles = [open(folder / name, "wb") for name in names]

    def write(self, matrices: list[np.ndarray]) -> None:
        for handle, matrix in zip(self.handles, matrices):
            handle.write(np.ascontiguousarray(matrix, dtype=STORAGE_DTYPE).tobytes())

    def close(self) -> None:
        for handle in self.handles:
            handle.close()


@torch.no_grad()
def encode_part(
    model: Any, root: Path, records: list[FileRecord], folder: Path, options: IndexOptions, desc: str = "encode"
) -> tuple[list[FileRecord], list[tuple[str, str]]]:
    """Encode ``records`` into float16 matrices under ``folder``; write ``folder/records.json``.

    Returns:
        ``(encoded records in row order, skipped (path, reason) pairs)``.
    """
    device = torch.device(options.device)
    loader = torch.utils.data.DataLoader(
        _ArchiveImages(root, records, model.image_transform(train=False)),
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        collate_fn=_keep_batch,
    )
    writer = _MatrixWriter(folder, len(model.config.pooling))
    encoded: list[FileRecord] = []
    skipped: list[tuple[str, str]] = []
    bar = options.progress(total=len(records), desc=desc, unit="img") if options.progress else None
    try:
        for batch in loader:
            good = [(record, pixels) for record, pixels in batch if isinstance(pixels, torch.Tensor)]
            skipped += [(record.path, reason) for record, reason in batch if isinstance(reason, str)]
            if good:
                features = model.encode_image(torch.stack([pixels for _, pixels in good]).to(device))
                matrices = [features.embeds] + list(features.scale_features)
                writer.write([m.float().cpu().numpy() for m in matrices])
                encoded += [record for record, _ in good]
            if bar is not None:
                bar.update(len(batch))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    (folder / "records.json").write_text(json.dumps({"encoded": encoded, "skipped": skipped}, default=_as_list))
    return encoded, skipped


def _as_list(record: FileRecord) -> list:
    return [record.path, record.size, record.mtime_ns, record.sha256]


def read_part(folder: Path) -> tuple[list[FileRecord], list[tuple[str, str]]]:
    values = json.loads((folder / "records.json").read_text())
    return [FileRecord(*r) for r in values["encoded"]], [tuple(s) for s in values["skipped"]]


# ------------------------------------------------------------------------------------------------ assembling
def assemble(
    generation: Path, rows: list[tuple[FileRecord, str, int]], sources: dict[str, list[np.ndarray]]
) -> list[FileRecord]:
    """Write the generation's matrices and metadata from ``rows`` = (record, source name, row in the source),
    sorted by path; ``sources`` maps a name to its matrices (embeddings, then each scale)."""
    rows = sorted(rows, key=lambda item: item[0].path)
    matrix_count = len(next(iter(sources.values()))) if sources else 1
    names = [EMBEDDINGS_NAME] + [scale_name(s) for s in range(matrix_count - 1)]
    handles = [open(generation / name, "wb") for name in names]
    try:
        for start in range(0, len(rows), _COPY_ROWS):
            chunk = rows[start : start + _COPY_ROWS]
            picks = {}  # source -> (positions in the chunk, rows in the source)
            for position, (_, source, row) in enumerate(chunk):
                positions, source_rows = picks.setdefault(source, ([], []))
                positions.append(position)
                source_rows.append(row)
            for matrix_index, handle in enumerate(handles):
                width = next(iter(sources.values()))[matrix_index].shape[1]
                block = np.empty((len(chunk), width), dtype=STORAGE_DTYPE)
                for source, (positions, source_rows) in picks.items():
                    block[positions] = sources[source][matrix_index][source_rows]
                handle.write(block.tobytes())
    finally:
        for handle in handles:
            handle.close()
    records = [record for record, _, _ in rows]
    write_metadata(generation / METADATA_NAME, records)
    return records


def _part_matrices(folder: Path, count: int, widths: list[int]) -> list[np.ndarray]:
    names = [EMBEDDINGS_NAME] + [scale_name(s) for s in range(len(widths) - 1)]
    if count == 0:
        return [np.zeros((0, w), dtype=STORAGE_DTYPE) for w in widths]
    return [
        np.memmap(folder / name, dtype=STORAGE_DTYPE, mode="r", shape=(count, width))
        for name, width in zip(names, widths)
    ]


# ------------------------------------------------------------------------------------------------ running
@dataclass
class _Plan:
    """What rank 0 decided: the new generation folder, the files to encode, the rows kept from the previous index."""

    generation: Path
    images_root: Path
    to_encode: list[FileRecord]
    kept: list[tuple[FileRecord, int]]
    removed: int


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the value itself without a process group)."""
    import torch.distributed as dist

    if _world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    import torch.distributed as dist

    if _world()[1] > 1:
        dist.barrier()


def _check_build_target(out: Path) -> None:
    """A build writes into a new folder, an empty one, or an existing index (which it replaces)."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise IndexFormatError(f"--out {out} is a file, not a folder")
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        try:
            values = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            values = None
        if not isinstance(values, dict) or values.get("format") != "msa-index":
            raise IndexFormatError(
                f"--out {out} holds a {MANIFEST_NAME} that is not an msa index's; choose another folder"
            )
        return
    ours = {".lock", "skipped.txt"}
    foreign = [p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(("gen-", "."))]
    if foreign:
        raise IndexFormatError(
            f"--out {out} is not empty and holds no index (found {sorted(foreign)[:3]}); choose a new or empty folder"
        )


def _prepare(mode: str, model: Any, spec: str, images: Path | None, out: Path) -> tuple[_Plan, dict[str, Any]]:
    """Rank 0, under the lock: check the target, walk the images, decide what to encode, open a new generation."""
    remove_stale_generations(out)
    fingerprint = model_fingerprint(model)
    kept: list[tuple[FileRecord, int]] = []
    previous: list[FileRecord] = []
    if mode == "update":
        manifest = read_manifest(out)
        if manifest.fingerprint != fingerprint:
            raise ModelMismatchError(
                f"--model: {out} was built with model {manifest.values['model']['spec']}, not with {spec}; "
                "update with the index's model, or rebuild with `msa-index build`"
            )
        recorded = manifest.images_root
        if images is not None and images.resolve() != recorded:
            raise IndexFormatError(
                f"--images {images}: {out} indexes {recorded}, another folder; build a separate index for it"
            )
        images = recorded
        previous = read_metadata(manifest.generation_dir / METADATA_NAME)
    if images is None or not images.is_dir():
        raise IndexFormatError(f"--images {images}: not a folder")
    images = images.resolve()
    current = walk_images(images, exclude=out.resolve())
    old_by_path = {record.path: row for row, record in enumerate(previous)}
    to_encode = []
    for record in current:
        row = old_by_path.get(record.path)
        old = previous[row] if row is not None else None
        if old is not None and (old.size, old.mtime_ns) == (record.size, record.mtime_ns):
            kept.append((old, row))
        else:
            to_encode.append(record)
    plan = _Plan(new_generation(out), images, to_encode, kept, len(previous) - len(kept))
    values = {
        "images_root": str(images),
        "model": {"spec": spec, "fingerprint": fingerprint, "config": model.config.to_dict()},
        "embed_dim": model.config.embed_dim,
        "scale_channels": list(model.image_encoder.scale_channels),
        "dtype": "float16",
    }
    return plan, values


def _finish(plan: _Plan, values: dict[str, Any], out: Path, world: int, options: IndexOptions) -> IndexReport:
    """Rank 0: merge the kept rows and every rank's part into the generation, train the vector index, commit."""
    widths = [values["embed_dim"], *values["scale_channels"]]
    sources: dict[str, list[np.ndarray]] = {}
    rows: list[tuple[FileRecord, str, int]] = []
    if plan.kept:
        old = read_manifest(out)
        sources["previous"] = [open_matrix(old, EMBEDDINGS_NAME)] + [
            open_matrix(old, scale_name(s)) for s in range(len(widths) - 1)
        ]
        rows += [(record, "previous", row) for record, row in plan.kept]
    skipped: list[tuple[str, str]] = []
    parts = plan.generation / "parts"
    for rank in range(world):
        encoded, part_skipped = read_part(parts / f"part-{rank}")
        sources[f"part-{rank}"] = _part_matrices(parts / f"part-{rank}", len(encoded), widths)
        rows += [(record, f"part-{rank}", row) for row, record in enumerate(encoded)]
        skipped += part_skipped
    if not sources:
        sources["empty"] = [np.zeros((0, w), dtype=STORAGE_DTYPE) for w in widths]
    records = assemble(plan.generation, rows, sources)
    shutil.rmtree(parts)
    kind = resolve_kind(options.vector_index, len(records))
    vector_index: dict[str, Any] = {"kind": "flat"}
    if kind != "flat" and records:
        embeddings = np.memmap(
            plan.generation / EMBEDDINGS_NAME, dtype=STORAGE_DTYPE, mode="r", shape=(len(records), widths[0])
        )
        index, vector_index = train_vector_index(embeddings, kind, options.nlist)
        write_vector_index(index, plan.generation / VECTORS_NAME)
    skipped.sort()
    values = {
        **values,
        "num_images": len(records),
        "num_skipped": len(skipped),
        "vector_index": vector_index,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    commit_generation(out, plan.generation, values, skipped)
    return IndexReport(indexed=len(records), reused=len(plan.kept), removed=plan.removed, skipped=skipped)


def run_indexing(
    mode: str, model: Any, spec: str, images: Path | None, out: Path, options: IndexOptions
) -> IndexReport:
    """Build (``mode="build"``) or update an index, on one process or on every rank of a process group."""
    from contextlib import ExitStack

    rank, world = _world()
    start = time.perf_counter()
    with ExitStack() as stack:
        shared: Any = None
        if rank == 0:
            try:
                if mode == "build":
                    _check_build_target(out)
                stack.enter_context(index_lock(out, options.wait))
                shared = _prepare(mode, model, spec, images, out)
            except Exception as error:
                _share(f"rank 0 failed: {error}")
                raise
        shared = _share(shared)
        if isinstance(shared, str):
            raise SearchIndexError(shared)
        plan, values = shared
        encode_start = time.perf_counter()
        encoded, _ = encode_part(
            model,
            plan.images_root,
            plan.to_encode[rank::world],
            plan.generation / "parts" / f"part-{rank}",
            options,
            desc="encode" if world == 1 else f"encode (rank {rank})",
        )
        encode_seconds = time.perf_counter() - encode_start
        _barrier()
        report = IndexReport(encoded=len(encoded))
        if rank == 0:
            report = _finish(plan, values, out, world, options)
            report.encoded = len(plan.to_encode) - len(report.skipped)
        report.encode_seconds = encode_seconds
        report.seconds = time.perf_counter() - start
        return report


def build_index(
    model: str | Any, images: str | Path, out: str | Path, options: IndexOptions | None = None
) -> IndexReport:
    """Index every image under ``images`` into ``out`` (a new, empty or existing index folder).

    Args:
        model: a checkpoint folder, a named config, or an :class:`msa.model.MSAModel` (recorded by its config name).
        images: the image folder (walked recursively).
        out: the index folder.
        options: :class:`IndexOptions`.

    Raises:
        SearchIndexError: ``out`` is not an index and not empty, or another process is writing it.
    """
    options = options or IndexOptions()
    model, spec = _resolve_model(model, options.device)
    return run_indexing("build", model, spec, Path(images), Path(out), options)


def update_index(
    index_dir: str | Path,
    images: str | Path | None = None,
    model: str | Any = None,
    options: IndexOptions | None = None,
) -> IndexReport:
    """Bring an index up to date with its image folder: encode new and changed files, drop deleted ones.

    Raises:
        SearchIndexError: no index, another image folder or model than the index's, or the index is locked.
    """
    options = options or IndexOptions()
    if model is None:
        model = read_manifest(index_dir).values["model"]["spec"]
    model, spec = _resolve_model(model, options.device)
    return run_indexing("update", model, spec, Path(images) if images else None, Path(index_dir), options)


def _resolve_model(model: str | Any, device: str) -> tuple[Any, str]:
    if isinstance(model, (str, Path)):
        return load_model(str(model), device), model_spec(str(model))
    return model.to(device).eval(), getattr(model, "name_or_path", "in-memory model")


# ------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msa-index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="index every image of a folder")
    build.add_argument("--model", required=True, help="checkpoint folder (save_pretrained) or named config")
    build.add_argument("--images", required=True, help="image folder (walked recursively)")
    build.add_argument("--out", required=True, help="index folder (new, empty, or an index to replace)")
    update = commands.add_parser("update", help="encode new and changed images, drop deleted ones")
    update.add_argument("--index", "--out", dest="out", required=True, help="index folder")
    update.add_argument("--images", help="image folder (default: the one the index was built from)")
    update.add_argument("--model", help="checkpoint folder or named config (default: the index's)")
    for sub in (build, update):
        add = sub.add_argument
        add("--device", default="cpu", help="cpu, cuda, cuda:1 ... (under torchrun, cuda means cuda:LOCAL_RANK)")
        add("--batch-size", type=int, default=64, help="images per encoder batch (default 64)")
        add("--num-workers", type=int, default=0, help="image-decoding worker processes (default 0)")
        add(
            "--vector-index",
            choices=VECTOR_KINDS,
            default="auto",
            help="global search structure: flat (exact), ivf, ivfpq; auto: ivfpq from 200k images",
        )
        add("--nlist", type=int, help="IVF lists (default about 4 sqrt(N))")
        add("--wait", action="store_true", help="wait for another build/update of the index instead of refusing")
        add("--no-progress", action="store_true", help="no progress bar")
        add("--debug", action="store_true", help="show tracebacks")
    return parser


def _options(args: argparse.Namespace, rank: int) -> IndexOptions:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if args.nlist is not None and args.nlist < 1:
        raise ValueError(f"--nlist must be positive, got {args.nlist}")
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    progress = None
    if not args.no_progress:
        from functools import partial

        from tqdm.auto import tqdm

        # disable=None: no bar (and no carriage returns) when stderr is not a terminal.
        progress = partial(tqdm, disable=None, mininterval=1.0, position=rank)
    return IndexOptions(device, args.batch_size, args.num_workers, args.vector_index, args.nlist, args.wait, progress)


def _start_process_group() -> bool:
    """Join the torchrun process group when launched by torchrun with several processes."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    from datetime import timedelta

    # gloo: only small objects and barriers cross processes; a long timeout because ranks wait for the slowest shard.
    dist.init_process_group("gloo", timeout=timedelta(hours=12))
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    started = _start_process_group()
    try:
        rank = _world()[0]
        options = _options(args, rank)
        if args.command == "build":
            report = build_index(args.model, args.images, args.out, options)
        else:
            report = update_index(args.out, args.images, args.model, options)
    except (SearchIndexError, ValueError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"msa-index: {error}", file=sys.stderr)
        return 2
    finally:
        if started:
            from msa.distributed import destroy_distributed

            destroy_distributed()
    if rank == 0:
        print(
            f"{args.out}: {report.indexed} images indexed ({report.encoded} encoded, {report.reused} unchanged, "
            f"{report.removed} removed), {len(report.skipped)} skipped"
            + (f" (listed in {Path(args.out) / 'skipped.txt'})" if report.skipped else "")
            + f", {report.seconds:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
