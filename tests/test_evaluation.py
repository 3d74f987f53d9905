"""The retrieval protocol against hand-computed cases (ties, 1 and 7 captions per image, chunking)."""

import pytest
import torch

from msa.evaluation import METRIC_KEYS, metrics_table, retrieval_metrics, retrieval_ranks


def test_one_caption_per_image_hand_computed():
    # 3 images x 3 texts, text t belongs to image t.
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # image 0: its text 0 is first -> rank0 0
            [0.8, 0.3, 0.1],  # image 1: text 1 (0.3) behind text 0 (0.8) -> rank0 1
            [0.5, 0.6, 0.4],  # image 2: text 2 (0.4) behind 0.5 and 0.6 -> rank0 2
        ]
    )
    i2t, t2i = retrieval_ranks(similarity, [0, 1, 2])
    assert i2t.tolist() == [0, 1, 2]
    # text 0 column [0.9, 0.8, 0.5] -> image 0 first; text 1 [0.1, 0.3, 0.6] -> image 1 second; text 2 [0.2, 0.1, 0.4].
    assert t2i.tolist() == [0, 1, 0]
    metrics = retrieval_metrics(similarity, [0, 1, 2])
    assert metrics["i2t_r1"] == pytest.approx(100 / 3)
    assert metrics["i2t_r5"] == pytest.approx(100.0)
    assert metrics["t2i_r1"] == pytest.approx(200 / 3)
    assert metrics["mR"] == pytest.approx((100 / 3 + 100 + 100 + 200 / 3 + 100 + 100) / 6)
    assert metrics["i2t_medr"] == 2.0  # median of 0-based [0, 1, 2] is 1 -> 1-based 2
    assert metrics["t2i_meanr"] == pytest.approx(1 + 1 / 3)


def test_ties_count_against_the_query():
    # Image 0's only caption (text 0) ties with text 1 of image 1: rank0 1, whatever the column order.
    similarity = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.7, 0.7]])
    i2t, t2i = retrieval_ranks(similarity, [0, 1, 1])
    assert i2t.tolist() == [1, 0]  # image 1's two captions tie with each other: no penalty
    # text 0: column [0.5, 0.2] -> 0; text 1: [0.5, 0.7] -> 0; text 2: [0.1, 0.7] -> 0.
    assert t2i.tolist() == [0, 0, 0]
    swapped = similarity[:, [1, 0, 2]]
    i2t_swapped, _ = retrieval_ranks(swapped, [1, 0, 1])
    assert i2t_swapped.tolist() == [1, 0]
    # Two identical images: a text of either ranks its image second (pessimistic), never first by position.
    duplicate_images = torch.tensor([[0.9, 0.9], [0.9, 0.9]])
    _, t2i = retrieval_ranks(duplicate_images, [0, 1])
    assert t2i.tolist() == [1, 1]
    metrics = retrieval_metrics(duplicate_images, [0, 1])
    assert metrics["t2i_r1"] == 0.0 and metrics["t2i_r5"] == 100.0


def test_seven_captions_per_image_best_caption_counts():
    torch.manual_seed(0)
    num_images, per_image = 4, 7
    owner = torch.arange(num_images).repeat_interleave(per_image)
    similarity = torch.rand(num_images, num_images * per_image)
    # Hand-built case for image 2: put one of its captions (text 17) at the top, another (text 20) at the bottom.
    similarity[2] = 0.5
    similarity[2, 17] = 0.99
    similarity[2, 20] = 0.0
    i2t, _ = retrieval_ranks(similarity, owner)
    assert i2t[2].item() == 0
    # Brute force with explicit sorting (no ties in the random rows).
    for image in (0, 1, 3):
        order = torch.argsort(similarity[image], descending=True)
        first = next(p for p, t in enumerate(order.tolist()) if owner[t] == image)
        assert i2t[image].item() == first


def test_any_caption_order_and_images_without_captions():
    # Captions not image-major, image 3 has no caption (not a query), image 0 has one caption, image 1 three.
    owner = [1, 0, 2, 1, 1]
    similarity = torch.tensor(
        [
            [0.1, 0.9, 0.2, 0.3, 0.0],
            [0.8, 0.1, 0.2, 0.1, 0.1],
            [0.1, 0.2, 0.3, 0.4, 0.5],
            [1.0, 1.0, 1.0, 1.0, 1.0],
        ]
    )
    i2t, t2i = retrieval_ranks(similarity, owner)
    assert i2t.tolist() == [0, 0, 2]  # image 2's text 2 (0.3) is behind texts 3 and 4
    # Image 3 scores 1.0 everywhere: it beats the right image for every text; text 3 (of image 1, 0.1) is also
    # behind images 0 (0.3) and 2 (0.4).
    assert t2i.tolist() == [1, 1, 1, 3, 2]
    assert retrieval_metrics(similarity, owner)["num_images"] == 3.0


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_chunking_matches_unchunked_and_brute_force(chunk_size):
    generator = torch.Generator().manual_seed(1)
    num_images = 13
    owner = torch.randint(0, num_images, (41,), generator=generator)
    owner[:num_images] = torch.arange(num_images)
    # Quantised scores: plenty of ties.
    similarity = torch.randint(0, 5, (num_images, 41), generator=generator).float()
    i2t, t2i = retrieval_ranks(similarity, owner, chunk_size=chunk_size)
    for image in range(num_images):
        positive = owner == image
        best = similarity[image][positive].max()
        assert i2t[image].item() == int(((similarity[image] >= best) & ~positive).sum())
    for text in range(41):
        column = similarity[:, text]
        assert t2i[text].item() == int((column >= column[owner[text]]).sum()) - 1
    assert retrieval_metrics(similarity, owner, chunk_size) == retrieval_metrics(similarity, owner, 1024)
    # Any dtype: integer scores, half precision (exactly representable values here).
    assert retrieval_metrics(similarity.long(), owner, chunk_size) == retrieval_metrics(similarity, owner)
    assert retrieval_metrics(similarity.half(), owner, chunk_size) == retrieval_metrics(similarity, owner)


def test_input_checks():
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match="lie in"):
        retrieval_metrics(torch.zeros(2, 2), [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0]]), [0, 0])


def test_metrics_table_lists_every_key():
    metrics = retrieval_metrics(torch.eye(3), [0, 1, 2])
    assert metrics["mR"] == 100.0
    table = metrics_table({"global": metrics, "seeds": {k: (1.0, 0.5) for k in METRIC_KEYS}})
    assert all(key in table for key in METRIC_KEYS)
    assert "| global | 100.00" in table and "1.00 ± 0.50" in table


def test_evaluate_model_scoring_modes(synthetic_dataset):
    from msa.data import load_annotations
    from msa.evaluation import encode_split, evaluate_model
    from msa.model import create_model

    data = synthetic_dataset("ucm", num_images=15)  # train: 9 images, 45 captions
    split = load_annotations("ucm", data.data_root).split("train")
    torch.manual_seed(0)
    model = create_model("msa-tiny", backend="reference")
    results = evaluate_model(model, split, fusion_weight=0.5, batch_size=4, chunk_size=4)
    assert list(results) == ["global", "mscmat", "fusion", "mscmat_s0", "mscmat_s1", "mscmat_s2", "mscmat_s3"]
    images, texts = encode_split(model, split, batch_size=4)
    assert images.embeds.shape == (9, 64) and texts.embeds.shape == (45, 64)
    global_scores = images.embeds @ texts.embeds.T
    per_scale = [model.mscmat_similarity(images, texts, scale=s) for s in range(4)]
    expected = {
        "global": global_scores,
        "mscmat": sum(per_scale),
        "fusion": global_scores + 0.5 * sum(per_scale),
        **{f"mscmat_s{s}": m for s, m in enumerate(per_scale)},
    }
    for mode, matrix in expected.items():
        assert results[mode] == pytest.approx(retrieval_metrics(matrix, split.text_to_image)), mode
    with pytest.raises(ValueError, match="unknown scoring mode"):
        evaluate_model(model, split, modes=["bm25"])
