"""The two encoders of MSA: a multi-scale timm image encoder with a gated map, and a transformers text encoder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from msa.configs import MSAConfig, resolve_local_weights

ALLOW_DOWNLOAD_ENV = "MSA_ALLOW_DOWNLOAD"


def _downloads_allowed() -> bool:
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "0") not in ("", "0", "false", "False")


@contextlib.contextmanager
def _hub_cache_only() -> Iterator[None]:
    """Make huggingface_hub (which timm uses for pretrained weights) look in its local cache only, unless downloads
    are allowed: offline, a miss then fails at once instead of after a minute of retries."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or not _downloads_allowed()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


class GatedMap(nn.Module):
    """The published gated map: ``h = W1 f;  v = W2 (h * sigmoid(W_att h))`` (published names ``fc``, ``att``,
    ``fc2``), all D -> D."""

    def __init__(self, dim: int):
        super().__init__()
        self.input_proj = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, D]."""
        hidden = self.input_proj(features)
        return self.output_proj(hidden * torch.sigmoid(self.gate(hidden)))


def map_state_dict_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename ``source`` onto the keys of ``target`` by position (same architecture, other naming scheme).

    ``num_batches_tracked`` buffers are skipped on both sides (some exporters drop them). Every pair must agree in
    shape, which makes an accidental misalignment fail loudly.
    """
    source_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target_items = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(source_items) != len(target_items):
        raise ValueError(
            f"cannot map by order: {len(source_items)} source tensors vs {len(target_items)} target tensors"
        )
    mapped = {}
    for (source_key, value), (target_key, reference) in zip(source_items, target_items):
        if value.shape != reference.shape:
            raise ValueError(
                f"cannot map by order: {source_key} {tuple(value.shape)} lands on {target_key} {tuple(reference.shape)}"
            )
        mapped[target_key] = value
    return mapped


def load_backbone_weights(backbone: nn.Module, model_name: str, weights: str) -> None:
    """Load a state-dict file (or a :data:`msa.configs.LOCAL_WEIGHT_PACKAGES` alias) into a ``features_only`` timm
    backbone. Keys may be timm's own, or those of the same architecture under another naming scheme (mapped in order
    onto the full timm model, whose classifier/head the features-only backbone then drops)."""
    path = resolve_local_weights(weights)
    if not Path(path).is_file():
        raise FileNotFoundError(f"image weights {weights!r}: no such file {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = backbone.state_dict()
    if not set(own) <= set(state):
        full_model = timm.create_model(model_name, pretrained=False)
        state = map_state_dict_in_order(state, full_model.state_dict())
    missing = [key for key in own if key not in state and not key.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"image weights {weights!r} lack {len(missing)} backbone keys, e.g. {missing[:5]}")
    backbone.load_state_dict({key: state[key] for key in own if key in state}, strict=False)


class ImageEncoder(nn.Module):
    """Multi-scale image encoder: a ``features_only`` timm backbone, one global pool per scale, and the published
    global embedding ``normalize(GatedMap(sum_s fc_s(pooled_s)))``.

    ``forward(images [B, 3, H, W])`` returns ``(embeds [B, D] L2-normalised, pooled: list of [B, C_s])``.
    """

    def __init__(self, config: MSAConfig):
        super().__init__()
        kwargs: dict[str, Any] = {"features_only": True}
        if config.out_indices is not None:
            kwargs["out_indices"] = tuple(config.out_indices)
        pretrained_from_timm = config.image_pretrained is True
        try:
            with _hub_cache_only():
                self.backbone = timm.create_model(config.image_backbone, pretrained=pretrained_from_timm, **kwargs)
        except (OSError, RuntimeError, ValueError) as error:
            if not pretrained_from_timm:
                raise
            raise RuntimeError(
                f"could not get timm's pretrained weights for {config.image_backbone!r} ({error}). Without a network, "
                "pass image_pretrained=<path to a state-dict file> or image_pretrained=False (random init); to let "
                f"timm download them, set {ALLOW_DOWNLOAD_ENV}=1."
            ) from error
        if isinstance(config.image_pretrained, str):
            load_backbone_weights(self.backbone, config.image_backbone, config.image_pretrained)
        info = self.backbone.feature_info
        levels = len(info.channels())  # the outputs (len(info) counts every level, selected or not)
        if config.out_indices is None and levels < config.num_scales:
            raise ValueError(f"{config.image_backbone} has {levels} feature levels, asked for {config.num_scales}")
        # Without explicit out_indices, the deepest num_scales levels; the shallower ones cost nothing extra since the
        # deeper stages compute them anyway.
        self.selected_levels = (
            list(range(levels)) if config.out_indices is not None else list(range(levels - config.num_scales, levels))
        )
        self.scale_channels: list[int] = [info.channels()[level] for level in self.selected_levels]
        # The published pools are nn.MaxPool2d / nn.AvgPool2d with a fixed kernel, the stage's map size at the
        # training resolution (ResNet-50 at 224 px: 56, 28, 14, 7), i.e. image_size // the stage's stride.
        self.fixed_kernels: list[int] = [
            max(1, config.image_size // info.reduction()[level]) for level in self.selected_levels
        ]
        # Swin-like backbones return NHWC maps.
        self.channels_last_output = str(getattr(self.backbone, "output_fmt", "NCHW")).upper().endswith("NHWC")
        self.pooling = list(config.pooling)
        self.pool_mode = config.pool_mode
        self.image_size = config.image_size
        self.scale_fcs = nn.ModuleList(nn.Linear(channels, config.embed_dim) for channels in self.scale_channels)
        self.gated_map = GatedMap(config.embed_dim)

    def check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images: empty batch")
        if self.pool_mode == "fixed" and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"pool_mode='fixed' (the published fixed pooling kernels) needs {self.image_size}x{self.image_size} "
                f"images, got {images.shape[-2]}x{images.shape[-1]}; resize them or use pool_mode='adaptive'"
            )

    def pool(self, feature_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Max/avg pool of each [B, C_s, H_s, W_s] map -> list of [B, C_s].

        ``adaptive``: over the whole map. ``fixed``: one window of ``fixed_kernels[s]`` pixels from the top-left
        corner, as the published fixed-kernel pools; it covers the whole map when ``image_size`` is a multiple of
        the stage's stride, and leaves the last row/column out when the backbone rounds the map size up (e.g.
        ResNet at 72 px: 5x5 map, kernel 4).
        """
        pooled = []
        for index, (feature_map, mode) in enumerate(zip(feature_maps, self.pooling)):
            if self.channels_last_output:
                feature_map = feature_map.permute(0, 3, 1, 2)
            if self.pool_mode == "adaptive":
                pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
                pooled.append(pool(feature_map, 1).flatten(1))
                continue
            kernel = self.fixed_kernels[index]
            if min(feature_map.shape[-2:]) < kernel or max(feature_map.shape[-2:]) >= 2 * kernel:
                raise ValueError(
                    f"pool_mode='fixed': scale {index} gives a {feature_map.shape[-2]}x{feature_map.shape[-1]} map, "
                    f"which a {kernel}x{kernel} kernel does not pool to one value; use pool_mode='adaptive'"
                )
            pool = F.max_pool2d if mode == "max" else F.avg_pool2d
            pooled.append(pool(feature_map, kernel).flatten(1))
        return pooled

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.check_images(images)
        feature_maps = self.backbone(images)
        pooled = self.pool([feature_maps[level] for level in self.selected_levels])
        fused = torch.stack([fc(feature) for fc, feature in zip(self.scale_fcs, pooled)]).sum(0)
        return F.normalize(self.gated_map(fused), dim=-1), pooled


def _load_pretrained(loader: Any, name: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` from a local path, the local cache, or (only with MSA_ALLOW_DOWNLOAD=1) the hub."""
    path = resolve_local_weights(name)
    local = Path(path).exists()
    try:
        return loader.from_pretrained(path, local_files_only=local or not _downloads_allowed(), **kwargs)
    except (OSError, ValueError) as error:
        raise OSError(
            f"could not load the {what} {name!r} ({error.__class__.__name__}: {error}). Pass a local directory "
            f"(e.g. from `huggingface-cli download {name}`), or set {ALLOW_DOWNLOAD_ENV}=1 to let transformers "
            "download it, or use the offline config 'msa-effnetlite0-minilm'."
        ) from error


def load_tokenizer(config: MSAConfig, directory: str | Path | None = None) -> Any:
    """The tokenizer of ``config`` (or the one saved in ``directory`` by ``save_pretrained``)."""
    from transformers import AutoTokenizer

    if directory is not None:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return _load_pretrained(AutoTokenizer, config.tokenizer or config.text_model, "tokenizer")


class TextEncoder(nn.Module):
    """A transformers encoder; its last-layer states give the global feature ([CLS], position 0) and the word tokens
    (positions 1..L-1) for MSCMAT, projected to D when the model's width differs (published: BERT-base, no projection).

    ``forward(input_ids [B, L], attention_mask [B, L])`` returns ``(cls [B, D] not normalised, words [B, L-1, D])``.
    """

    def __init__(self, config: MSAConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if config.text_config is not None:
            values = dict(config.text_config)
            model_type = values.pop("model_type")
            self.model = AutoModel.from_config(AutoConfig.for_model(model_type, **values))
        elif config.text_pretrained:
            self.model = _load_pretrained(AutoModel, config.text_model, "text model")
        else:
            text_config = _load_pretrained(AutoConfig, config.text_model, "text model config")
            self.model = AutoModel.from_config(text_config)
        if getattr(self.model, "pooler", None) is not None:
            # Unused by MSA ([CLS] state, no pooler); dropping it keeps DDP free of unused parameters.
            self.model.pooler = None
        width = self.model.config.hidden_size
        self.projection = nn.Linear(width, config.embed_dim) if width != config.embed_dim else None

    def model_config_dict(self) -> dict[str, Any]:
        """The text model's config as a dict that ``MSAConfig.text_config`` accepts (for random re-creation)."""
        values = self.model.config.to_dict()
        keep = {"model_type"} | set(type(self.model.config)().to_dict())
        return {key: value for key, value in values.items() if key in keep and not key.startswith("_")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.projection is not None:
            states = self.projection(states)
        return states[:, 0], states[:, 1:]
