"""Convert the published MSA code's module state dicts into an :class:`msa.model.MSAModel` (paper preset).

The published code keeps four modules, saved separately (argument: published keys -> keys here):

- ``crossatt``: ``fc{s}``, ``cross_attn{s}.{in_proj_weight, in_proj_bias, out_proj.*}``, ``match_fc{s}`` ->
  ``mscmat.scales[s-1].{fc, attn, match_fc}``; ``ln_pre_t`` -> ``mscmat.image_query_norm``; ``ln_pre_i`` ->
  ``mscmat.word_norm``; ``ln_post`` is unused by the published forward pass and dropped.
- ``img_model``: ``feature_extractor.*`` (torchvision ResNet) -> ``image_encoder.backbone.*`` (timm's ResNet names
  equal torchvision's; ``fc`` dropped); ``fc{s}`` -> ``image_encoder.scale_fcs[s-1]``.
- ``img_map``: ``fc``, ``att``, ``fc2`` -> ``image_encoder.gated_map.{input_proj, gate, output_proj}``.
- ``text_model``: ``bert_model.*`` (a transformers BertModel) -> ``text_encoder.model.*`` (pooler dropped).

Command line::

    python -m msa.convert --crossatt crossatt.pth --img-model img.pth --img-map map.pth --text-model text.pth \\
        --config msa-resnet50-bert --out converted/
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from msa.configs import MSAConfig, get_config

__all__ = ["from_official", "official_key_map"]

StateDict = Mapping[str, torch.Tensor]

# Published keys that have no counterpart here (unused in the published forward pass, or buffers transformers
# recomputes).
_DROPPED = (
    re.compile(r"^ln_post\."),
    re.compile(r"^feature_extractor\.fc\."),
    re.compile(r"^bert_model\.pooler\."),
    re.compile(r"^bert_model\.embeddings\.position_ids$"),
    re.compile(r"num_batches_tracked$"),
)


def _strip_wrappers(state: StateDict) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` prefix of (Distributed)DataParallel checkpoints."""
    return {key[len("module.") :] if key.startswith("module.") else key: value for key, value in state.items()}


def _crossatt_key(key: str) -> str | None:
    match = re.match(r"^(fc|cross_attn|match_fc)(\d+)\.(.+)$", key)
    if match:
        name, scale, rest = match.groups()
        target = {"fc": "fc", "cross_attn": "attn", "match_fc": "match_fc"}[name]
        return f"mscmat.scales.{int(scale) - 1}.{target}.{rest}"
    for published, ours in (("ln_pre_t.", "mscmat.image_query_norm."), ("ln_pre_i.", "mscmat.word_norm.")):
        if key.startswith(published):
            return ours + key[len(published) :]
    return None


def _img_model_key(key: str) -> str | None:
    if key.startswith("feature_extractor."):
        return "image_encoder.backbone." + key[len("feature_extractor.") :]
    match = re.match(r"^fc(\d+)\.(.+)$", key)
    if match:
        return f"image_encoder.scale_fcs.{int(match.group(1)) - 1}.{match.group(2)}"
    return None


def _img_map_key(key: str) -> str | None:
    match = re.match(r"^(fc|att|fc2)\.(.+)$", key)
    if match:
        target = {"fc": "input_proj", "att": "gate", "fc2": "output_proj"}[match.group(1)]
        return f"image_encoder.gated_map.{target}.{match.group(2)}"
    return None


def _text_model_key(key: str) -> str | None:
    if key.startswith("bert_model."):
        return "text_encoder.model." + key[len("bert_model.") :]
    return None


_PARTS: dict[str, tuple[Callable[[str], str | None], str]] = {
    # argument -> (key map, prefix of the model keys the part must cover entirely)
    "crossatt": (_crossatt_key, "mscmat."),
    "img_model": (_img_model_key, "image_encoder."),
    "img_map": (_img_map_key, "image_encoder.gated_map."),
    "text_model": (_text_model_key, "text_encoder.model."),
}


def official_key_map(part: str, state: StateDict) -> dict[str, torch.Tensor]:
    """Rename one published module's state dict (``part`` in crossatt, img_model, img_map, text_model) to this
    package's keys. Keys the published forward pass never uses are dropped; any other unknown key raises."""
    if part not in _PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {sorted(_PARTS)}")
    key_map = _PARTS[part][0]
    renamed, unknown = {}, []
    for key, value in _strip_wrappers(state).items():
        if any(pattern.search(key) for pattern in _DROPPED):
            continue
        target = key_map(key)
        if target is None:
            unknown.append(key)
        else:
            renamed[target] = value
    if unknown:
        raise ValueError(f"{part}: keys the converter does not know: {unknown[:20]}")
    return renamed


def _load(source: StateDict | str | None) -> dict[str, torch.Tensor] | None:
    if source is None or isinstance(source, Mapping):
        return source
    state = torch.load(source, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def from_official(
    crossatt: StateDict | str | None = None,
    img_model: StateDict | str | None = None,
    img_map: StateDict | str | None = None,
    text_model: StateDict | str | None = None,
    config: str | MSAConfig = "msa-resnet50-bert",
    backend: str = "auto",
    **overrides: Any,
) -> Any:
    """Build an :class:`msa.model.MSAModel` in the ``paper`` preset from the published code's state dicts.

    Args:
        crossatt, img_model, img_map, text_model: state dicts (or paths to ``torch.save`` files) of the published
            modules; any subset may be given, the rest keeps the config's initialisation. Each given part must cover
            its modules completely (missing, unexpected and mis-shaped keys raise ``ValueError``).
        config: registry name or :class:`MSAConfig` describing the architecture (published: ``msa-resnet50-bert``).
        backend: the ``msa.ops.mscmat_scores`` backend of the model.
        overrides: config fields to change. ``preset`` is always "paper"; pretrained-weight loading is skipped for
            the parts that are given.

    Returns:
        the converted model.
    """
    from msa.model import MSAModel, state_dict_differences

    base = get_config(config) if isinstance(config, str) else config
    changes: dict[str, Any] = {**overrides, "preset": "paper"}
    if img_model is not None:
        changes["image_pretrained"] = False
    if text_model is not None and base.text_config is None:
        changes["text_pretrained"] = False  # architecture from the text model's config, weights from text_model
    model = MSAModel(base.replace(**changes), backend=backend)
    own = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for part, source in (
        ("crossatt", crossatt),
        ("img_model", img_model),
        ("img_map", img_map),
        ("text_model", text_model),
    ):
        state = _load(source)
        if state is None:
            continue
        renamed = official_key_map(part, state)
        if part == "img_model":
            # The features-only backbone may end before some published stage (e.g. fewer scales): only keys it has.
            renamed = {key: value for key, value in renamed.items() if key in own}
        prefix = _PARTS[part][1]
        covered = [key for key in own if key.startswith(prefix) and not key.endswith("num_batches_tracked")]
        if part == "img_model":
            covered = [key for key in covered if not key.startswith(_PARTS["img_map"][1])]
        missing, unexpected, mismatched = state_dict_differences(own, renamed, "published", required=covered)
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{part} does not fit the config {getattr(config, 'image_backbone', config)!r}: missing "
                f"{missing[:20]}, unexpected {unexpected[:20]}, shape mismatches {mismatched[:20]}"
            )
        loaded.update(renamed)
    model.load_state_dict(loaded, strict=False)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert the published MSA checkpoints into an msa checkpoint.")
    parser.add_argument("--crossatt", help="torch.save file of the published cross-attention module state dict")
    parser.add_argument("--img-model", help="torch.save file of the published image model (feature_extractor, fc1-4)")
    parser.add_argument("--img-map", help="torch.save file of the published gated map (fc, att, fc2)")
    parser.add_argument("--text-model", help="torch.save file of the published text model (bert_model.*)")
    parser.add_argument("--config", default="msa-resnet50-bert", help="registry name of the architecture")
    parser.add_argument("--out", required=True, help="output directory (save_pretrained format)")
    args = parser.parse_args(argv)
    model = from_official(args.crossatt, args.img_model, args.img_map, args.text_model, config=args.config)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
