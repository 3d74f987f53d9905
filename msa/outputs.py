"""What the MSA model returns: :class:`ImageFeatures`, :class:`TextFeatures` and :class:`MSAOutput`.

Plain dataclasses of tensors, importing only torch, so that the losses (:mod:`msa.losses`), the metrics
(:mod:`msa.evaluation`) and their tests work without timm or transformers installed. :mod:`msa.model` re-exports
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ImageFeatures", "MSAOutput", "TextFeatures"]


@dataclass
class ImageFeatures:
    """What the image side gives: ``embeds`` [B, D] (L2-normalised global embedding) and ``scale_features`` (list of
    pooled [B, C_s], smallest scale first), the input of MSCMAT."""

    embeds: torch.Tensor
    scale_features: list[torch.Tensor]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, index: slice | torch.Tensor) -> ImageFeatures:
        return ImageFeatures(self.embeds[index], [feature[index] for feature in self.scale_features])


@dataclass
class TextFeatures:
    """What the text side gives: ``embeds`` [B, D] (L2-normalised global), ``word_tokens`` [B, L, D], ``text_global``
    [B, D] (added inside MSCMAT) and ``word_mask`` [B, L] (None: attend to every token, as published)."""

    embeds: torch.Tensor
    word_tokens: torch.Tensor
    text_global: torch.Tensor
    word_mask: torch.Tensor | None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, index: slice | torch.Tensor) -> TextFeatures:
        mask = None if self.word_mask is None else self.word_mask[index]
        return TextFeatures(self.embeds[index], self.word_tokens[index], self.text_global[index], mask)


@dataclass
class MSAOutput:
    """``image_embeds`` [Ni, D], ``text_embeds`` [Nt, D], ``scale_scores``: list (smallest scale first) of [Ni, Nt]
    sigmoid scores (rows = images, columns = texts), and ``logit_scale``: the model's learnable temperature as a
    multiplier (a 0-d tensor), or None when the model has none (``MSAConfig.learnable_logit_scale``; off in the paper
    preset). The loss multiplies the score matrices by it whenever it is present."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    scale_scores: list[torch.Tensor]
    logit_scale: torch.Tensor | None = None
