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

import collections
import csv
import io
import json
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

SPLITS = ("train", "val", "test")
# Share of train carved out as val when a dataset has none (RSITMD as distributed); training, evaluation and
# ``msa-data stats`` use the same default so that they see the same splits.
DEFAULT_VAL_FRACTION = 0.1

logger = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """An annotation file is malformed, or holds an empty caption (names the file and the record)."""


@dataclass
class ImageRecord:
    """One image of a dataset: its path relative to the image root, its split and its captions."""

    filename: str
    split: str
    captions: list[str]
    label: str | None = None
    empty_captions: int = 0  # empty sentences found (and not skipped): using this image's split raises, as without any


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

    def repeated_within_splits(self) -> dict[str, dict[str, int]]:
        """``{split: {filename: times listed}}`` for the files listed more than once in one split."""
        listed = collections.Counter((r.split, r.filename) for r in self.images)
        out: dict[str, dict[str, int]] = {}
        for (split, filename), times in listed.items():
            if times > 1:
                out.setdefault(split, {})[filename] = times
        return out

    def images_in_several_splits(self) -> dict[str, list[str]]:
        """``{filename: [splits]}`` for the files listed in more than one split (splits in train, val, test order)."""
        splits_of: dict[str, set[str]] = {}
        for record in self.images:
            splits_of.setdefault(record.filename, set()).add(record.split)
        order = {s: i for i, s in enumerate(self.split_names())}
        return {f: sorted(s, key=order.__getitem__) for f, s in splits_of.items() if len(s) > 1}

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
            AnnotationError: the split holds empty captions or an image without any (loaded without ``skip_bad``);
                names the images.
        """
        records = [r for r in self.images if r.split == split]
        if not records:
            raise KeyError(f"{self.name}: no split {split!r} in {self.source}; splits present: {self.split_names()}")
        # An image without captions would silently leave image-to-text ranking and stay a text-to-image distractor.
        empty = [r.filename for r in records if r.empty_captions or not r.captions]
        if empty:
            raise AnnotationError(
                f"{self.source}: {len(empty)} image(s) of split {split!r} have an empty caption or none: {empty[:5]} "
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


def _read_text(path: Path) -> str:
    """The file's text as UTF-8 (a byte-order mark is accepted and dropped)."""
    data = path.read_bytes()
    if not data.strip():
        raise AnnotationError(f"{path}: empty file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise AnnotationError(
            f"{path}: not UTF-8 text (byte {error.start}: {data[error.start : error.start + 4]!r}); save it as UTF-8"
        ) from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise AnnotationError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg} (truncated file?)"
        ) from None


def _check_split(split: object, where: str) -> str:
    """The record's split name, ``restval`` (the COCO convention) read as train; anything else unknown is an error."""
    if split == "restval":
        return "train"
    if split not in SPLITS:
        raise AnnotationError(f"{where}: unknown split {split!r}; known splits: {', '.join(SPLITS)} (and restval)")
    return split  # type: ignore[return-value]


def _warn_without_split(path: Path, count: int) -> None:
    if count:
        logger.warning("%s: %d image record(s) without a 'split' field, read as train", path, count)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


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
    if not kept and skip_bad:
        skipped["image_without_caption"] = skipped.get("image_without_caption", 0) + 1
        return
    # Without skip_bad the error is raised when the split is used (Annotations.split), so that an empty caption in
    # train does not prevent evaluating on test.
    images.append(ImageRecord(filename=filename, split=split, captions=kept, label=label, empty_captions=empty))


def _karpathy_captions(sentences: object, where: str) -> list[str]:
    if not isinstance(sentences, list):
        raise AnnotationError(f"{where}: 'sentences' must be a list of sentence objects, got {_type_name(sentences)}")
    captions = []
    for number, sentence in enumerate(sentences):
        if not isinstance(sentence, dict):
            raise AnnotationError(f"{where}: sentence {number} must be an object, got {_type_name(sentence)}")
        raw, tokens = sentence.get("raw"), sentence.get("tokens")
        if raw is not None and not isinstance(raw, str):
            raise AnnotationError(f"{where}: sentence {number}: 'raw' must be a string, got {_type_name(raw)}")
        if tokens is not None and not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            raise AnnotationError(f"{where}: sentence {number}: 'tokens' must be a list of strings")
        captions.append(_clean_caption(raw or " ".join(tokens or [])))
    return captions


def _record_filename(record: dict, where: str) -> str:
    filename = record.get("filename")
    if not isinstance(filename, str) or not filename.strip():
        raise AnnotationError(f"{where}: 'filename' must be a non-empty string, got {filename!r}")
    return filename


def _parse_karpathy(data: object, path: Path, skip_bad: bool) -> tuple[list[ImageRecord], dict[str, int]]:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{path}: not a Karpathy-style JSON (expected a dict with an 'images' list)")
    images: list[ImageRecord] = []
    skipped: dict[str, int] = {}
    without_split = 0
    for position, record in enumerate(data["images"]):
        where = f"{path}: image record {position}"
        if not isinstance(record, dict):
            raise AnnotationError(f"{where}: expected an object, got {_type_name(record)}")
        filename = _record_filename(record, where)
        where = f"{where} ({filename})"
        split = _check_split(record.get("split", "train"), where)
        without_split += "split" not in record
        if "sentences" not in record:
            raise AnnotationError(f"{where}: no 'sentences'")
        captions = _karpathy_captions(record["sentences"], where)
        if record.get("filepath"):
            filename = f"{record['filepath']}/{filename}"
        label = record.get("label")
        _add_record(images, skipped, filename, split, captions, skip_bad, None if label is None else str(label))
    _warn_without_split(path, without_split)
    return images, skipped


def load_karpathy_json(
    path: str | Path, image_root: str | Path | None = None, name: str | None = None, skip_bad: bool = False
) -> Annotations:
    """Read a Karpathy-style JSON (``{"images": [{"filename", "split", "sentences": [{"raw", "tokens"}]}]}``).

    A sentence's text is its ``raw`` field with whitespace normalised (trailing " ." kept: tokenizers handle it); when
    ``raw`` is missing the ``tokens`` are joined. ``restval`` (the COCO convention) counts as train; a record without
    ``split`` is train; any other split name than train/val/test is an error.

    Args:
        path: the JSON file.
        image_root: the image folder (default: the JSON's folder).
        name: dataset name (default: the JSON's ``dataset`` field, else the file stem).
        skip_bad: skip and count empty captions; without it, :meth:`Annotations.split` raises
            :class:`AnnotationError` for a split that holds one.

    Raises:
        AnnotationError: the file is empty, not UTF-8, not valid JSON, or a record breaks the schema; one line naming
            the file and the record.
    """
    path = Path(path)
    return _karpathy_annotations(_read_json(path), path, image_root, name, skip_bad)


def _karpathy_annotations(
    data: object, path: Path, image_root: str | Path | None, name: str | None, skip_bad: bool
) -> Annotations:
    images, skipped = _parse_karpathy(data, path, skip_bad)
    dataset_name = data.get("dataset") if isinstance(data, dict) else None
    return _finish(
        Annotations(
            name=name or str(dataset_name or path.stem),
            image_root=Path(image_root) if image_root is not None else path.parent,
            images=images,
            source=path,
            skipped=skipped,
        )
    )


def _parse_nwpu(data: object, path: Path, skip_bad: bool) -> tuple[list[ImageRecord], dict[str, int]]:
    if not isinstance(data, dict) or "images" in data:
        raise AnnotationError(f"{path}: not an NWPU-Captions JSON (expected a dict keyed by category)")
    images: list[ImageRecord] = []
    skipped: dict[str, int] = {}
    without_split = 0
    for category, records in data.items():
        if not isinstance(records, list):
            got = _type_name(records)
            raise AnnotationError(f"{path}: category {category!r} must hold a list of records, got {got}")
        for position, record in enumerate(records):
            where = f"{path}: category {category!r} record {position}"
            if not isinstance(record, dict):
                raise AnnotationError(f"{where}: expected an object, got {_type_name(record)}")
            filename = _record_filename(record, where)
            where = f"{where} ({filename})"
            raw_keys = [k for k in record if k == "raw" or (k.startswith("raw_") and k[4:].isdigit())]
            raw_keys.sort(key=lambda k: -1 if k == "raw" else int(k[4:]))
            for key in raw_keys:
                if record[key] is not None and not isinstance(record[key], str):
                    raise AnnotationError(f"{where}: {key!r} must be a string, got {_type_name(record[key])}")
            captions = [_clean_caption(record[k]) for k in raw_keys]
            split = _check_split(record.get("split", "train"), where)
            without_split += "split" not in record
            _add_record(images, skipped, f"{category}/{filename}", split, captions, skip_bad, category)
    _warn_without_split(path, without_split)
    return images, skipped


def load_nwpu_json(
    path: str | Path, image_root: str | Path | None = None, name: str = "nwpu", skip_bad: bool = False
) -> Annotations:
    """Read NWPU-Captions' ``dataset_nwpu.json``: ``{category: [{"filename", "split", "raw", "raw_1".."raw_4"}]}``.

    File names become ``<category>/<filename>`` relative to ``image_root`` (default: ``<json folder>/images``).

    Raises:
        AnnotationError: as :func:`load_karpathy_json`.
    """
    path = Path(path)
    return _nwpu_annotations(_read_json(path), path, image_root, name, skip_bad)


def _nwpu_annotations(
    data: object, path: Path, image_root: str | Path | None, name: str, skip_bad: bool
) -> Annotations:
    images, skipped = _parse_nwpu(data, path, skip_bad)
    return _finish(
        Annotations(
            name=name,
            image_root=Path(image_root) if image_root is not None else path.parent / "images",
            images=images,
            source=path,
            skipped=skipped,
        )
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

    Raises:
        AnnotationError: as :func:`load_karpathy_json` (rows are named by their line number).
    """
    path = Path(path)
    if split is None:
        stem = path.stem.lower()
        split = next((s for s in SPLITS if s in stem.replace("-", "_").split("_")), "test")
    split = _check_split(split, f"{path}: the CSV's split")
    grouped: dict[str, list[str]] = {}
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        if reader.fieldnames is None or not {"filename", "title"} <= set(reader.fieldnames):
            raise AnnotationError(f"{path}: expected a CSV with columns 'filename,title', got {reader.fieldnames}")
        for row in reader:
            filename, title = row["filename"], row["title"]
            if not filename or not filename.strip() or title is None:
                raise AnnotationError(f"{path}: line {reader.line_num}: a row needs a filename and a title, got {row}")
            grouped.setdefault(filename, []).append(_clean_caption(title))
    except csv.Error as error:
        raise AnnotationError(f"{path}: line {reader.line_num}: {error}") from None
    images: list[ImageRecord] = []
    skipped: dict[str, int] = {}
    for filename, captions in grouped.items():
        _add_record(images, skipped, filename, split, captions, skip_bad)
    return _finish(
        Annotations(
            name=name or path.stem,
            image_root=Path(image_root) if image_root is not None else path.parent,
            images=images,
            source=path,
            skipped=skipped,
        )
    )


def _finish(annotations: Annotations) -> Annotations:
    """Warn, with counts, about images listed twice in a split or in several splits (both inflate the metrics)."""
    repeated = annotations.repeated_within_splits()
    if repeated:
        counts = {split: sum(n - 1 for n in files.values()) for split, files in repeated.items()}
        example = next(iter(next(iter(repeated.values()))))
        logger.warning(
            "%s (%s): %d repeated image listing(s) within a split %s, e.g. %s",
            annotations.name, annotations.source, sum(counts.values()), counts, example,
        )  # fmt: skip
    several = annotations.images_in_several_splits()
    if several:
        pairs = collections.Counter("+".join(splits) for splits in several.values())
        logger.warning(
            "%s (%s): %d image(s) listed in several splits %s, e.g. %s",
            annotations.name, annotations.source, len(several), dict(pairs), next(iter(several)),
        )  # fmt: skip
    return annotations


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
    """Read an annotation file, telling the JSON formats apart by their structure (not by the dataset name)."""
    if path.suffix.lower() == ".csv":
        return load_caption_csv(path, image_root, split=split, name=name, skip_bad=skip_bad)
    data = _read_json(path)
    # --dataset karpathy (name None) insists on the Karpathy structure, so an NWPU file is named as not being one.
    if (isinstance(data, dict) and "images" in data) or name is None:
        return _karpathy_annotations(data, path, image_root, name, skip_bad)
    return _nwpu_annotations(data, path, image_root, name, skip_bad)


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
    return _load_file(annotations, Path(image_root), key if layout is not None else None, csv_split, skip_bad)


def carve_val(annotations: Annotations, fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> Annotations:
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
