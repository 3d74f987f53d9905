"""Caption annotations of the remote-sensing image-text retrieval benchmarks.

Every format is parsed into one in-memory layout, :class:`Annotations`: a list of images (path relative to an image
root, split name, captions). :meth:`Annotations.split` flattens one split into a :class:`RetrievalSplit` — image paths,
caption strings and ``text_to_image`` (the index of each caption's image), which is all that training and the
retrieval protocol need.

Supported layouts (as the datasets are distributed):

- Karpathy-style JSON (RSICD ``dataset_rsicd.json``, RSITMD ``dataset_RSITMD.json``, UCM-Captions and
  Sydney-Captions ``dataset.json``, or any other file of that form).
- NWPU-Captions ``dataset_nwpu.json``: a dict keyed by category; records carry ``raw``, ``raw_1`` .. ``raw_4``; images
  live under ``images/<category>/<filename>``.
- The ``filename,title`` CSV (one caption per row) used by several RSITR codebases; a CSV has no split column, so the
  split is given by the caller (or read from the file name, e.g. ``nwpu_captions_test.csv`` -> ``test``).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

SPLITS = ("train", "val", "test")


class AnnotationError(ValueError):
    """An annotation file is malformed, or holds an empty caption (names the file and the record)."""


@dataclass
class ImageRecord:
    """One image of a dataset: its path relative to the image root, its split and its captions."""

    filename: str
    split: str
    captions: list[str]
    label: str | None = None
    empty_captions: int = 0  # empty sentences found (and not skipped): using this image's split raises


@dataclass
class RetrievalSplit:
    """One split, flattened for retrieval: ``captions[t]`` describes ``image_paths[text_to_image[t]]``."""

    name: str
    split: str
    image_paths: list[Path]
    captions: list[str]
    text_to_image: list[int]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    @property
    def num_captions(self) -> int:
        return len(self.captions)


@dataclass
class Annotations:
    """All images of one dataset with their splits and captions.

    Attributes:
        name: dataset name (``rsicd``, ``rsitmd``, ...).
        image_root: folder the image file names are relative to.
        images: the image records, in file order.
        source: the annotation file they were read from.
        skipped: counts of what was left out because of ``skip_bad`` (e.g. ``{"empty_caption": 3}``).
    """

    name: str
    image_root: Path
    images: list[ImageRecord]
    source: Path | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def split_names(self) -> list[str]:
        """The splits present, in the order train, val, test, then any other."""
        present = {record.split for record in self.images}
        return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{split: (num_images, num_captions)}``."""
        out: dict[str, tuple[int, int]] = {}
        for split in self.split_names():
            records = [r for r in self.images if r.split == split]
            out[split] = (len(records), sum(len(r.captions) for r in records))
        return out

    def split(self, split: str) -> RetrievalSplit:
        """Flatten one split into image paths, captions and ``text_to_image``.

        Raises:
            KeyError: the split does not exist (the message lists the ones that do).
            AnnotationError: the split holds empty captions (loaded without ``skip_bad``); names the images.
        """
        records = [r for r in self.images if r.split == split]
        if not records:
            raise KeyError(f"{self.name}: no split {split!r} in {self.source}; splits present: {self.split_names()}")
        empty = [r.filename for r in records if r.empty_captions]
        if empty:
            raise AnnotationError(
                f"{self.source}: {len(empty)} image(s) of split {split!r} have an empty caption: {empty[:5]} "
                "(pass skip_bad / --skip-bad to skip and count them)"
            )
        captions: list[str] = []
        text_to_image: list[int] = []
        for index, record in enumerate(records):
            captions.extend(record.captions)
            text_to_image.extend([index] * len(record.captions))
        return RetrievalSplit(
            name=self.name,
            split=split,
            image_paths=[self.image_root / r.filename for r in records],
            captions=captions,
            text_to_image=text_to_image,
            skipped=dict(self.skipped),
        )


def _clean_caption(text: str | None) -> str:
    return " ".join((text or "").split())


def _add_record(
    images: list[ImageRecord],
    skipped: dict[str, int],
    filename: str,
    split: str,
    captions: list[str],
    skip_bad: bool,
    label: str | None = None,
) -> None:
    kept = [caption for caption in captions if caption]
    empty = len(captions) - len(kept)
    if empty and skip_bad:
        skipped["empty_caption"] = skipped.get("empty_caption", 0) + empty
        empty = 0
    # Without skip_bad the error is raised when the split is used (Annotations.split), so that an empty caption in
    # train does not prevent evaluating on test.
    images.append(ImageRecord(filename=filename, split=split, captions=kept, label=label, empty_captions=empty))


def load_karpathy_json(
    path: str | Path, image_root: str | Path | None = None, name: str | None = None, skip_bad: bool = False
) -> Annotations:
    """Read a Karpathy-style JSON (``{"images": [{"filename", "split", "sentences": [{"raw", "tokens"}]}]}``).

    A sentence's text is its ``raw`` field with whitespace normalised (trailing " ." kept: tokenizers handle it); when
    ``raw`` is missing the ``tokens`` are joined. ``restval`` (the COCO convention) counts as train.

    Args:
        path: the JSON file.
        image_root: the image folder (default: the JSON's folder).
        name: dataset name (default: the JSON's ``dataset`` field, else the file stem).
        skip_bad: skip and count empty captions; without it, :meth:`Annotations.split` raises
            :class:`AnnotationError` for a split that holds one.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{path}: not a Karpathy-style JSON (expected a dict with an 'images' list)")
    images: list[ImageRecord] = []
    skipped: dict[str, int] = {}
    for position, record in enumerate(data["images"]):
        try:
            filename = record["filename"]
            split = record.get("split", "train")
            sentences = record["sentences"]
        except (KeyError, TypeError) as error:
            raise AnnotationError(f"{path}: image record {position} lacks {error}") from error
        if split == "restval":
            split = "train"
        if record.get("filepath"):
            filename = f"{record['filepath']}/{filename}"
        captions = [_clean_caption(s.get("raw") or " ".join(s.get("tokens") or [])) for s in sentences]
        label = record.get("label")
        _add_record(images, skipped, filename, split, captions, skip_bad, None if label is None else str(label))
    return Annotations(
        name=name or str(data.get("dataset") or path.stem),
        image_root=Path(image_root) if image_root is not None else path.parent,
        images=images,
        source=path,
        skipped=skipped,
    )


def load_nwpu_json(
    path: str | Path, image_root: str | Path | None = None, name: str = "nwpu", skip_bad: bool = False
) -> Annotations:
    """Read NWPU-Captions' ``dataset_nwpu.json``: ``{category: [{"filename", "split", "raw", "raw_1".."raw_4"}]}``.

    File names become ``<category>/<filename>`` relative to ``image_root`` (default: ``<json folder>/images``).
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" in data:
        raise AnnotationError(f"{path}: not an NWPU-Captions JSON (expected a dict keyed by category)")
    images: list[ImageRecord] = []
    skipped: dict[str, int] = {}
    for category, records in data.items():
        for record in records:
            raw_keys = ["raw"] + sorted((k for k in record if k.startswith("raw_")), key=lambda k: int(k[4:]))
            captions = [_clean_caption(record.get(k)) for k in raw_keys]
            filename = f"{category}/{record['filename']}"
            _add_record(images, skipped, filename, record.get("split", "train"), captions, skip_bad, category)
    return Annotations(
        name=name,
        image_root=Path(image_root) if image_root is not None else path.parent / "images",
        images=images,
        source=path,
        skipped=skipped,
    )


def load_caption_csv(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    name: str | None = None,
    skip_bad: bool = False,
) -> Annotations:
    """Read a ``filename,title`` CSV, one caption per row; rows of one image are grouped (first-appearance order).

    Args:
        split: the split of every row; default: ``train``/``val``/``test`` if the file stem contains one of them
            (``nwpu_captions_test.csv`` -> ``test``), else ``test``.
    """
    path = Path(path)
    if split is None:
        stem = path.stem.lower()
        split = next((s for s in SPLITS if s in stem.replace("-", "_").split("_")), "test")
    grouped: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"filename", "title"} <= set(reader.fieldnames):
            raise AnnotationError(f"{path}: expected a CSV with columns 'filename,title', got {reader.fieldnames}")
        for row in reader:
            grouped.setdefault(row["filename"], []).append(_clean_caption(row["title"]))
    images: list[ImageRecord] = []
    skipped: dict[str, int] = {}
    for filename, captions in grouped.items():
        _add_record(images, skipped, filename, split, captions, skip_bad)
    return Annotations(
        name=name or path.stem,
        image_root=Path(image_root) if image_root is not None else path.parent,
        images=images,
        source=path,
        skipped=skipped,
    )


# Where each dataset keeps its annotation file and images, as distributed (first match wins). The ``dataset_<name>``
# spellings also cover the rebuilt files in ``shared/data/rs_captions``.
DATASET_LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "rsicd": {"annotations": ("dataset_rsicd.json", "dataset.json"), "images": ("RSICD_images", "images", "imgs")},
    "rsitmd": {
        "annotations": ("dataset_RSITMD.json", "dataset_rsitmd.json", "dataset.json"),
        "images": ("images", "RSITMD_images", "imgs"),
    },
    "ucm": {"annotations": ("dataset.json", "dataset_ucm.json"), "images": ("imgs", "images", "UCM_images")},
    "sydney": {"annotations": ("dataset.json", "dataset_sydney.json"), "images": ("imgs", "images", "Sydney_images")},
    "nwpu": {
        "annotations": ("dataset_nwpu.json", "nwpu_captions.csv", "nwpu_captions_test.csv"),
        "images": ("images", "NWPU_images", "."),
    },
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_annotations` (plus ``karpathy`` and ``csv`` for any file of those formats)."""
    return sorted(DATASET_LAYOUTS) + ["csv", "karpathy"]


def _load_file(path: Path, image_root: Path | None, name: str | None, split: str | None, skip_bad: bool) -> Annotations:
    if path.suffix.lower() == ".csv":
        return load_caption_csv(path, image_root, split=split, name=name, skip_bad=skip_bad)
    with open(path, encoding="utf-8") as f:
        head = f.read(65536)
    # A Karpathy file is a dict with an "images" list (near the top in every known file); NWPU's is a dict keyed by
    # category.
    if '"images"' in head:
        return load_karpathy_json(path, image_root, name=name, skip_bad=skip_bad)
    return load_nwpu_json(path, image_root, name=name or "nwpu", skip_bad=skip_bad)


def load_annotations(
    name: str,
    root: str | Path | None = None,
    *,
    annotations: str | Path | None = None,
    image_root: str | Path | None = None,
    csv_split: str | None = None,
    skip_bad: bool = False,
) -> Annotations:
    """Load a dataset from its folder as distributed, or from an explicit annotation file.

    Args:
        name: ``rsicd``, ``rsitmd``, ``ucm``, ``sydney``, ``nwpu``, or ``karpathy`` / ``csv`` (then ``annotations``
            is required).
        root: the dataset folder (searched for the known annotation file and image folder names).
        annotations: explicit annotation file (overrides the search in ``root``).
        image_root: explicit image folder (overrides the search in ``root``).
        csv_split: the split of a CSV's rows (see :func:`load_caption_csv`).
        skip_bad: skip and count empty captions (else using a split that holds one raises).

    Raises:
        FileNotFoundError: no annotation file was found; the message lists the names tried.
    """
    key = name.lower()
    layout = DATASET_LAYOUTS.get(key)
    if layout is None and key not in ("karpathy", "csv"):
        raise ValueError(f"unknown dataset {name!r}; known: {list_datasets()}")
    root_path = Path(root) if root is not None else None
    if annotations is None:
        if root_path is None or layout is None:
            raise ValueError(f"dataset {name!r}: give the dataset folder (root) or an annotation file")
        candidates = [root_path / f for f in layout["annotations"]]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{name}: no annotation file in {root_path}; tried {[c.name for c in candidates]}")
        annotations = found
    annotations = Path(annotations)
    if image_root is None:
        base = root_path if root_path is not None else annotations.parent
        folders = layout["images"] if layout is not None else ("images", "imgs", ".")
        image_root = next((base / f for f in folders if (base / f).is_dir()), base)
    loaded = _load_file(annotations, Path(image_root), key if layout is not None else None, csv_split, skip_bad)
    return loaded


def carve_val(annotations: Annotations, fraction: float = 0.1, seed: int = 0) -> Annotations:
    """Move a seeded, per-image fraction of train to a new ``val`` split when the dataset has none.

    The choice depends only on (the sorted train file names, ``fraction``, ``seed``): ``round(fraction * n_train)``
    images drawn by ``random.Random(seed).sample`` from the train images sorted by file name, so it is independent of
    the file's record order and of the machine. Test is never touched (no model selection on test).

    Args:
        fraction: share of the train images moved to val (0 < fraction < 1).
        seed: the carve-out seed (fixed per experiment, independent of the training seed).

    Returns:
        The annotations unchanged if a val split exists, else a copy with the carve-out applied.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction}")
    if any(r.split == "val" for r in annotations.images):
        return annotations
    train = sorted({r.filename for r in annotations.images if r.split == "train"})
    if len(train) < 2:
        raise ValueError(f"{annotations.name}: {len(train)} train image(s), too few to carve a val split")
    count = min(max(1, round(fraction * len(train))), len(train) - 1)
    chosen = set(random.Random(seed).sample(train, count))
    images = [
        replace(r, split="val") if r.split == "train" and r.filename in chosen else replace(r)
        for r in annotations.images
    ]
    return replace(annotations, images=images)


def add_caption_noise(split: RetrievalSplit, ratio: float, seed: int = 0) -> tuple[RetrievalSplit, list[bool]]:
    """The noisy-correspondence protocol: shuffle the captions of a seeded ``ratio`` of the caption rows.

    ``round(ratio * num_captions)`` caption rows are drawn with ``random.Random(seed)``, and their captions are
    permuted among themselves by a uniform random shuffle (a row may keep its own caption by chance, as in the
    protocol used for RSITMD at 20/40/60/80% noise). Images and ``text_to_image`` are unchanged, so the pair
    (image, caption) of a drawn row is, in general, wrong. Apply it to the training split only.

    Returns:
        The noisy split and, per caption row, whether it was drawn (``noisy[t]``).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"noise ratio must be in [0, 1], got {ratio}")
    rng = random.Random(seed)
    count = round(ratio * split.num_captions)
    rows = sorted(rng.sample(range(split.num_captions), count))
    shuffled = rows[:]
    rng.shuffle(shuffled)
    captions = list(split.captions)
    for target, origin in zip(rows, shuffled):
        captions[target] = split.captions[origin]
    noisy = [False] * split.num_captions
    for row in rows:
        noisy[row] = True
    return replace(split, captions=captions), noisy
