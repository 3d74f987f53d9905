"""MSCMAT re-ranking: global cosine picks R candidates, MSCMAT re-scores them.

Search re-ranks each query's R candidate images (one ``mscmat_scores`` call per scale, through
``MSAModel.mscmat``); evaluation applies the same rule to every query of a split in both directions
(:func:`rerank_metrics`), which is how one measures whether re-ranking is worth its time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

# A candidate's final score is RERANK_OFFSET + its MSCMAT score, above any global cosine (at most 1): within a
# query, the re-ranked candidates come first in MSCMAT order, then the rest in global order.
RERANK_OFFSET = 2.0


@torch.no_grad()
def rerank_scores(model: Any, scale_features: Sequence[torch.Tensor], text_features: Any) -> torch.Tensor:
    """Per-scale MSCMAT sigmoid scores of R candidate images against one or more texts.

    Args:
        model: an :class:`msa.model.MSAModel`.
        scale_features: the candidates' pooled features, one [R, C_s] per scale, smallest scale first.
        text_features: :class:`msa.model.TextFeatures` of T texts.

    Returns:
        [S, R, T] scores; their sum over scales is what ``model.mscmat_similarity`` ranks by.
    """
    scores = model.mscmat(
        list(scale_features), text_features.word_tokens, text_features.text_global, text_features.word_mask
    )
    return torch.stack(scores)


@torch.no_grad()
def rerank_similarities(
    model: Any,
    image_features: Any,
    text_features: Any,
    depth: int,
    global_scores: torch.Tensor | None = None,
    text_chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity matrices [N_img, N_txt] of re-ranking, one per direction.

    For text -> image, each text's top-``depth`` images by global cosine get ``RERANK_OFFSET + MSCMAT`` and the other
    images keep their cosine; for image -> text, likewise each image's top-``depth`` texts. MSCMAT is computed only
    for the candidate pairs' images, one block of ``text_chunk`` texts at a time.

    Returns:
        ``(text_to_image_scores, image_to_text_scores)``.
    """
    if depth < 1:
        raise ValueError(f"re-rank depth must be positive, got {depth}")
    if global_scores is None:
        global_scores = model.similarity(image_features, text_features).float()
    num_images, num_texts = global_scores.shape
    t2i_candidates = _top_mask(global_scores, min(depth, num_images), dim=0)
    i2t_candidates = _top_mask(global_scores, min(depth, num_texts), dim=1)
    needed = t2i_candidates | i2t_candidates
    mscmat = torch.zeros_like(global_scores)
    for start in range(0, num_texts, text_chunk):
        columns = slice(start, start + text_chunk)
        rows = needed[:, columns].any(dim=1).nonzero()[:, 0]
        if rows.numel():
            block = model.mscmat_similarity(image_features[rows], text_features[columns]).float()
            mscmat[rows, columns] = block
    t2i = torch.where(t2i_candidates, RERANK_OFFSET + mscmat, global_scores)
    i2t = torch.where(i2t_candidates, RERANK_OFFSET + mscmat, global_scores)
    return t2i, i2t


def _top_mask(scores: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    """Boolean mask of the ``count`` largest entries along ``dim``."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(dim, scores.topk(count, dim=dim).indices, True)


def rerank_metrics(
    model: Any,
    image_features: Any,
    text_features: Any,
    text_to_image: Sequence[int] | torch.Tensor,
    depths: Sequence[int] = (10, 50, 100),
) -> dict[str, dict[str, float]]:
    """Retrieval metrics of re-ranking at each depth R: ``{"rerank_R": metrics}``, with ``seconds`` (the global
    scores, the candidates and their MSCMAT scores, not the encoders).

    Image -> text metrics come from the image -> text matrix, text -> image metrics from the other; mR is their mean.
    """
    from msa.evaluation import METRIC_KEYS, retrieval_metrics

    recall_keys = METRIC_KEYS[:-1]  # the six recalls; the last key is mR, their mean

    results = {}
    for depth in depths:
        start = time.perf_counter()
        scores = model.similarity(image_features, text_features).float()
        t2i, i2t = rerank_similarities(model, image_features, text_features, depth, scores)
        seconds = time.perf_counter() - start
        by_text = retrieval_metrics(t2i, text_to_image)
        by_image = retrieval_metrics(i2t, text_to_image)
        metrics = {key: value for key, value in by_image.items() if key.startswith("i2t") or key == "num_images"}
        metrics.update({key: value for key, value in by_text.items() if key.startswith("t2i") or key == "num_texts"})
        metrics["mR"] = sum(metrics[key] for key in recall_keys) / 6.0
        metrics["seconds"] = seconds
        results[f"rerank_{depth}"] = metrics
    return results
