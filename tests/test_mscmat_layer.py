"""The fused MSCMAT layer equals the published pair-materialising computation with nn.MultiheadAttention."""

from __future__ import annotations

import pytest
import torch

from msa.mscmat import MSCMAT, mscmat_pairs_ref
from msa.ops import available_backends

CHANNELS = (16, 24, 40, 56)
BACKENDS = ["reference", *(["cpu"] if "cpu" in available_backends("cpu") else [])]


def make_layer(dim=48, heads=6, seed=0, backend="auto"):
    torch.manual_seed(seed)
    layer = MSCMAT(CHANNELS, dim=dim, num_heads=heads, backend=backend)
    # Default init leaves the biases at zero and the LayerNorms at identity; random values test every term.
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0.0, 0.3)
    return layer


def make_batch(ni, nt, length, dim=48, seed=1, masked=False):
    generator = torch.Generator().manual_seed(seed)
    features = [torch.randn(ni, channels, generator=generator) for channels in CHANNELS]
    words = torch.randn(nt, length, dim, generator=generator)
    text_global = torch.randn(nt, dim, generator=generator)
    mask = None
    if masked:
        mask = (torch.rand(nt, length, generator=generator) > 0.3).long()
        mask[:, 0] = 1  # nn.MultiheadAttention gives NaN for a text with no valid word; keep one
    return features, words, text_global, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ni,nt,length", [(5, 7, 9), (1, 13, 30), (11, 1, 3)])
def test_layer_equals_pairs_with_multihead_attention(backend, masked, ni, nt, length):
    layer = make_layer(backend=backend)
    batch = make_batch(ni, nt, length, masked=masked)
    fused = layer(*batch)
    published = mscmat_pairs_ref(layer, *batch)
    assert len(fused) == len(CHANNELS)
    for fused_scores, published_scores in zip(fused, published):
        assert fused_scores.shape == (ni, nt)
        torch.testing.assert_close(fused_scores, published_scores, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_gradients_equal_pairs(backend):
    layer = make_layer(backend=backend)
    features, words, text_global, mask = make_batch(6, 5, 8, masked=True)
    words.requires_grad_()
    weights = [torch.randn(6, 5) for _ in CHANNELS]

    def gradients(scores):
        loss = sum((s * w).sum() for s, w in zip(scores, weights))
        return torch.autograd.grad(loss, [words, *layer.parameters()])

    fused = gradients(layer(features, words, text_global, mask))
    published = gradients(mscmat_pairs_ref(layer, features, words, text_global, mask))
    for fused_grad, published_grad in zip(fused, published):
        torch.testing.assert_close(fused_grad, published_grad, rtol=1e-4, atol=1e-5)


def test_layer_holds_the_published_parameters():
    layer = make_layer(dim=48, heads=6)
    names = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert names["image_query_norm.weight"] == (48,) and names["word_norm.weight"] == (48,)
    for index, channels in enumerate(CHANNELS):
        assert names[f"scales.{index}.fc.weight"] == (48, channels)
        assert names[f"scales.{index}.attn.in_proj_weight"] == (3 * 48, 48)
        assert names[f"scales.{index}.attn.in_proj_bias"] == (3 * 48,)
        assert names[f"scales.{index}.attn.out_proj.weight"] == (48, 48)
        assert names[f"scales.{index}.match_fc.weight"] == (1, 48)
    assert len(names) == 4 + len(CHANNELS) * 8


def test_fully_masked_text_scores_its_bias_terms():
    layer = make_layer()
    features, words, text_global, mask = make_batch(3, 4, 5, masked=True)
    mask[2] = 0
    logits = layer(features, words, text_global, mask, return_logits=True)
    for feature, scale, scale_logits in zip(features, layer.scales, logits):
        g = scale.match_fc.weight[0] * scale.fc(feature)
        expected = g @ scale.attn.out_proj.bias + scale.match_fc.bias + g @ text_global[2]
        torch.testing.assert_close(scale_logits[:, 2], expected)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda layer, f, w, t: layer(f[:3], w, t), "expected 4 scale features, got 3"),
        (lambda layer, f, w, t: layer(f, w[..., :5], t), r"word_tokens must be \[Nt, L, 48\]"),
        (lambda layer, f, w, t: layer(f, w, t[:2]), r"text_global must be \[Nt=4, 48\]"),
        (lambda layer, f, w, t: layer([f[0], f[1][:2], f[2], f[3]], w, t), r"scale_features\[1\] must be \[Ni=3, 24\]"),
    ],
)
def test_layer_bad_inputs(call, message):
    layer = make_layer()
    features, words, text_global, _ = make_batch(3, 4, 5)
    with pytest.raises(ValueError, match=message):
        call(layer, features, words, text_global)


def test_unknown_backend_is_rejected_when_the_layer_is_built():
    with pytest.raises(ValueError, match="unknown mscmat_scores backend 'gpu'"):
        MSCMAT(CHANNELS, dim=48, num_heads=6, backend="gpu")
    layer = make_layer(backend="reference")
    with pytest.raises(ValueError, match="unknown mscmat_scores backend"):
        layer.backend = "fastest"
    assert layer.backend == "reference"
    layer.backend = "auto"
    features, words, text_global, _ = make_batch(2, 3, 5)
    assert layer(features, words, text_global)[0].shape == (2, 3)
