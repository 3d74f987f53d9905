"""The MSA model: multi-scale image encoder, text encoder and MSCMAT, with named configs and checkpoints.

Example::

    model = msa.create_model("msa-tiny")
    tokens = model.tokenize(["many planes are parked near the terminal"])
    output = model(images, tokens["input_ids"], tokens["attention_mask"])
    loss = msa.losses.msa_loss(output, preset=model.config.preset)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msa.configs import MSAConfig, get_config, list_models
from msa.encoders import ImageEncoder, TextEncoder, load_tokenizer
from msa.mscmat import MSCMAT, check_backend_name
from msa.outputs import ImageFeatures, MSAOutput, TextFeatures

__all__ = ["ImageFeatures", "MSAModel", "MSAOutput", "TextFeatures", "create_model", "list_models"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
LOGIT_SCALE_MAX = 100.0


class MSAModel(nn.Module):
    """Multi-Scale Alignment (Yang, Wang et al., IEEE TGRS 2024) for image-text retrieval.

    Attributes:
        config: the :class:`~msa.configs.MSAConfig`.
        image_encoder: :class:`~msa.encoders.ImageEncoder` (timm backbone, pools, per-scale fc, gated map).
        text_encoder: :class:`~msa.encoders.TextEncoder` (transformers model, optional projection to D).
        mscmat: :class:`~msa.mscmat.MSCMAT`, one cross-attention per scale.
        logit_scale: log of the learnable temperature multiplier (improved preset), else None.
        tokenizer: the transformers tokenizer.
        backend: the ``msa.ops.mscmat_scores`` backend of MSCMAT ("auto", "reference", "cpu", "cuda", "triton"): a
            run-time choice, settable at any time and not saved with the model.
    """

    def __init__(self, config: MSAConfig, tokenizer: Any = None, backend: str = "auto"):
        super().__init__()
        check_backend_name(backend)  # before the (slow) encoders are built
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config)
        self.mscmat = MSCMAT(self.image_encoder.scale_channels, config.embed_dim, config.num_heads, backend)
        if config.use_logit_scale:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        else:
            self.logit_scale = None
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config)

    @property
    def backend(self) -> str:
        return self.mscmat.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.mscmat.backend = name

    # ----------------------------------------------------------------------------------------------------- inputs
    def tokenize(self, captions: list[str] | str) -> dict[str, torch.Tensor]:
        """Token ids and attention mask [B, max_length] (padded to max_length, truncated; published: 31)."""
        if isinstance(captions, str):
            captions = [captions]
        if len(captions) == 0:
            raise ValueError("tokenize: empty list of captions")
        encoded = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def image_transform(self, train: bool = False) -> Any:
        """The torchvision transform (PIL image -> [3, H, W] tensor) from the backbone's timm data config, at
        ``config.image_size``."""
        from timm.data import create_transform, resolve_data_config

        data_config = resolve_data_config({}, model=self.image_encoder.backbone)
        data_config["input_size"] = (3, self.config.image_size, self.config.image_size)
        if not train:
            # Whole image, no crop: remote-sensing captions often mention objects near the border.
            data_config["crop_pct"] = 1.0
        if train:
            # A milder random crop than timm's ImageNet default (8-100 %): captions describe the whole scene.
            return create_transform(**data_config, is_training=True, scale=(0.5, 1.0))
        return create_transform(**data_config, is_training=False)

    # ---------------------------------------------------------------------------------------------------- encoders
    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """images [B, 3, H, W] -> :class:`ImageFeatures` (embeds [B, D], scale_features list of [B, C_s])."""
        embeds, pooled = self.image_encoder(images)
        return ImageFeatures(embeds, pooled)

    def word_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L-1] mask of the word tokens that are real words (not padding, not [SEP])."""
        mask = attention_mask[:, 1:].bool()
        sep_id = getattr(self.tokenizer, "sep_token_id", None)
        if sep_id is not None:
            mask = mask & (input_ids[:, 1:] != sep_id)
        return mask

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        """input_ids, attention_mask [B, L] (L <= max_length) -> :class:`TextFeatures` (embeds [B, D], word_tokens
        [B, L-1, D], text_global [B, D], word_mask [B, L-1] or None)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids: empty batch")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] > self.config.max_length:
            raise ValueError(
                f"input_ids have {input_ids.shape[1]} tokens, more than max_length={self.config.max_length}; "
                "tokenize with model.tokenize (which truncates) or raise max_length"
            )
        if input_ids.shape[1] < 2:
            raise ValueError(f"input_ids need [CLS] and at least one more token, got length {input_ids.shape[1]}")
        cls, words = self.text_encoder(input_ids, attention_mask)
        embeds = F.normalize(cls, dim=-1)
        text_global = embeds if self.config.text_global_normalized else cls
        mask = self.word_mask(input_ids, attention_mask) if self.config.use_word_mask else None
        return TextFeatures(embeds, words, text_global, mask)

    # ------------------------------------------------------------------------------------------------------ scores
    def current_logit_scale(self) -> torch.Tensor | None:
        """The temperature multiplier exp(logit_scale), clamped to 100 (None in the paper preset)."""
        if self.logit_scale is None:
            return None
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    def forward_features(self, image_features: ImageFeatures, text_features: TextFeatures) -> MSAOutput:
        """Scores of ALL given images against ALL given texts (e.g. features all-gathered across DDP ranks)."""
        if len(image_features) == 0 or len(text_features) == 0:
            raise ValueError("forward_features: empty image or text features")
        scores = self.mscmat(
            image_features.scale_features,
            text_features.word_tokens,
            text_features.text_global,
            text_features.word_mask,
        )
        return MSAOutput(image_features.embeds, text_features.embeds, scores, self.current_logit_scale())

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> MSAOutput:
        """images [B, 3, H, W], input_ids/attention_mask [B, L] (pair b = image b and caption b) -> :class:`MSAOutput`
        with [B, B] score matrices."""
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"forward: {images.shape[0]} images but {input_ids.shape[0]} captions; pair b is image b with caption b"
            )
        return self.forward_features(self.encode_image(images), self.encode_text(input_ids, attention_mask))

    @torch.no_grad()
    def similarity(self, image_features: ImageFeatures, text_features: TextFeatures) -> torch.Tensor:
        """Global cosine similarity [Ni, Nt]."""
        return image_features.embeds @ text_features.embeds.T

    @torch.no_grad()
    def mscmat_similarity(
        self,
        image_features: ImageFeatures,
        text_features: TextFeatures,
        scale: int | None = None,
        chunk_size: int = 1024,
    ) -> torch.Tensor:
        """MSCMAT scores [Ni, Nt] (sigmoid scores summed over scales, or of one scale), computed in chunks of
        ``chunk_size`` images x ``chunk_size`` texts so that any Ni x Nt fits in memory."""
        count = len(self.mscmat.scales)
        if scale is not None and not -count <= scale < count:
            raise ValueError(f"scale must be in [-{count}, {count}), got {scale}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        ni, nt = len(image_features), len(text_features)
        result = image_features.embeds.new_zeros(ni, nt)
        for text_start in range(0, nt, chunk_size):
            texts = text_features[text_start : text_start + chunk_size]
            for image_start in range(0, ni, chunk_size):
                images = image_features[image_start : image_start + chunk_size]
                scores = self.mscmat(images.scale_features, texts.word_tokens, texts.text_global, texts.word_mask)
                block = scores[scale] if scale is not None else torch.stack(scores).sum(0)
                result[image_start : image_start + len(images), text_start : text_start + len(texts)] = block
        return result

    # ------------------------------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer to ``directory``.

        The saved config records the text model's architecture (``text_config``) and no pretrained-weight sources, so
        that :meth:`from_pretrained` rebuilds the model offline before loading the weights.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config.replace(
            image_pretrained=False, text_pretrained=False, text_config=self.text_encoder.model_config_dict()
        )
        (directory / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        state = {key: value.detach().contiguous() for key, value in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "msa"})
        self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))

    @classmethod
    def from_pretrained(cls, directory: str | Path, backend: str = "auto", **overrides: Any) -> MSAModel:
        """Load a model written by :meth:`save_pretrained`.

        Args:
            directory: the folder holding ``config.json``, ``model.safetensors`` and (optionally) ``tokenizer/``.
            backend: the ``msa.ops.mscmat_scores`` backend to run with (a ``backend`` saved in an older
                ``config.json`` is ignored: the machine that loads the model chooses).
            overrides: config fields to change (e.g. ``mask_padding``).

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: a file is unreadable or truncated, a config field is unknown or of the wrong type, the
                backend is unknown, or the weights do not fit the config; the message names the file (and the field
                or the keys).
        """
        check_backend_name(backend)
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: not a directory written by save_pretrained")
        config_path = directory / CONFIG_NAME
        try:
            config = MSAConfig.from_dict(_read_json(config_path))
        except ValueError as error:
            raise ValueError(f"{config_path}: {error}") from error
        config = config.replace(**overrides)
        state = _read_weights(directory / WEIGHTS_NAME)
        tokenizer_dir = directory / TOKENIZER_DIR
        tokenizer = load_tokenizer(config, tokenizer_dir) if tokenizer_dir.is_dir() else None
        model = cls(config, tokenizer=tokenizer, backend=backend)
        model.load_checkpoint_state(state, source=str(directory / WEIGHTS_NAME))
        return model

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Strictly load ``state``; any missing, unexpected or mis-shaped key raises one ``ValueError`` listing them."""
        missing, unexpected, mismatched = state_dict_differences(self.state_dict(), state, "checkpoint")
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{source} does not match this model's config: missing keys {_some(missing)}; "
                f"unexpected keys {_some(unexpected)}; shape mismatches {_some(mismatched)}"
            )
        self.load_state_dict(state)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 text ({error})") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON, truncated or not written by save_pretrained ({error})") from error


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({error})") from error


def state_dict_differences(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, required: list[str] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """Keys of ``required`` (default: all of ``own``) missing from ``state``, keys of ``state`` unknown to ``own``,
    and "key: <source> shape vs model shape" for the keys whose shapes differ."""
    missing = sorted(set(own if required is None else required) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{key}: {source} {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in sorted(set(own) & set(state))
        if state[key].shape != own[key].shape
    ]
    return missing, unexpected, mismatched


def _some(items: list[str], limit: int = 12) -> str:
    """``items`` as a list, cut to ``limit`` entries with a count of the rest."""
    if len(items) <= limit:
        return str(items)
    return f"{items[:limit]} and {len(items) - limit} more"


def create_model(name: str, backend: str = "auto", **overrides: Any) -> MSAModel:
    """Build a named model (see :func:`msa.configs.list_models`) with config ``overrides``; a directory written by
    ``save_pretrained`` is also accepted as ``name``. ``backend`` is the ``msa.ops.mscmat_scores`` backend (a
    run-time choice, not a config field)."""
    if Path(name).is_dir() and (Path(name) / CONFIG_NAME).is_file():
        return MSAModel.from_pretrained(name, backend=backend, **overrides)
    return MSAModel(get_config(name, **overrides), backend=backend)
