"""Evaluate a checkpoint on a retrieval split: ``msa-eval --checkpoint DIR --dataset rsicd --data-root DIR``.

``DIR`` is a ``save_pretrained`` folder, a checkpoint folder (``checkpoints/best``) or a training run folder (its
``checkpoints/best`` is used). Prints a markdown table with one row per scoring mode: global cosine (the published
test-time path), MSCMAT (summed over scales), their fusion (``global + w * mscmat``) and each scale alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from msa.data import AnnotationError, ImageLoadError, RetrievalSplit, carve_val, check_images, load_annotations
from msa.evaluation import RERANK_MODE, SCORING_MODES, evaluate_model, metrics_table


def resolve_checkpoint(path: str | Path) -> Path:
    """The ``save_pretrained`` folder inside a run folder, a checkpoint folder or itself."""
    path = Path(path)
    candidates = (
        path,
        path / "model",
        path / "checkpoints" / "best" / "model",
        path / "checkpoints" / "last" / "model",
    )
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no model (config.json) found in {path}, {path}/model or {path}/checkpoints/best/model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msa-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--checkpoint", required=True, help="run folder, checkpoint folder or save_pretrained folder")
    add("--dataset", required=True, help="rsicd, rsitmd, ucm, sydney, nwpu, karpathy or csv")
    add("--data-root", help="dataset folder as distributed")
    add("--annotations", help="explicit annotation file (JSON or CSV)")
    add("--image-root", help="explicit image folder")
    add("--csv-split", help="split of the rows of a CSV annotation file")
    add("--split", default="test", help="split to evaluate (default test)")
    add("--val-fraction", type=float, default=0.1, help="val carve-out of a dataset without val (as in training)")
    add("--val-seed", type=int, default=0, help="seed of the val carve-out (as in training)")
    add("--skip-bad", action="store_true", help="skip and count empty captions and unreadable images")
    add("--modes", nargs="+", choices=SCORING_MODES, default=list(SCORING_MODES), help="scoring modes")
    add("--rerank", type=int, nargs="+", metavar="R", help="also re-rank: global top-R, then MSCMAT (R = 10 50 100 ..)")
    add("--fusion-weight", type=float, default=1.0, help="fusion = global + weight x mscmat")
    add("--batch-size", type=int, default=128, help="encoder batch size")
    add("--chunk-size", type=int, default=1024, help="images/texts per block of the MSCMAT scoring")
    add("--workers", type=int, default=2, help="image-loading worker processes")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    add("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="encoder autocast dtype (CUDA)")
    add("--backend", help="msa.ops backend override (auto, reference, cpu, cuda, triton)")
    add("--output-json", help="also write the metrics here")
    add("--no-progress", action="store_true", help="no progress bars (there are none when stderr is not a terminal)")
    add("--debug", action="store_true", help="show the full traceback of an error")
    return parser


# Mistakes in what was asked (checkpoint, files, split): one line and exit status 2, as argparse does.
class UsageError(ValueError):
    pass


def _load_split(args: argparse.Namespace) -> RetrievalSplit:
    """The split to evaluate, its images checked (decoded and bad ones skipped with ``--skip-bad``)."""
    try:
        annotations = load_annotations(
            args.dataset, args.data_root, annotations=args.annotations, image_root=args.image_root,
            csv_split=args.csv_split, skip_bad=args.skip_bad,
        )  # fmt: skip
    except ValueError as error:  # an unknown dataset, no folder given, an unreadable annotation file
        raise UsageError(str(error)) from error
    present = annotations.split_names()
    if args.split == "val" and "val" not in present and "train" in present:
        try:
            annotations = carve_val(annotations, args.val_fraction, args.val_seed)
        except ValueError as error:
            raise UsageError(f"{error} (--val-fraction {args.val_fraction})") from error
    if args.split not in annotations.split_names():
        raise UsageError(f"{annotations.source}: no split {args.split!r}; splits present: {annotations.split_names()}")
    return check_images(annotations.split(args.split), args.skip_bad, decode=args.skip_bad)


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Load the checkpoint and the split of ``args``, score every mode; the record ``--output-json`` writes."""
    from msa.model import MSAModel

    if args.rerank and min(args.rerank) < 1:
        raise UsageError(f"--rerank depths must be positive, got {args.rerank}")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error
    overrides = {"backend": args.backend} if args.backend else {}
    model = MSAModel.from_pretrained(checkpoint, **overrides).to(device).eval()
    split = _load_split(args)
    progress = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        progress = tqdm
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    start = time.perf_counter()
    metrics = evaluate_model(
        model,
        split,
        modes=[*args.modes, RERANK_MODE] if args.rerank else args.modes,
        rerank_depths=args.rerank or (),
        timed=True,
        fusion_weight=args.fusion_weight,
        device=device,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        num_workers=args.workers,
        autocast_dtype=autocast_dtype if device.type == "cuda" else None,
        progress=progress,
    )
    return {
        "checkpoint": str(checkpoint),
        "dataset": split.name,
        "split": split.split,
        "num_images": split.num_images,
        "num_captions": split.num_captions,
        "skipped": split.skipped,
        "seconds": time.perf_counter() - start,
        "metrics": metrics,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = evaluate_checkpoint(args)
    except (UsageError, AnnotationError, ImageLoadError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"msa-eval: error: {error}", file=sys.stderr)
        return 2
    print(f"{record['checkpoint']} on {record['dataset']} {record['split']}: {record['num_images']} images, "
          f"{record['num_captions']} captions")  # fmt: skip
    if record["skipped"]:
        print(f"skipped: {record['skipped']}")
    print(metrics_table(record["metrics"]))
    timed = {mode: row["seconds"] for mode, row in record["metrics"].items() if "seconds" in row}
    if timed:
        print("scoring seconds: " + ", ".join(f"{mode} {seconds:.3f}" for mode, seconds in timed.items()))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
