"""Re-ranking as an evaluation scoring mode: global top-R candidates, MSCMAT on those R, both directions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from search_fixtures import pattern

pytest.importorskip("timm")

from msa.data import RetrievalSplit  # noqa: E402
from msa.evaluation import evaluate_model, retrieval_metrics  # noqa: E402
from msa.search.models import load_model  # noqa: E402
from msa.search.rerank import RERANK_OFFSET, rerank_similarities  # noqa: E402

CAPTIONS = ["planes near a terminal", "a river in farmland", "dense houses", "a stadium", "a beach with waves"]


@pytest.fixture(scope="module")
def model():
    return load_model("msa-tiny")


@pytest.fixture(scope="module")
def features(model):
    torch.manual_seed(0)
    images = model.encode_image(torch.randn(7, 3, 64, 64))
    tokens = model.tokenize([CAPTIONS[i % 5] + f" {i}" for i in range(11)])
    with torch.no_grad():
        return images, model.encode_text(tokens["input_ids"], tokens["attention_mask"])


@pytest.mark.parametrize("depth", [1, 3, 100])
def test_rerank_matrices_follow_the_rule(model, features, depth):
    images, texts = features
    with torch.no_grad():
        cosine = model.similarity(images, texts)
        mscmat = model.mscmat_similarity(images, texts)
    t2i, i2t = rerank_similarities(model, images, texts, depth, text_chunk=4)
    for j in range(cosine.shape[1]):  # each text: its top-depth images by cosine get offset + MSCMAT
        top = set(cosine[:, j].topk(min(depth, 7)).indices.tolist())
        for i in range(cosine.shape[0]):
            expected = RERANK_OFFSET + mscmat[i, j] if i in top else cosine[i, j]
            assert t2i[i, j].item() == pytest.approx(expected.item(), abs=1e-5)
    for i in range(cosine.shape[0]):  # each image: its top-depth texts
        top = set(cosine[i].topk(min(depth, 11)).indices.tolist())
        for j in range(cosine.shape[1]):
            expected = RERANK_OFFSET + mscmat[i, j] if j in top else cosine[i, j]
            assert i2t[i, j].item() == pytest.approx(expected.item(), abs=1e-5)


def test_rerank_mode_in_evaluate_model(model, tmp_path: Path):
    from PIL import Image

    paths = []
    for index in range(6):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(pattern(index)).save(paths[-1])
    owner = [i // 2 for i in range(12)]
    split = RetrievalSplit("synthetic", "test", paths, [CAPTIONS[i % 5] + f" {i}" for i in range(12)], owner)
    results = evaluate_model(model, split, modes=["global", "rerank", "mscmat"], rerank_depths=(2, 12), batch_size=4)
    assert list(results) == ["global", "rerank_2", "rerank_12", "mscmat"]
    # Re-ranking every candidate is full MSCMAT; recalls are then those of the mscmat row.
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "mR"):
        assert results["rerank_12"][key] == pytest.approx(results["mscmat"][key]), key
    assert results["rerank_2"]["seconds"] > 0 and "seconds" not in results["global"]
    timed = evaluate_model(model, split, modes=["global", "rerank", "mscmat"], rerank_depths=(2,), timed=True)
    assert list(timed) == ["global", "rerank_2", "mscmat"] and all(row["seconds"] > 0 for row in timed.values())
    with pytest.raises(ValueError, match="rerank"):
        evaluate_model(model, split, modes=["bm25"])
    assert set(retrieval_metrics(torch.eye(6, 12), owner)) <= set(results["rerank_2"]) | {"seconds"}
