"""``msa-data``: dataset utilities.

- ``msa-data stats --dataset rsicd --data-root DIR``: images and captions per split (after the val carve-out).
- ``msa-data leakage --dataset rsicd --data-root A --other-dataset rsitmd --other-data-root B``: images with identical
  content (SHA-256 of the file) in two datasets' splits, e.g. RSICD train vs RSITMD test; without ``--other-*`` the
  splits of one dataset are compared with each other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from msa.data import carve_val, find_shared_images, load_annotations


def _dataset_args(parser: argparse.ArgumentParser, prefix: str = "", required: bool = True) -> None:
    label = "the other dataset's " if prefix else ""
    parser.add_argument(
        f"--{prefix}dataset", required=required, help=f"{label}name: rsicd, rsitmd, ucm, sydney, nwpu, karpathy, csv"
    )
    parser.add_argument(f"--{prefix}data-root", help=f"{label}folder as distributed")
    parser.add_argument(f"--{prefix}annotations", help=f"{label}annotation file (JSON or CSV)")
    parser.add_argument(f"--{prefix}image-root", help=f"{label}image folder")


def _load(args: argparse.Namespace, prefix: str = ""):
    key = prefix.replace("-", "_")
    return load_annotations(
        getattr(args, f"{key}dataset"),
        getattr(args, f"{key}data_root"),
        annotations=getattr(args, f"{key}annotations"),
        image_root=getattr(args, f"{key}image_root"),
        skip_bad=args.skip_bad,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msa-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="images and captions per split")
    _dataset_args(stats)
    stats.add_argument("--val-fraction", type=float, default=0.0, help="carve val out of train if there is none")
    stats.add_argument("--val-seed", type=int, default=0, help="seed of the carve-out")
    stats.add_argument("--skip-bad", action="store_true", help="skip and count empty captions")
    leakage = commands.add_parser("leakage", help="images shared between splits, by file hash")
    _dataset_args(leakage)
    _dataset_args(leakage, "other-", required=False)
    leakage.add_argument("--splits", nargs="+", help="splits of the first dataset to compare (default all)")
    leakage.add_argument("--other-splits", nargs="+", help="splits of the other dataset (default all)")
    leakage.add_argument("--skip-bad", action="store_true", help="skip and count empty captions")
    leakage.add_argument("--list", action="store_true", help="list every shared file pair")
    leakage.add_argument("--output-json", help="write the report here")
    leakage.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "stats":
        annotations = _load(args)
        if args.val_fraction > 0:
            annotations = carve_val(annotations, args.val_fraction, args.val_seed)
        print(f"| {annotations.name} split | images | captions |\n|---|---:|---:|")
        for split, (images, captions) in annotations.counts().items():
            print(f"| {split} | {images} | {captions} |")
        if annotations.skipped:
            print(f"skipped: {annotations.skipped}")
        return 0
    first = _load(args)
    other = _load(args, "other-") if args.other_dataset else None
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm
    report = find_shared_images(first, other, args.splits, args.other_splits, progress=progress)
    print(report.to_markdown())
    if report.missing:
        print(f"{len(report.missing)} image file(s) listed but missing, not hashed (first: {report.missing[0]})")
    if args.list:
        for (split_a, split_b), pairs in sorted(report.shared.items()):
            for file_a, file_b, digest in pairs:
                print(f"{split_a}\t{file_a}\t{split_b}\t{file_b}\t{digest}")
    if args.output_json:
        record = {
            "dataset_a": report.dataset_a,
            "dataset_b": report.dataset_b,
            "counts": [{"split_a": a, "split_b": b, "shared": n} for (a, b), n in sorted(report.counts.items())],
            "shared": [
                {"split_a": a, "split_b": b, "file_a": fa, "file_b": fb, "sha256": h}
                for (a, b), pairs in sorted(report.shared.items())
                for fa, fb, h in pairs
            ],
            "missing": report.missing,
        }
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
