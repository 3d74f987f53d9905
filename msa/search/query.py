"""Search an archive index by text or by example image: ``msa-search --index DIR "planes near a terminal"``.

Text search encodes the query, takes the top ``--rerank`` images by global cosine, re-scores them with MSCMAT (the
sum over scales of its sigmoid scores, as ``MSAModel.mscmat_similarity``; one ``mscmat_scores`` call per scale) and
prints the best ``--top-k``. ``--rerank 0`` ranks by global cosine only; ``--image PATH`` searches by an example
image (global cosine).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msa.search.models import load_model, model_fingerprint
from msa.search.rerank import rerank_scores
from msa.search.storage import (
    EMBEDDINGS_NAME,
    METADATA_NAME,
    VECTORS_NAME,
    ModelMismatchError,
    SearchIndexError,
    connect_read_only,
    open_matrix,
    read_manifest,
    scale_name,
)
from msa.search.vectors import GlobalSearch

logger = logging.getLogger("msa.search.query")

TEXT_BATCH = 64


@dataclass
class Hit:
    """One result: ``row`` of the index, ``path`` relative to the image folder, the final ``score`` (MSCMAT sum when
    re-ranked, else the global cosine), ``global_score`` (cosine) and ``scale_scores`` (MSCMAT per scale, smallest
    scale first; empty when not re-ranked)."""

    row: int
    path: str
    score: float
    global_score: float
    scale_scores: list[float]


class Searcher:
    """An opened index with its model, ready to answer queries.

    Args:
        index_dir: the folder written by ``msa-index build``.
        model: an :class:`msa.model.MSAModel`, a checkpoint folder or a named config; None: the one recorded in
            the manifest.
        device: where the model runs.
        nprobe: IVF lists visited per query (default: the manifest's).

    Raises:
        SearchIndexError: the index is missing, foreign, truncated, or was built with another model.
    """

    def __init__(self, index_dir: str | Path, *, model: Any = None, device: str = "cpu", nprobe: int | None = None):
        self.manifest = read_manifest(index_dir)
        self.device = torch.device(device)
        if model is None or isinstance(model, (str, Path)):
            model = load_model(str(model or self.manifest.values["model"]["spec"]), self.device)
        self.model = model.to(self.device).eval()
        fingerprint = model_fingerprint(self.model)
        if fingerprint != self.manifest.fingerprint:
            raise ModelMismatchError(
                f"{self.manifest.directory} was built with model {self.manifest.values['model']['spec']} "
                f"(fingerprint {self.manifest.fingerprint[:12]}), not with the model given "
                f"(fingerprint {fingerprint[:12]}); search with the index's model or rebuild the index"
            )
        self.embeddings = open_matrix(self.manifest, EMBEDDINGS_NAME)
        self.scale_features = [open_matrix(self.manifest, scale_name(s)) for s in range(self.num_scales)]
        self.vectors = GlobalSearch(
            self.embeddings, self.manifest.values["vector_index"], self.manifest.generation_dir / VECTORS_NAME, nprobe
        )
        self._metadata = connect_read_only(self.manifest.generation_dir / METADATA_NAME)
        self.transform = self.model.image_transform(train=False)

    @property
    def num_images(self) -> int:
        return self.manifest.num_images

    @property
    def num_scales(self) -> int:
        return len(self.manifest.scale_channels)

    @property
    def images_root(self) -> Path:
        return self.manifest.images_root

    def image_path(self, row: int) -> Path:
        """The file of an indexed row (the only way a caller gets from a result to the file system).

        Raises:
            KeyError: ``row`` is not a row of the index.
        """
        path = self._paths([row]).get(row) if isinstance(row, int) and not isinstance(row, bool) else None
        if path is None:
            raise KeyError(f"row {row!r} is not in the index (0 <= row < {self.num_images})")
        return self.images_root / path

    def _paths(self, rows: list[int]) -> dict[int, str]:
        found = {}
        for start in range(0, len(rows), 500):  # SQLite's bound-parameter limit
            chunk = rows[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT row, path FROM images WHERE row IN ({marks})"
            found.update(self._metadata.execute(query, chunk).fetchall())
        return found

    @torch.no_grad()
    def search(self, queries: list[str], top_k: int = 10, rerank: int = 100) -> list[list[Hit]]:
        """The best ``top_k`` images of each query, best first.

        Args:
            queries: query texts (non-empty strings), encoded in batches.
            top_k: results per query (at least 1).
            rerank: candidates taken by global cosine and re-scored with MSCMAT (0: global cosine only; else at
                least ``top_k``).
        """
        if isinstance(queries, str) or not queries:
            raise ValueError("queries must be a non-empty list of strings")
        if any(not isinstance(q, str) or not q.strip() for q in queries):
            raise ValueError("every query must be a non-empty string")
        _check_counts(top_k, rerank)
        if self.num_images == 0:
            return [[] for _ in queries]
        text_parts = []
        for start in range(0, len(queries), TEXT_BATCH):
            tokens = self.model.tokenize(queries[start : start + TEXT_BATCH])
            text_parts.append(
                self.model.encode_text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
            )
        depth = min(max(rerank, top_k), self.num_images)
        embeds = torch.cat([part.embeds for part in text_parts]).float().cpu().numpy()
        scores, rows = self.vectors.search(embeds, depth)
        results = []
        for query in range(len(queries)):
            part, offset = divmod(query, TEXT_BATCH)
            text = text_parts[part][offset : offset + 1]
            found = rows[query] >= 0
            if rerank:
                results.append(self._reranked(rows[query][found], scores[query][found], text, top_k))
            else:
                results.append(self._hits(rows[query][found][:top_k], scores[query][found][:top_k]))
        return results

    def _reranked(self, rows: np.ndarray, global_scores: np.ndarray, text: Any, top_k: int) -> list[Hit]:
        order = np.argsort(rows)  # a forward sweep over the memory maps
        features = [
            torch.from_numpy(np.asarray(matrix[rows[order]], dtype=np.float32)).to(self.device)
            for matrix in self.scale_features
        ]
        per_scale = rerank_scores(self.model, features, text)[:, :, 0].cpu()
        per_scale = per_scale[:, np.argsort(order)]  # back to the candidates' order
        final = per_scale.sum(0).numpy()
        best = np.argsort(-final, kind="stable")[:top_k]
        return self._hits(rows[best], final[best], global_scores[best], per_scale[:, best].T.tolist())

    def _hits(
        self,
        rows: np.ndarray,
        scores: np.ndarray,
        global_scores: np.ndarray | None = None,
        scale_scores: list[list[float]] | None = None,
    ) -> list[Hit]:
        rows = [int(r) for r in rows]
        paths = self._paths(rows)
        global_scores = scores if global_scores is None else global_scores
        return [
            Hit(row, paths[row], float(score), float(cosine), list(scale_scores[i]) if scale_scores else [])
            for i, (row, score, cosine) in enumerate(zip(rows, scores, global_scores))
        ]

    @torch.no_grad()
    def search_image(self, path: str | Path, top_k: int = 10) -> list[Hit]:
        """The ``top_k`` indexed images closest to an example image by global cosine (decoded and resized as
        training does).

        Raises:
            msa.data.ImageLoadError: the image cannot be read.
        """
        from msa.data import load_image

        _check_counts(top_k, 0)
        if self.num_images == 0:
            return []
        pixels = self.transform(load_image(path))[None].to(self.device)
        embeds = self.model.encode_image(pixels).embeds.float().cpu().numpy()
        scores, rows = self.vectors.search(embeds, min(top_k, self.num_images))
        found = rows[0] >= 0
        return self._hits(rows[0][found], scores[0][found])


def _check_counts(top_k: int, rerank: int) -> None:
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if not isinstance(rerank, int) or rerank < 0:
        raise ValueError(f"rerank must be 0 or a positive integer, got {rerank!r}")
    if 0 < rerank < top_k:
        raise ValueError(f"rerank ({rerank}) must be 0 (global only) or at least top_k ({top_k})")


# ------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msa-search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("query", nargs="*", help="query text(s)")
    add("--index", required=True, help="index folder written by msa-index build")
    add("--queries", help="file with one query per line (searched in batches)")
    add("--image", help="search by this example image instead of text (global cosine)")
    add("--top-k", type=int, default=10, help="results per query (default 10)")
    add("--rerank", type=int, default=100, help="candidates re-scored with MSCMAT (0: global only; default 100)")
    add("--model", help="checkpoint folder or named config (default: the one the index was built with)")
    add("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    add("--nprobe", type=int, help="IVF lists visited per query (default: the index's)")
    add("--json", action="store_true", help="print JSON (one object per query) instead of a table")
    add("--debug", action="store_true", help="show tracebacks")
    return parser


def _read_queries(args: argparse.Namespace) -> list[str]:
    queries = list(args.query)
    if args.queries:
        try:
            lines = Path(args.queries).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise _UsageError(f"--queries {args.queries}: {error}") from None
        queries += [line.strip() for line in lines if line.strip()]
    if args.image and queries:
        raise _UsageError("--image searches by an image: give no query text with it")
    if not args.image and not queries:
        raise _UsageError("no query: give a query text, --queries FILE or --image PATH")
    if any(not q.strip() for q in queries):
        raise _UsageError("query: empty query text")
    return queries


class _UsageError(Exception):
    pass


def _print_results(queries: list[str], results: list[list[Hit]], as_json: bool) -> None:
    if as_json:
        for query, hits in zip(queries, results):
            print(json.dumps({"query": query, "hits": [asdict(hit) for hit in hits]}))
        return
    for query, hits in zip(queries, results):
        print(f"# {query}")
        print("| rank | score | global | per scale | path |")
        print("|---:|---:|---:|---|---|")
        for rank, hit in enumerate(hits, 1):
            scales = " ".join(f"{s:.3f}" for s in hit.scale_scores) or "-"
            print(f"| {rank} | {hit.score:.4f} | {hit.global_score:.4f} | {scales} | {hit.path} |")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    try:
        queries = _read_queries(args)
        _check_counts(args.top_k, args.rerank)
        searcher = Searcher(args.index, model=args.model, device=args.device, nprobe=args.nprobe)
        if args.image:
            from msa.data import ImageLoadError

            try:
                results = [searcher.search_image(args.image, args.top_k)]
            except ImageLoadError as error:
                raise _UsageError(f"--image: {error}") from None
            queries = [args.image]
        else:
            results = searcher.search(queries, args.top_k, args.rerank)
    except (_UsageError, SearchIndexError, ValueError) as error:
        if args.debug:
            raise
        print(f"msa-search: {_flag_prefix(error, args)}{error}", file=sys.stderr)
        return 2
    _print_results(queries, results, args.json)
    return 0


def _flag_prefix(error: Exception, args: argparse.Namespace) -> str:
    if isinstance(error, SearchIndexError):
        return f"--index {args.index}: "
    if isinstance(error, ValueError) and str(error).startswith(("top_k", "rerank")):
        return "--top-k/--rerank: "
    return ""


if __name__ == "__main__":
    sys.exit(main())
