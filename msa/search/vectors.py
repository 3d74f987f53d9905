"""Global-embedding search through FAISS: exact inner product, or an IVF / IVF-PQ index for large archives.

The embeddings are L2-normalised, so inner product is cosine. IVF-PQ scores are approximate: its candidates are
re-scored exactly from the float16 embeddings on disk (``refine`` times more than asked), which is what brings
recall@10 against exact search near 1 at a small fraction of the memory of a float32 copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

VECTOR_KINDS = ("auto", "flat", "ivf", "ivfpq")
# Above this many images "auto" picks IVF-PQ: a float32 copy of 1M x 768 embeddings alone takes 3 GB.
IVF_THRESHOLD = 200_000
DEFAULT_NPROBE = 32
DEFAULT_REFINE = 10
# FAISS k-means wants 39-256 training points per list; more only slows training down.
_TRAIN_POINTS_PER_LIST = 64


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError("archive search needs FAISS: `pip install faiss-cpu` (or msa[search])") from error
    return faiss


def resolve_kind(kind: str, num_images: int) -> str:
    if kind not in VECTOR_KINDS:
        raise ValueError(f"vector index kind must be one of {VECTOR_KINDS}, got {kind!r}")
    if kind == "auto":
        return "ivfpq" if num_images >= IVF_THRESHOLD else "flat"
    return kind


def default_nlist(num_images: int) -> int:
    """About 4 sqrt(N) inverted lists (FAISS's rule of thumb), at least 1 and never more than N / 39."""
    return max(1, min(int(4 * num_images**0.5), num_images // 39))


def default_pq_subquantizers(dim: int) -> int:
    """8 dimensions per PQ sub-quantizer (96 bytes per image at D = 768), a divisor of ``dim``."""
    for candidate in range(max(1, dim // 8), 0, -1):
        if dim % candidate == 0:
            return candidate
    return 1


def train_vector_index(
    embeddings: np.ndarray, kind: str, nlist: int | None = None, pq_subquantizers: int | None = None, seed: int = 0
) -> tuple[Any, dict[str, Any]]:
    """Train and fill an IVF (``kind="ivf"``) or IVF-PQ (``"ivfpq"``) index over ``embeddings`` [N, D].

    Returns:
        ``(faiss index, parameters)``; parameters go to the manifest.
    """
    faiss = _faiss()
    num, dim = embeddings.shape
    nlist = nlist or default_nlist(num)
    description = f"IVF{nlist},Flat"
    parameters: dict[str, Any] = {"kind": kind, "nlist": nlist, "nprobe": DEFAULT_NPROBE}
    if kind == "ivfpq":
        pq_subquantizers = pq_subquantizers or default_pq_subquantizers(dim)
        # 256 centroids per sub-quantizer need at least 256 training points; tiny archives get fewer.
        bits = max(1, min(8, int(np.log2(num))))
        description = f"IVF{nlist},PQ{pq_subquantizers}x{bits}"
        parameters.update(pq_subquantizers=pq_subquantizers, pq_bits=bits, refine=DEFAULT_REFINE)
    index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
    sample = min(num, max(nlist * _TRAIN_POINTS_PER_LIST, 256 * 39 if kind == "ivfpq" else 0))
    rows = np.sort(np.random.default_rng(seed).choice(num, size=sample, replace=False))
    index.train(np.ascontiguousarray(embeddings[rows], dtype=np.float32))
    for start in range(0, num, 65536):
        index.add(np.ascontiguousarray(embeddings[start : start + 65536], dtype=np.float32))
    return index, parameters


def write_vector_index(index: Any, path: Path) -> None:
    _faiss().write_index(index, str(path))


class GlobalSearch:
    """Top-k rows by global cosine.

    Args:
        embeddings: [N, D] float16 (a memory map).
        parameters: the manifest's ``vector_index`` record (``{"kind": "flat"}`` for exact search).
        index_path: the trained IVF / IVF-PQ index file (unused for exact search).
        nprobe: inverted lists visited per query (default: the manifest's).
    """

    def __init__(
        self, embeddings: np.ndarray, parameters: dict[str, Any], index_path: Path | None, nprobe: int | None = None
    ):
        faiss = _faiss()
        self.embeddings = embeddings
        self.kind = parameters["kind"]
        self.refine = int(parameters.get("refine", 0))
        if self.kind == "flat":
            self.index = faiss.IndexFlatIP(embeddings.shape[1])
            for start in range(0, embeddings.shape[0], 65536):
                self.index.add(np.ascontiguousarray(embeddings[start : start + 65536], dtype=np.float32))
        else:
            try:  # memory-mapped inverted lists keep an IVF-Flat index out of resident memory
                self.index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP)
            except RuntimeError:
                self.index = faiss.read_index(str(index_path))
            self.index.nprobe = int(nprobe or parameters.get("nprobe", DEFAULT_NPROBE))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)``, each [Q, k] best first; rows are -1 (score -inf) where fewer than k were found."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not self.refine:
            return self.index.search(queries, k)
        _, candidates = self.index.search(queries, k * self.refine)
        return self._rescore(queries, candidates, k)

    def _rescore(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the approximate candidates from the float16 embeddings, best k kept."""
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for query, (vector, found) in enumerate(zip(queries, candidates)):
            found = np.unique(found[found >= 0])  # sorted: a forward sweep over the memory map
            exact = self.embeddings[found].astype(np.float32) @ vector
            best = np.argsort(-exact, kind="stable")[:k]
            scores[query, : len(best)] = exact[best]
            rows[query, : len(best)] = found[best]
        return scores, rows
