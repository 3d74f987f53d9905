"""``msa-data``: dataset utilities.

- ``msa-data stats --dataset rsicd --data-root DIR``: images and captions per split, after the val carve-out that
  training applies to a dataset without val (``--val-fraction``, default 0.1; 0 turns it off).
- ``msa-data leakage --dataset rsicd --data-root A --other-dataset rsitmd --other-data-root B``: images with identical
  content (SHA-256 of the file) in two datasets' splits, e.g. RSICD train vs RSITMD test; without ``--other-*`` the
  splits of one dataset are compared with each other. Images repeated within a split are reported too.
- ``msa-data check --dataset rsicd --data-root DIR [--decode]``: every image file of the dataset read (its header, or
  with ``--decode`` the whole image); lists each unreadable file with the reason and exits with status 1 if any.

A mistake in the input (a missing or malformed file, an unknown split) prints one line and exits with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from pathlib import Path

from msa.data import (
    DEFAULT_VAL_FRACTION,
    AnnotationError,
    Annotations,
    ImageLoadError,
    carve_val,
    find_bad_images,
    find_shared_images,
    load_annotations,
)

# What a user's input can get wrong; anything else is a bug and keeps its traceback.
USER_ERRORS = (AnnotationError, ImageLoadError, OSError, ValueError, KeyError)


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


def _check_splits(annotations: Annotations, splits: list[str] | None, flag: str) -> None:
    unknown = sorted(set(splits or ()) - set(annotations.split_names()))
    if unknown:
        present = annotations.split_names()
        raise ValueError(f"{flag}: no split {unknown} in {annotations.source}; splits present: {present}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msa-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--skip-bad", action="store_true", help="skip and count empty captions")
    common.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", parents=[common], help="images and captions per split")
    _dataset_args(stats)
    stats.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="train share carved out as val when there is none, as in training (0: no carve-out)",
    )
    stats.add_argument("--val-seed", type=int, default=0, help="seed of the carve-out")
    check = commands.add_parser("check", parents=[common], help="find unreadable images (exit status 1 if any)")
    _dataset_args(check)
    check.add_argument("--splits", nargs="+", help="splits to check (default all)")
    check.add_argument("--decode", action="store_true", help="decode every image fully (slow; default: headers only)")
    check.add_argument("--no-progress", action="store_true", help="no progress bars")
    leakage = commands.add_parser("leakage", parents=[common], help="images shared between splits, by file hash")
    _dataset_args(leakage)
    _dataset_args(leakage, "other-", required=False)
    leakage.add_argument("--splits", nargs="+", help="splits of the first dataset to compare (default all)")
    leakage.add_argument("--other-splits", nargs="+", help="splits of the other dataset (default all)")
    leakage.add_argument("--list", action="store_true", help="list every shared file pair and repeated image")
    leakage.add_argument("--output-json", help="write the report here")
    leakage.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _stats(args: argparse.Namespace) -> None:
    annotations = _load(args)
    carved = args.val_fraction > 0 and "val" not in annotations.split_names()
    if carved:
        try:
            annotations = carve_val(annotations, args.val_fraction, args.val_seed)
        except ValueError as error:
            raise ValueError(f"{error} (--val-fraction {args.val_fraction}; 0 for no carve-out)") from error
    print(f"| {annotations.name} split | images | captions |\n|---|---:|---:|")
    for split, (images, captions) in annotations.counts().items():
        print(f"| {split} | {images} | {captions} |")
    if carved:
        print(f"val carved out of train (--val-fraction {args.val_fraction}, --val-seed {args.val_seed})")
    if annotations.skipped:
        print(f"skipped: {annotations.skipped}")


def _progress(args: argparse.Namespace):
    if args.no_progress:
        return None
    from tqdm import tqdm

    return functools.partial(tqdm, disable=None)  # no bar (and no cursor codes) when stderr is not a tty


def _check(args: argparse.Namespace) -> int:
    annotations = _load(args)
    _check_splits(annotations, args.splits, "--splits")
    progress = _progress(args)
    print(f"| {annotations.name} split | images | bad images |\n|---|---:|---:|")
    found: dict[Path, str] = {}
    for split in args.splits or annotations.split_names():
        paths = [annotations.image_root / r.filename for r in annotations.images if r.split == split]
        split_progress = functools.partial(progress, desc=split) if progress else None
        bad = find_bad_images(paths, decode=args.decode, progress=split_progress)
        print(f"| {split} | {len(set(paths))} | {len(bad)} |")
        found.update(bad)
    for path, reason in found.items():
        print(f"{path}\t{reason}")
    return 1 if found else 0


def _leakage(args: argparse.Namespace) -> None:
    first = _load(args)
    _check_splits(first, args.splits, "--splits")
    other = _load(args, "other-") if args.other_dataset else None
    if other is not None:
        _check_splits(other, args.other_splits, "--other-splits")
    progress = _progress(args)
    report = find_shared_images(first, other, args.splits, args.other_splits, progress=progress)
    print(report.to_markdown())
    if report.missing:
        print(f"{len(report.missing)} image file(s) listed but missing, not hashed (first: {report.missing[0]})")
    if args.list:
        for (split_a, split_b), pairs in sorted(report.shared.items()):
            for file_a, file_b, digest in pairs:
                print(f"{split_a}\t{file_a}\t{split_b}\t{file_b}\t{digest}")
        for (dataset, split), groups in sorted(report.repeated.items()):
            for group in groups:
                print(f"repeated in {dataset} {split}:\t" + "\t".join(group))
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
            "repeated": [
                {"dataset": dataset, "split": split, "files": group}
                for (dataset, split), groups in sorted(report.repeated.items())
                for group in groups
            ],
            "missing": report.missing,
        }
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="msa-data: %(levelname)s: %(message)s", level=logging.WARNING)
    try:
        if args.command == "check":
            return _check(args)
        if args.command == "stats":
            _stats(args)
        else:
            _leakage(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        # KeyError's str() is the repr of its message; show the message itself.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"msa-data: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
