"""Small synthetic remote-sensing caption datasets, written to disk in every layout ``msa`` reads.

The tests use them so that everything short of real-data checks runs on a fresh clone. Each dataset is a folder laid
out as ``--data-root`` expects for its ``--dataset`` (see ``msa.data.DATASET_LAYOUTS``), with real image files (PNG,
JPEG or TIFF, a few sizes) and an annotation file in the dataset's own format. Everything is seeded: the same
arguments write byte-identical files.

Each image is a plain background colour with a square of a second colour; its captions name both colours and the
square's position, so a model trained for a few steps has something learnable to align.

Usage::

    from synthetic_data import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "ucm", "ucm", num_images=10)
    # msa-train --dataset ucm --data-root {data.data_root}
    load_annotations(data.dataset, data.data_root)                      # layouts with a --data-root search
    load_annotations(data.dataset, annotations=data.annotations, image_root=data.image_root)  # every layout

In tests prefer the ``synthetic_dataset`` fixture of ``tests/conftest.py`` (cached per session; do not modify the
files it returns, copy them first).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# Layout name -> (the --dataset name to pass, annotation file, image folder, image suffixes, splits written).
# ``karpathy`` and ``csv`` have no folder search: pass ``annotations`` and ``image_root`` explicitly.
LAYOUTS: dict[str, tuple[str, str, str, tuple[str, ...], tuple[str, ...]]] = {
    "rsicd": ("rsicd", "dataset_rsicd.json", "RSICD_images", (".jpg",), ("train", "val", "test")),
    # RSITMD as distributed: train and test only (a loader carves val out of train).
    "rsitmd": ("rsitmd", "dataset_RSITMD.json", "images", (".tif",), ("train", "test")),
    "ucm": ("ucm", "dataset.json", "imgs", (".tif",), ("train", "val", "test")),
    "sydney": ("sydney", "dataset.json", "imgs", (".tif",), ("train", "val", "test")),
    # NWPU-Captions: a dict keyed by category, images under images/<category>/.
    "nwpu": ("nwpu", "dataset_nwpu.json", "images", (".jpg",), ("train", "val", "test")),
    # NWPU's test split as the filename,title CSV, images directly in images/.
    "nwpu_csv": ("nwpu", "nwpu_captions_test.csv", "images", (".jpg",), ("test",)),
    # Any Karpathy-style file, with a mix of image formats.
    "karpathy": ("karpathy", "dataset.json", "images", (".png", ".jpg", ".tif"), ("train", "val", "test")),
    # A filename,title CSV whose split is read from the file name.
    "csv": ("csv", "captions_test.csv", "images", (".png", ".jpg", ".tif"), ("test",)),
}

IMAGE_SIZES = ((64, 64), (96, 80), (72, 120))  # (width, height), cycled over the images
COLOURS = {
    "red": (200, 40, 30),
    "green": (40, 160, 60),
    "blue": (30, 60, 200),
    "yellow": (220, 200, 40),
    "grey": (128, 128, 128),
    "white": (235, 235, 235),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
NWPU_CATEGORIES = ("airport", "beach", "forest")


@dataclass
class SyntheticDataset:
    """Where a synthetic dataset was written and what it holds.

    Attributes:
        layout: the layout name (a key of ``LAYOUTS``).
        dataset: the name to pass as ``--dataset`` / ``load_annotations(name)``.
        data_root: the dataset folder (``--data-root``).
        annotations: the annotation file (``--annotations``).
        image_root: the folder image file names are relative to (``--image-root``).
        counts: ``{split: (num_images, num_captions)}`` as the loader must report it.
        filenames: ``{split: [file name relative to image_root, ...]}`` in annotation order.
    """

    layout: str
    dataset: str
    data_root: Path
    annotations: Path
    image_root: Path
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    filenames: dict[str, list[str]] = field(default_factory=dict)


def split_sizes(num_images: int, splits: tuple[str, ...]) -> dict[str, int]:
    """Images per split: val and test get a fifth each (at least 2), train the rest (at least 2)."""
    if len(splits) == 1:
        return {splits[0]: num_images}
    held_out = [s for s in splits if s != "train"]
    each = max(2, num_images // 5)
    sizes = {"train": num_images - each * len(held_out), **{s: each for s in held_out}}
    if sizes["train"] < 2:
        raise ValueError(f"{num_images} images are too few for splits {splits}")
    return {s: sizes[s] for s in splits}


def synthetic_image(index: int, seed: int = 0, size: tuple[int, int] | None = None) -> tuple[Image.Image, list[str]]:
    """The ``index``-th RGB image of a seeded series, and five captions describing it.

    Args:
        index: position in the series (picks colours, square position and size).
        seed: the series seed (noise and colour choice).
        size: ``(width, height)``; default cycles through ``IMAGE_SIZES``.
    """
    rng = np.random.default_rng([seed, index])
    width, height = size or IMAGE_SIZES[index % len(IMAGE_SIZES)]
    names = list(COLOURS)
    background, square = rng.choice(len(names), size=2, replace=False)
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:] = COLOURS[names[background]]
    side = max(4, min(width, height) // 3)
    top = {"top": 2, "bottom": height - side - 2}.get(position.split()[0], (height - side) // 2)
    left = {"left": 2, "right": width - side - 2}.get(position.split()[-1], (width - side) // 2)
    pixels[top : top + side, left : left + side] = COLOURS[names[square]]
    pixels += rng.normal(0.0, 8.0, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    bg, sq = names[background], names[square]
    captions = [
        f"a {sq} square on a {bg} field .",
        f"a {bg} area with a {sq} patch in the {position}",
        f"the {sq} block lies in the {position} of a {bg} scene",
        f"{bg} ground and one {sq} building",
        f"image {index}: {sq} on {bg}, {position}",
    ]
    return image, captions


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jpg":
        image.save(path, quality=90)
    elif path.suffix == ".tif":
        image.save(path, compression="tiff_deflate")
    else:
        image.save(path)


def _sentences(captions: list[str], imgid: int, first_sentid: int) -> list[dict]:
    return [
        {"raw": c, "tokens": c.rstrip(" .").split(), "imgid": imgid, "sentid": first_sentid + k}
        for k, c in enumerate(captions)
    ]


def write_synthetic_dataset(
    root: str | Path, layout: str = "karpathy", num_images: int = 10, captions_per_image: int = 5, seed: int = 0
) -> SyntheticDataset:
    """Write a synthetic dataset into ``root`` (created if needed) in the given layout.

    Args:
        root: the dataset folder to write (becomes ``data_root``).
        layout: a key of ``LAYOUTS``: ``rsicd``, ``rsitmd`` (no val), ``ucm``, ``sydney``, ``nwpu`` (dict by category,
            ``raw`` .. ``raw_4``), ``nwpu_csv`` and ``csv`` (``filename,title``, test split only), ``karpathy``.
        num_images: images in all (split as in :func:`split_sizes`; NWPU's are spread over 3 categories).
        captions_per_image: 1 to 5.
        seed: the image/caption seed.

    Returns:
        A :class:`SyntheticDataset` saying where everything is and what the loader must count.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    if not 1 <= captions_per_image <= 5:
        raise ValueError(f"captions_per_image must be 1..5, got {captions_per_image}")
    dataset, annotation_name, image_folder, suffixes, splits = LAYOUTS[layout]
    root = Path(root)
    image_root = root / image_folder
    image_root.mkdir(parents=True, exist_ok=True)
    split_of = [s for s, n in split_sizes(num_images, splits).items() for _ in range(n)]
    items = []  # (imgid, filename, split, captions, category)
    for index, split in enumerate(split_of):
        image, captions = synthetic_image(index, seed)
        category = NWPU_CATEGORIES[index % len(NWPU_CATEGORIES)] if layout == "nwpu" else None
        filename = f"{category or layout}_{index:03d}{suffixes[index % len(suffixes)]}"
        relative = f"{category}/{filename}" if category else filename
        _save(image, image_root / relative)
        items.append((index, filename, split, captions[:captions_per_image], category))
    if layout == "nwpu":  # records are grouped by category in the file, so in the loaded splits too
        items.sort(key=lambda item: (NWPU_CATEGORIES.index(item[4]), item[0]))
    annotations = root / annotation_name
    if layout == "nwpu":
        _write_nwpu(annotations, items)
    elif layout in ("nwpu_csv", "csv"):
        _write_csv(annotations, items)
    else:
        _write_karpathy(annotations, layout, items)
    result = SyntheticDataset(layout, dataset, root, annotations, image_root)
    for _, filename, split, captions, category in items:
        result.filenames.setdefault(split, []).append(f"{category}/{filename}" if category else filename)
        images, count = result.counts.get(split, (0, 0))
        result.counts[split] = (images + 1, count + len(captions))
    return result


def _write_karpathy(path: Path, name: str, items: list) -> None:
    images = []
    for imgid, filename, split, captions, _ in items:
        first = imgid * 5
        images.append(
            {
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "sentids": list(range(first, first + len(captions))),
                "sentences": _sentences(captions, imgid, first),
            }
        )
    path.write_text(json.dumps({"dataset": name, "images": images}, indent=1), encoding="utf-8")


def _write_nwpu(path: Path, items: list) -> None:
    data: dict[str, list[dict]] = {}
    for imgid, filename, split, captions, category in items:
        record: dict = {"filename": filename, "split": split, "imgid": imgid}
        for k, caption in enumerate(captions):
            suffix = "" if k == 0 else f"_{k}"
            record[f"raw{suffix}"] = caption
            record[f"sentids{suffix}"] = imgid * 5 + k
        data.setdefault(category, []).append(record)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _write_csv(path: Path, items: list) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "title"])
        for _, filename, _, captions, _ in items:
            writer.writerows([filename, caption] for caption in captions)
