"""Leakage check: images shared between splits of one or two datasets, and images repeated within a split, found
by file content hash.

RSICD and RSITMD share images (RSITMD was partly built from RSICD's sources), so a model trained on one split can
have seen another dataset's test images. Identical files hash identically whatever their names; a re-encoded or
resized copy (TIFF vs JPEG) hashes differently and is not found (that needs a perceptual comparison).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from msa.data.annotations import Annotations


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LeakageReport:
    """Images found in both ``(dataset_a, split_a)`` and ``(dataset_b, split_b)``, and images repeated within a split.

    Attributes:
        counts: ``{(split_a, split_b): number of shared distinct files}``.
        shared: ``{(split_a, split_b): [(file_a, file_b, sha256), ...]}``.
        missing: image files listed in the annotations but absent on disk (not hashed).
        repeated: ``{(dataset, split): [[file, file, ...], ...]}``: groups of listings with identical content in one
            split (the same file listed twice, or copies under other names); each group holds two or more entries.
    """

    dataset_a: str
    dataset_b: str
    counts: dict[tuple[str, str], int]
    shared: dict[tuple[str, str], list[tuple[str, str, str]]]
    missing: list[str]
    repeated: dict[tuple[str, str], list[list[str]]] = field(default_factory=dict)

    def repeated_counts(self) -> dict[tuple[str, str], int]:
        """``{(dataset, split): listings beyond the first of each image}`` (what inflates that split's metrics)."""
        return {key: sum(len(group) - 1 for group in groups) for key, groups in self.repeated.items()}

    def to_markdown(self) -> str:
        lines = [f"| {self.dataset_a} split | {self.dataset_b} split | shared images |", "|---|---|---|"]
        for (split_a, split_b), count in sorted(self.counts.items()):
            lines.append(f"| {split_a} | {split_b} | {count} |")
        if self.repeated:
            lines += ["", "| dataset | split | repeated listings (same content) |", "|---|---|---|"]
            for (dataset, split), count in sorted(self.repeated_counts().items()):
                lines.append(f"| {dataset} | {split} | {count} |")
        return "\n".join(lines)


def _hash_images(
    annotations: Annotations, splits: Iterable[str] | None, progress: Callable | None, missing: list[str]
) -> dict[str, dict[str, list[str]]]:
    """``{split: {sha256: [filename, ...]}}``, every listing kept (a file listed twice appears twice)."""
    wanted = set(splits) if splits is not None else None
    records = [r for r in annotations.images if wanted is None or r.split in wanted]
    iterator: Iterable = records
    if progress is not None:
        iterator = progress(records, desc=f"hashing {annotations.name}")
    digests: dict[Path, str | None] = {}
    out: dict[str, dict[str, list[str]]] = {}
    for record in iterator:
        path = annotations.image_root / record.filename
        if path not in digests:
            digests[path] = file_sha256(path) if path.is_file() else None
            if digests[path] is None:
                missing.append(str(path))
        digest = digests[path]
        if digest is not None:
            out.setdefault(record.split, {}).setdefault(digest, []).append(record.filename)
    return out


def _repeated(name: str, hashes: dict[str, dict[str, list[str]]]) -> dict[tuple[str, str], list[list[str]]]:
    out: dict[tuple[str, str], list[list[str]]] = {}
    for split, files in hashes.items():
        groups = [names for names in files.values() if len(names) > 1]
        if groups:
            out[(name, split)] = groups
    return out


def find_shared_images(
    dataset_a: Annotations,
    dataset_b: Annotations | None = None,
    splits_a: Iterable[str] | None = None,
    splits_b: Iterable[str] | None = None,
    progress: Callable | None = None,
) -> LeakageReport:
    """Report images with identical content in two datasets' splits (or across the splits of one dataset), and
    images repeated within a split.

    Args:
        dataset_a, dataset_b: the datasets; with ``dataset_b=None`` the splits of ``dataset_a`` are compared with each
            other (train/test duplicates inside one dataset), each unordered pair once.
        splits_a, splits_b: restrict to these splits (default: all).
        progress: optional iterable wrapper (``tqdm``) for the hashing.
    """
    missing: list[str] = []
    hashes_a = _hash_images(dataset_a, splits_a, progress, missing)
    same = dataset_b is None
    hashes_b = hashes_a if same else _hash_images(dataset_b, splits_b, progress, missing)
    counts: dict[tuple[str, str], int] = {}
    shared: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for split_a, files_a in hashes_a.items():
        for split_b, files_b in hashes_b.items():
            if same and split_a >= split_b:
                continue
            common = sorted(files_a.keys() & files_b.keys())
            counts[(split_a, split_b)] = len(common)
            shared[(split_a, split_b)] = [(files_a[h][0], files_b[h][0], h) for h in common]
    repeated = _repeated(dataset_a.name, hashes_a)
    if not same:
        repeated.update(_repeated(dataset_b.name, hashes_b))
    return LeakageReport(
        dataset_a=dataset_a.name,
        dataset_b=dataset_a.name if dataset_b is None else dataset_b.name,
        counts=counts,
        shared=shared,
        missing=missing,
        repeated=repeated,
    )
