"""Total loss over the first optimisation steps of the paper and improved presets, on real images and captions.

The source of the README's paper-vs-improved figure ("measured on rs_mini, 10 steps"). Both presets start from the
same seed on the same batch: the first ``--batch`` images of ``rs_mini/rsicd`` with their first caption, the
``msa-tiny`` model (random init), AdamW at ``--lr``, the same batch every step. The published alignment term (a
cross-entropy over sigmoid scores in [0, 1], no temperature) can only move slowly; the improved preset's learnable
temperature lifts that limit.

    python benchmarks/loss_steps.py --data-root ../shared/data/rs_mini

prints one row per step and a summary line per preset (first -> last total loss); ``--json FILE`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
from PIL import Image

import msa
from msa.configs import PRESETS
from msa.losses import msa_loss


def load_batch(data_root: Path, count: int) -> list[tuple[Path, str]]:
    """The first ``count`` images of ``data_root/rsicd`` (Karpathy-style dataset.json) with their first caption."""
    folder = data_root / "rsicd"
    records = json.loads((folder / "dataset.json").read_text())["images"][:count]
    if len(records) < count:
        raise ValueError(f"{folder / 'dataset.json'} has {len(records)} images, fewer than --batch {count}")
    return [(folder / "images" / record["filename"], record["sentences"][0]["raw"]) for record in records]


def loss_curve(preset: str, pairs: list[tuple[Path, str]], steps: int, lr: float, seed: int) -> list[float]:
    """Total loss before each of ``steps`` AdamW steps on the same batch."""
    torch.manual_seed(seed)
    model = msa.create_model("msa-tiny", preset=preset)
    transform = model.image_transform(train=False)
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in pairs])
    tokens = model.tokenize([caption for _, caption in pairs])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = msa_loss(model(images, tokens["input_ids"], tokens["attention_mask"]), preset=preset).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="the rs_mini folder (holding rsicd/dataset.json)")
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps")
    parser.add_argument("--batch", type=int, default=8, help="images (one caption each) in the batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the model initialisation")
    parser.add_argument("--json", help="also write the curves to this JSON file")
    args = parser.parse_args(argv)
    data_root = Path(args.data_root)
    if not (data_root / "rsicd" / "dataset.json").is_file():
        print(f"loss_steps.py: {data_root / 'rsicd' / 'dataset.json'} not found (--data-root)", file=sys.stderr)
        return 2
    pairs = load_batch(data_root, args.batch)
    curves = {preset: loss_curve(preset, pairs, args.steps, args.lr, args.seed) for preset in PRESETS}
    print(
        f"msa-tiny, {args.batch} rs_mini/rsicd images, AdamW lr {args.lr}, seed {args.seed}; torch {torch.__version__},"
        f" {torch.get_num_threads()} threads, {platform.machine()}, load {os.getloadavg()[0]:.1f}"
    )
    print("| step | " + " | ".join(PRESETS) + " |")
    print("|---:|" + "---:|" * len(PRESETS))
    for step in range(args.steps):
        print(f"| {step + 1} | " + " | ".join(f"{curves[preset][step]:.1f}" for preset in PRESETS) + " |")
    for preset in PRESETS:
        print(f"{preset}: total {curves[preset][0]:.1f} -> {curves[preset][-1]:.1f} in {args.steps} steps")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "curves": curves}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
