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
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    from msa.data import carve_val, check_images, load_annotations
    from msa.model import MSAModel
    from msa.train import PRECISIONS

    args = build_parser().parse_args(argv)
    if args.rerank and min(args.rerank) < 1:
        print(f"msa-eval: --rerank depths must be positive, got {args.rerank}", file=sys.stderr)
        return 2
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    checkpoint = resolve_checkpoint(args.checkpoint)
    overrides = {"backend": args.backend} if args.backend else {}
    model = MSAModel.from_pretrained(checkpoint, **overrides).to(device).eval()
    annotations = load_annotations(
        args.dataset, args.data_root, annotations=args.annotations, image_root=args.image_root,
        csv_split=args.csv_split, skip_bad=args.skip_bad,
    )  # fmt: skip
    if args.split == "val" and "val" not in annotations.split_names() and "train" in annotations.split_names():
        annotations = carve_val(annotations, args.val_fraction, args.val_seed)
    split = check_images(annotations.split(args.split), args.skip_bad, decode=args.skip_bad)

    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm
    start = time.perf_counter()
    metrics = evaluate_model(
        model,
        split,
        modes=[*args.modes, RERANK_MODE] if args.rerank else args.modes,
        rerank_depths=args.rerank or (),
        fusion_weight=args.fusion_weight,
        device=device,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        num_workers=args.workers,
        autocast_dtype=PRECISIONS[args.precision] if device.type == "cuda" else None,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    print(f"{checkpoint} on {split.name} {split.split}: {split.num_images} images, {split.num_captions} captions")
    if split.skipped:
        print(f"skipped: {split.skipped}")
    print(metrics_table(metrics))
    print("scoring seconds: " + ", ".join(f"{k} {v['seconds']:.3f}" for k, v in metrics.items() if "seconds" in v))
    if args.output_json:
        record = {
            "checkpoint": str(checkpoint),
            "dataset": split.name,
            "split": split.split,
            "num_images": split.num_images,
            "num_captions": split.num_captions,
            "skipped": split.skipped,
            "seconds": seconds,
            "metrics": metrics,
        }
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
