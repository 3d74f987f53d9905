"""The paper preset reproduces the published computation: a direct, loop-based re-implementation of the published code
(pairs materialised one by one, nn.MultiheadAttention, fixed-kernel pools, the published losses and reductions) gives
the same embeddings, score matrices, loss value and gradients as the model to float32 round-off."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msa
from msa.losses import msa_loss

CAPTIONS = [
    "many planes are parked next to a long building in an airport",
    "a river with green banks",
    "several buildings and green trees are around a playground",
    "a bridge is over a river with some boats",
    "the storage tanks are near the harbour",
]


@pytest.fixture(scope="module")
def model() -> msa.MSAModel:
    torch.manual_seed(0)
    model = msa.create_model("msa-tiny", preset="paper", pool_mode="fixed")
    return model.eval()


@pytest.fixture(scope="module")
def batch(model):
    torch.manual_seed(1)
    images = torch.randn(len(CAPTIONS), 3, 64, 64)
    tokens = model.tokenize(CAPTIONS)
    return images, tokens["input_ids"], tokens["attention_mask"]


def published_image_side(model, images):
    """ResNet stages -> MaxPool2d/AvgPool2d with kernels = the map size at 224 px scaled to this size -> fc1..fc4,
    summed -> fc, att, fc2 gated map -> l2norm."""
    encoder = model.image_encoder
    maps = encoder.backbone(images)
    maps = maps[len(maps) - 4 :]
    pools = [nn.MaxPool2d(maps[0].shape[-1]), nn.MaxPool2d(maps[1].shape[-1]), nn.MaxPool2d(maps[2].shape[-1])]
    pools.append(nn.AvgPool2d(maps[3].shape[-1]))
    pooled = [pool(feature_map).view(feature_map.shape[0], -1) for pool, feature_map in zip(pools, maps)]
    fused = encoder.scale_fcs[0](pooled[0])
    for fc, feature in zip(list(encoder.scale_fcs)[1:], pooled[1:]):
        fused = fused + fc(feature)
    gated = encoder.gated_map
    hidden = fused @ gated.input_proj.weight.T + gated.input_proj.bias
    attention = torch.sigmoid(hidden @ gated.gate.weight.T + gated.gate.bias)
    embeds = (hidden * attention) @ gated.output_proj.weight.T + gated.output_proj.bias
    embeds = embeds / embeds.norm(dim=1, keepdim=True)
    return embeds, pooled


def published_text_side(model, input_ids, attention_mask):
    states = model.text_encoder.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    cls = states[:, 0]
    return cls / cls.norm(dim=1, keepdim=True), states[:, 1:]


def published_scores_by_loop(model, pooled, words, text_global):
    """One (image, text) pair at a time through nn.MultiheadAttention with no mask, as published."""
    layer = model.mscmat
    ni, nt = pooled[0].shape[0], words.shape[0]
    matrices = []
    for scale, feature in zip(layer.scales, pooled):
        matrix = torch.empty(ni, nt)
        for i in range(ni):
            q_raw = scale.fc(feature[i : i + 1])  # [1, D]
            query = layer.image_query_norm(q_raw)[:, None]  # [1, 1, D]
            for j in range(nt):
                keys = layer.word_norm(words[j : j + 1])  # [1, L, D]
                attended = scale.attn(query, keys, keys, need_weights=False)[0][:, 0]
                matrix[i, j] = torch.sigmoid(scale.match_fc((attended + text_global[j : j + 1]) * q_raw))[0, 0]
        matrices.append(matrix)
    return matrices


def published_loss(image_embeds, text_embeds, scale_scores):
    # Triplet, VSE++ max violation on cosine similarities, margin 0.5, summed.
    scores = image_embeds @ text_embeds.T
    diagonal = scores.diag().view(-1, 1)
    cost_text = (0.5 + scores - diagonal.expand_as(scores)).clamp(min=0)
    cost_image = (0.5 + scores - diagonal.T.expand_as(scores)).clamp(min=0)
    eye = torch.eye(scores.shape[0], dtype=torch.bool)
    cost_text = cost_text.masked_fill(eye, 0).max(1)[0]
    cost_image = cost_image.masked_fill(eye, 0).max(0)[0]
    triplet = cost_text.sum() + cost_image.sum()
    # Alignment: cross-entropy on the sigmoid scores, image -> text, summed over scales.
    targets = torch.arange(scores.shape[0])
    alignment = sum(F.cross_entropy(matrix, targets) for matrix in scale_scores)
    # Consistency: deepest scale (detached) teaches, softmax over images with tau = 2, kl_div(log teacher, student).
    teacher = F.softmax(scale_scores[-1].detach() / 2, dim=0)
    consistency = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for matrix in scale_scores[:-1]:
            consistency = consistency + F.kl_div(torch.log(teacher), F.softmax(matrix / 2, dim=0), reduction="mean")
    return triplet + 15 * alignment + 10 * consistency, triplet, alignment, consistency


def test_paper_model_matches_published_computation(model, batch):
    images, input_ids, attention_mask = batch
    output = model(images, input_ids, attention_mask)
    assert output.logit_scale is None

    image_embeds, pooled = published_image_side(model, images)
    text_embeds, words = published_text_side(model, input_ids, attention_mask)
    torch.testing.assert_close(output.image_embeds, image_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.text_embeds, text_embeds, rtol=1e-5, atol=1e-6)
    assert words.shape[1] == 30  # published: 31 tokens, [CLS] dropped, [SEP] and padding kept

    expected_scores = published_scores_by_loop(model, pooled, words, text_embeds)
    assert len(output.scale_scores) == 4
    for actual, expected in zip(output.scale_scores, expected_scores):
        assert actual.shape == (len(CAPTIONS), len(CAPTIONS))
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_paper_loss_and_gradients_match_published(model, batch):
    images, input_ids, attention_mask = batch
    output = model(images, input_ids, attention_mask)
    loss = msa_loss(output, preset="paper")

    image_embeds, pooled = published_image_side(model, images)
    text_embeds, words = published_text_side(model, input_ids, attention_mask)
    scores = published_scores_by_loop(model, pooled, words, text_embeds)
    total, triplet, alignment, consistency = published_loss(image_embeds, text_embeds, scores)

    torch.testing.assert_close(loss.triplet, triplet, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.alignment, alignment, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.consistency, consistency, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(loss.total, total, rtol=1e-5, atol=1e-6)
    assert loss.consistency > 0

    checked = {
        "mscmat.scales.1.attn.in_proj_weight": None,
        "mscmat.scales.3.match_fc.weight": None,
        "image_encoder.gated_map.gate.weight": None,
        "text_encoder.model.encoder.layer.0.attention.self.query.weight": None,
    }
    parameters = dict(model.named_parameters())
    grads_model = torch.autograd.grad(loss.total, [parameters[name] for name in checked])
    grads_published = torch.autograd.grad(total, [parameters[name] for name in checked])
    for name, actual, expected in zip(checked, grads_model, grads_published):
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_pair_materialising_reference_agrees(model, batch):
    """The pair-batched reference (used by the benchmarks) is the same published computation."""
    images, input_ids, attention_mask = batch
    with torch.no_grad():
        image_features = model.encode_image(images)
        text_features = model.encode_text(input_ids, attention_mask)
        fused = model.mscmat(image_features.scale_features, text_features.word_tokens, text_features.text_global)
        pairs = msa.mscmat.mscmat_pairs_ref(
            model.mscmat, image_features.scale_features, text_features.word_tokens, text_features.text_global
        )
    for actual, expected in zip(fused, pairs):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
