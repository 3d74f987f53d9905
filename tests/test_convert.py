"""The converter: published-style modules (torchvision ResNet, nn.MultiheadAttention per scale, a BertModel), randomly
initialised, give the same embeddings and scores as the converted model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msa.configs import TINY_BERT, get_config
from msa.convert import from_official, official_key_map

torchvision = pytest.importorskip("torchvision")

DIM, HEADS, CHANNELS = 64, 4, (64, 128, 256, 512)


class PublishedCrossAtt(nn.Module):
    """The published MSCMAT module's parameter layout."""

    def __init__(self):
        super().__init__()
        for s, channels in enumerate(CHANNELS, start=1):
            setattr(self, f"fc{s}", nn.Linear(channels, DIM))
            setattr(self, f"cross_attn{s}", nn.MultiheadAttention(DIM, HEADS))
            setattr(self, f"match_fc{s}", nn.Linear(DIM, 1))
        self.ln_pre_t = nn.LayerNorm(DIM)
        self.ln_pre_i = nn.LayerNorm(DIM)
        self.ln_post = nn.LayerNorm(DIM)

    def scores(self, pooled, words, text_global):
        """Sequence-first attention on one pair at a time, as published."""
        matrices = []
        for s, feature in enumerate(pooled, start=1):
            fc, attn, match_fc = getattr(self, f"fc{s}"), getattr(self, f"cross_attn{s}"), getattr(self, f"match_fc{s}")
            matrix = torch.empty(feature.shape[0], words.shape[0])
            for i in range(feature.shape[0]):
                q_raw = fc(feature[i : i + 1])
                for j in range(words.shape[0]):
                    keys = self.ln_pre_i(words[j : j + 1]).transpose(0, 1)  # [L, 1, D]
                    attended = attn(self.ln_pre_t(q_raw)[None], keys, keys)[0][0]
                    matrix[i, j] = torch.sigmoid(match_fc((attended + text_global[j : j + 1]) * q_raw))[0, 0]
            matrices.append(matrix)
        return matrices


class PublishedImageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.feature_extractor = torchvision.models.resnet18(weights=None)
        for s, channels in enumerate(CHANNELS, start=1):
            setattr(self, f"fc{s}", nn.Linear(channels, DIM))

    def forward(self, images):
        net = self.feature_extractor
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        pooled = []
        for index, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
            x = layer(x)
            pooled.append((F.adaptive_avg_pool2d if index == 3 else F.adaptive_max_pool2d)(x, 1).flatten(1))
        return sum(getattr(self, f"fc{s}")(p) for s, p in enumerate(pooled, start=1)), pooled


class PublishedImageMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.att, self.fc2 = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

    def forward(self, features):
        hidden = self.fc(features)
        return F.normalize(self.fc2(hidden * torch.sigmoid(self.att(hidden))), dim=-1)


class PublishedTextModel(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        values = {key: value for key, value in TINY_BERT.items() if key != "model_type"}
        self.bert_model = BertModel(BertConfig(**values))

    def forward(self, input_ids, attention_mask):
        states = self.bert_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(states[:, 0], dim=-1), states[:, 1:]


@pytest.fixture(scope="module")
def published():
    torch.manual_seed(0)
    modules = {
        "crossatt": PublishedCrossAtt(),
        "img_model": PublishedImageModel(),
        "img_map": PublishedImageMap(),
        "text_model": PublishedTextModel(),
    }
    for module in modules.values():
        module.eval()
        for parameter in module.parameters():
            # Non-trivial LayerNorm/BN affine parameters and biases, so that a mis-mapped key shows.
            parameter.data.add_(0.05 * torch.randn_like(parameter))
    return modules


def test_converted_model_reproduces_the_published_modules(published):
    config = get_config("msa-tiny", image_backbone="resnet18", preset="improved")
    states = {name: module.state_dict() for name, module in published.items()}
    model = from_official(**states, config=config).eval()
    assert model.config.preset == "paper" and not model.config.use_word_mask and model.logit_scale is None

    torch.manual_seed(1)
    images = torch.randn(3, 3, 64, 64)
    tokens = model.tokenize(["a plane on the runway", "a river", "dense houses with trees and a road"])
    with torch.no_grad():
        output = model(images, tokens["input_ids"], tokens["attention_mask"])
        fused, pooled = published["img_model"](images)
        image_embeds = published["img_map"](fused)
        text_embeds, words = published["text_model"](tokens["input_ids"], tokens["attention_mask"])
        scores = published["crossatt"].scores(pooled, words, text_embeds)
    torch.testing.assert_close(output.image_embeds, image_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.text_embeds, text_embeds, rtol=1e-5, atol=1e-6)
    for actual, expected in zip(output.scale_scores, scores):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_partial_conversion_keeps_the_rest(published):
    config = get_config("msa-tiny", image_backbone="resnet18")
    torch.manual_seed(5)
    model = from_official(img_map=published["img_map"].state_dict(), config=config, backend="reference")
    assert model.backend == "reference" and model.config.preset == "paper"
    torch.testing.assert_close(model.image_encoder.gated_map.gate.weight, published["img_map"].att.weight)
    assert not torch.allclose(model.mscmat.scales[0].fc.weight[:, :64], published["crossatt"].fc1.weight[:, :64])


def test_data_parallel_prefix_and_dropped_keys(published):
    state = {"module." + key: value for key, value in published["crossatt"].state_dict().items()}
    renamed = official_key_map("crossatt", state)
    assert "mscmat.scales.3.attn.in_proj_weight" in renamed and "mscmat.word_norm.bias" in renamed
    assert not any("ln_post" in key for key in renamed)


def test_bad_checkpoints_raise(published):
    config = get_config("msa-tiny", image_backbone="resnet18")
    state = dict(published["crossatt"].state_dict())
    state["extra_layer.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra_layer"):
        from_official(crossatt=state, config=config)
    incomplete = {k: v for k, v in published["crossatt"].state_dict().items() if not k.startswith("match_fc2")}
    with pytest.raises(ValueError, match=r"missing \[.*scales\.1\.match_fc"):
        from_official(crossatt=incomplete, config=config)
    with pytest.raises(ValueError, match="shape mismatches"):
        from_official(img_model=published["img_model"].state_dict(), config=get_config("msa-tiny"))  # resnet10t
