"""The retrieval protocol of remote-sensing image-text retrieval (RSICD, RSITMD, UCM, Sydney, NWPU).

Given a similarity matrix ``S`` [N_img, N_txt] (rows images, columns texts) and ``text_to_image`` [N_txt]:

- image -> text: the rank of image ``i`` is the best rank among its captions;
- text -> image: the rank of text ``t`` is the rank of its one image ``text_to_image[t]``;
- R@K is the percentage of queries whose rank is <= K (ranks are 1-based), mR the mean of the six R@K, and the
  median rank is ``floor(median(rank0)) + 1`` over the queries (``rank0`` 0-based, as in VSE++).

Ties are broken *against* the query, deterministically and independently of the candidates' order: the 0-based rank
is the number of wrong candidates scoring at least as high as the best correct one. For image -> text, the image's
other captions never count (any of them is a correct answer). Sorting-based code (``argsort``) instead breaks ties by
position, which rewards duplicate captions (RSICD's test split has 5465 captions but only ~3331 distinct strings)
differently depending on dataset order.

Any number of captions per image is supported (not only five in image-major order); an image without a caption is
not an image -> text query. The matrix is processed in blocks of ``chunk_size`` image rows, so the temporary
memory is O(chunk_size * N_txt) whatever the matrix size (RSICD 1093 x 5465, NWPU 3150 x 15750).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from msa.outputs import ImageFeatures, TextFeatures

Features = ImageFeatures | TextFeatures

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")


def _as_tensor(values: Any) -> torch.Tensor:
    """A tensor view of a tensor, numpy array (any strides, e.g. reversed) or sequence."""
    if isinstance(values, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(values))
    return torch.as_tensor(values)


def retrieval_ranks(
    similarity: torch.Tensor | np.ndarray,
    text_to_image: torch.Tensor | np.ndarray | Sequence[int],
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of every image query and every text query (ties against the query, see the module doc).

    Args:
        similarity: [N_img, N_txt] scores, larger is more similar (a tensor of any float dtype on any device, or a
            numpy array; no NaN).
        text_to_image: [N_txt] index of each text's image (tensor, numpy array or sequence).
        chunk_size: image rows processed at a time (temporaries of chunk_size x N_txt bytes; 256 keeps a block of
            NWPU's 15750 texts in cache: 3x faster than 1024 on the CPU of bench_eval.py).

    Returns:
        ``(i2t_ranks, t2i_ranks)``: [N_img'] (only images with at least one caption, in index order) and [N_txt],
        int64 on the CPU.
    """
    similarity = _as_tensor(similarity)
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be [N_img, N_txt], got shape {tuple(similarity.shape)}")
    if not similarity.is_floating_point():
        similarity = similarity.float()
    num_images, num_texts = similarity.shape
    owner = _as_tensor(text_to_image).to(device=similarity.device, dtype=torch.long)
    if owner.shape != (num_texts,):
        raise ValueError(f"text_to_image must have shape ({num_texts},), got {tuple(owner.shape)}")
    if num_texts and (owner.min() < 0 or owner.max() >= num_images):
        raise ValueError(f"text_to_image values must lie in [0, {num_images}), got [{owner.min()}, {owner.max()}]")
    # The sum is a cheap screen (NaN propagates); only a non-finite sum pays for the exact test.
    if not torch.isfinite(similarity.sum()) and torch.isnan(similarity).any():
        raise ValueError("similarity contains NaN; ranks would be undefined")

    # Score of every (text, its image) pair, then the best correct score of each image (-inf without a caption).
    columns = torch.arange(num_texts, device=similarity.device)
    positive_scores = similarity[owner, columns]
    best_positive = torch.full((num_images,), float("-inf"), dtype=similarity.dtype, device=similarity.device)
    best_positive = best_positive.scatter_reduce(0, owner, positive_scores, reduce="amax")
    # The captions of an image scoring exactly its best score are "at least as high" but correct: not counted.
    ties_among_positives = torch.bincount(owner[positive_scores >= best_positive[owner]], minlength=num_images)
    has_caption = torch.bincount(owner, minlength=num_images) > 0

    # One pass over blocks of contiguous rows serves both directions (column blocks would be strided). Counting a
    # bool mask through a uint8 view is several times faster than summing the bool tensor itself.
    i2t_counts = []
    t2i_counts = torch.zeros(num_texts, dtype=torch.int32, device=similarity.device)
    for start in range(0, num_images, chunk_size):
        block = similarity[start : start + chunk_size]
        best = best_positive[start : start + block.shape[0]].unsqueeze(1)
        i2t_counts.append((block >= best).view(torch.uint8).sum(dim=1, dtype=torch.int32))
        # Images scoring at least as high as the text's own image; the own image counts once, removed below.
        t2i_counts += (block >= positive_scores.unsqueeze(0)).view(torch.uint8).sum(dim=0, dtype=torch.int32)
    i2t = torch.cat(i2t_counts).long() - ties_among_positives if i2t_counts else torch.zeros(0, dtype=torch.long)
    i2t = i2t[has_caption]
    t2i = t2i_counts.long() - 1
    return i2t.long().cpu(), t2i.long().cpu()


def _recall(ranks: torch.Tensor, k: int) -> float:
    return 100.0 * (ranks < k).double().mean().item() if ranks.numel() else float("nan")


def _median_rank(ranks: torch.Tensor) -> float:
    if not ranks.numel():
        return float("nan")
    return float(torch.floor(torch.quantile(ranks.double(), 0.5)).item() + 1)


def retrieval_metrics(
    similarity: torch.Tensor | np.ndarray,
    text_to_image: torch.Tensor | np.ndarray | Sequence[int],
    chunk_size: int = 256,
) -> dict[str, float]:
    """Recall@1/5/10 both ways, mR, median and mean ranks of a similarity matrix.

    Args:
        similarity: [N_img, N_txt] scores, rows images, columns texts (tensor or numpy array).
        text_to_image: [N_txt] index of each text's image (tensor, numpy array or sequence).
        chunk_size: image rows processed at a time (bounds the temporary memory).

    Returns:
        ``i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10, mR`` (percentages), ``i2t_medr, t2i_medr`` (1-based median
        ranks), ``i2t_meanr, t2i_meanr`` (1-based mean ranks), ``num_images, num_texts`` (the query counts).
    """
    i2t, t2i = retrieval_ranks(similarity, text_to_image, chunk_size)
    metrics = {
        "i2t_r1": _recall(i2t, 1),
        "i2t_r5": _recall(i2t, 5),
        "i2t_r10": _recall(i2t, 10),
        "t2i_r1": _recall(t2i, 1),
        "t2i_r5": _recall(t2i, 5),
        "t2i_r10": _recall(t2i, 10),
    }
    metrics["mR"] = sum(metrics.values()) / 6.0
    metrics["i2t_medr"] = _median_rank(i2t)
    metrics["t2i_medr"] = _median_rank(t2i)
    metrics["i2t_meanr"] = i2t.double().mean().item() + 1 if i2t.numel() else float("nan")
    metrics["t2i_meanr"] = t2i.double().mean().item() + 1 if t2i.numel() else float("nan")
    metrics["num_images"] = float(i2t.numel())
    metrics["num_texts"] = float(t2i.numel())
    return metrics


def metrics_table(rows: dict[str, dict[str, float]], title: str = "scoring") -> str:
    """A GitHub markdown table, one row per entry of ``rows`` (e.g. per scoring mode or per seed).

    Values may be floats or ``(mean, std)`` pairs (printed ``mean ± std``).
    """
    columns = [*METRIC_KEYS, "i2t_medr", "t2i_medr"]
    lines = [f"| {title} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, values in rows.items():
        cells = []
        for key in columns:
            value = values.get(key, float("nan"))
            if isinstance(value, tuple):
                cells.append(f"{value[0]:.2f} ± {value[1]:.2f}")
            else:
                cells.append(f"{value:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ evaluating a model
SCORING_MODES = ("global", "mscmat", "fusion", "scales")
# Global top-R candidates re-scored by MSCMAT (msa.search.rerank), at each R of `rerank_depths`; asked for explicitly.
RERANK_MODE = "rerank"


def _concat_features(parts: list[Features]) -> Features:
    """Concatenate a list of ImageFeatures or TextFeatures along the batch dimension."""
    first = parts[0]
    values = {}
    for name in (f.name for f in dataclasses.fields(first)):
        items = [getattr(p, name) for p in parts]
        if items[0] is None:
            values[name] = None
        elif isinstance(items[0], list):
            values[name] = [torch.cat([item[s] for item in items]) for s in range(len(items[0]))]
        else:
            values[name] = torch.cat(items)
    return type(first)(**values)


@torch.no_grad()
def encode_split(
    model: Any,
    split: Any,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable | None = None,
) -> tuple[ImageFeatures, TextFeatures]:
    """Encode every image (once) and every caption of a :class:`~msa.data.RetrievalSplit`.

    Args:
        model: an :class:`msa.model.MSAModel` (put in eval mode here).
        autocast_dtype: run the encoders under autocast in this dtype (features are returned in float32).
        progress: optional iterable wrapper (``tqdm``).

    Returns:
        ``(ImageFeatures [N_img], TextFeatures [N_txt])`` on ``device``.
    """
    from msa.data import ImageDataset

    model.eval()
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        ImageDataset(split.image_paths, model.image_transform(train=False)),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    image_parts = []
    iterator = progress(loader, desc="encode images") if progress is not None else loader
    for images, _ in iterator:
        with autocast:
            features = model.encode_image(images.to(device))
        image_parts.append(_to_float(features))
    text_parts = []
    starts = range(0, len(split.captions), batch_size)
    iterator = progress(starts, desc="encode texts") if progress is not None else starts
    for start in iterator:
        tokens = model.tokenize(split.captions[start : start + batch_size])
        with autocast:
            features = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        text_parts.append(_to_float(features))
    return _concat_features(image_parts), _concat_features(text_parts)


def _to_float(features: Features) -> Features:
    values = {}
    for name in (f.name for f in dataclasses.fields(features)):
        value = getattr(features, name)
        if isinstance(value, list):
            values[name] = [v.float() for v in value]
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            values[name] = value.float()
        else:
            values[name] = value
    return type(features)(**values)


def evaluate_model(
    model: Any,
    split: Any,
    modes: Sequence[str] = SCORING_MODES,
    fusion_weight: float = 1.0,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    chunk_size: int = 1024,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable | None = None,
    rerank_depths: Sequence[int] = (10, 50, 100),
    timed: bool = False,
) -> dict[str, dict[str, float]]:
    """Encode a split and compute :func:`retrieval_metrics` for every scoring mode: ``{mode: metrics}``.

    Mode ``rerank`` (:data:`RERANK_MODE`) adds one row ``rerank_R`` per depth R of ``rerank_depths``, with
    ``seconds``: its scoring time after encoding (global top-R, then MSCMAT on those). With ``timed``, the
    ``global`` and ``mscmat`` rows carry ``seconds`` too (the cosine matrix; every scale's full MSCMAT matrix), so
    that the three can be compared; without it their rows are the metrics alone (deterministic, as training's logs
    and resume checks want).

    ``chunk_size`` is the image/text block of the MSCMAT scoring (``model.mscmat_similarity``); the metrics use
    their own default block.
    """
    unknown = set(modes) - set(SCORING_MODES) - {RERANK_MODE}
    if unknown:
        raise ValueError(f"unknown scoring mode(s) {sorted(unknown)}; choose from {(*SCORING_MODES, RERANK_MODE)}")
    image_features, text_features = encode_split(
        model, split, device, batch_size, num_workers, autocast_dtype, progress
    )
    owner = split.text_to_image
    results: dict[str, dict[str, float]] = {}
    # One mode at a time, so that at most three N_img x N_txt matrices live at once (NWPU test: 198 MB each).
    global_scores = None
    if "global" in modes or "fusion" in modes:
        started = time.perf_counter()
        global_scores = model.similarity(image_features, text_features).float()
        if "global" in modes:
            results["global"] = retrieval_metrics(global_scores, owner)
            if timed:
                results["global"]["seconds"] = time.perf_counter() - started
    if RERANK_MODE in modes:
        from msa.search.rerank import rerank_metrics

        results.update(rerank_metrics(model, image_features, text_features, owner, rerank_depths))
    if not {"mscmat", "fusion", "scales"} & set(modes):
        return results
    mscmat_scores = None
    started = time.perf_counter()  # the mscmat row's time includes every scale's scores (and any per-scale metrics)
    for scale in range(len(image_features.scale_features)):
        scores = model.mscmat_similarity(image_features, text_features, scale=scale, chunk_size=chunk_size).float()
        if "scales" in modes:
            results[f"mscmat_s{scale}"] = retrieval_metrics(scores, owner)
        mscmat_scores = scores if mscmat_scores is None else mscmat_scores.add_(scores)
    if "mscmat" in modes:
        results["mscmat"] = retrieval_metrics(mscmat_scores, owner)
        if timed:
            results["mscmat"]["seconds"] = time.perf_counter() - started
    if "fusion" in modes:
        results["fusion"] = retrieval_metrics(global_scores + fusion_weight * mscmat_scores, owner)
    order = ["global", *[name for name in results if name.startswith("rerank_")], "mscmat", "fusion"]
    order += [name for name in results if name.startswith("mscmat_s")]
    return {name: results[name] for name in order if name in results}
