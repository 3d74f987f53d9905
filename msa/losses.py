"""The MSA losses: triplet (global embeddings), per-scale alignment and cross-scale consistency (MSCMAT scores).

``msa_loss(output, preset)`` combines them as published, ``triplet + 15 * alignment + 10 * consistency``. The
"paper" preset reproduces the published reductions exactly; "improved" switches on the fixes below, each of which can
also be set on its own through the keyword overrides of :func:`msa_loss` (see :class:`LossSettings`).

==============================  =====================================  ==============================================
switch                          paper (published)                      improved
==============================  =====================================  ==============================================
bidirectional_alignment         image -> text only                      mean of image -> text and text -> image
consistency_kl                  KL(student || teacher), mean over B^2   KL(teacher || student), batchmean (per text)
mask_false_negatives            off                                     pairs of the same image id are not negatives
==============================  =====================================  ==============================================

The learnable temperature is the model's switch, not the loss's (``MSAConfig.learnable_logit_scale``, on in the
improved preset): when the model has one, ``output.logit_scale`` carries it and the alignment and consistency terms
multiply the score matrices by it; when it is None (paper) they use the sigmoid scores as published. One switch, so a
model never holds a temperature that the loss ignores (a parameter without gradient, which DDP rejects).

The loss needs only torch: it reads an :class:`msa.outputs.MSAOutput`, whose module imports neither timm nor
transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from msa.configs import PRESETS
from msa.outputs import MSAOutput

CONSISTENCY_KL = ("student_teacher_mean", "teacher_student_batchmean")


@dataclass(frozen=True)
class LossSettings:
    """Loss hyper-parameters and switches (see the module docstring)."""

    margin: float = 0.5
    alignment_weight: float = 15.0
    consistency_weight: float = 10.0
    tau: float = 2.0
    bidirectional_alignment: bool = False
    consistency_kl: str = "student_teacher_mean"
    mask_false_negatives: bool = False


LOSS_PRESETS = {
    "paper": LossSettings(),
    "improved": LossSettings(
        bidirectional_alignment=True,
        consistency_kl="teacher_student_batchmean",
        mask_false_negatives=True,
    ),
}


@dataclass
class LossOutput:
    """``total`` = triplet + alignment_weight * alignment + consistency_weight * consistency (0-d tensors)."""

    total: torch.Tensor
    triplet: torch.Tensor
    alignment: torch.Tensor
    consistency: torch.Tensor


def same_image_mask(image_ids: torch.Tensor | Sequence[Any], size: int, device: torch.device) -> torch.Tensor:
    """[B, B] bool, True where pair (i, j) shows the same image (the diagonal included)."""
    if not isinstance(image_ids, torch.Tensor):
        # Arbitrary hashable ids (ints, file names) -> consecutive integers.
        lookup: dict[Any, int] = {}
        image_ids = torch.tensor([lookup.setdefault(item, len(lookup)) for item in image_ids])
    if image_ids.shape != (size,):
        raise ValueError(f"image_ids must have one id per pair ({size}), got shape {tuple(image_ids.shape)}")
    image_ids = image_ids.to(device)
    return image_ids[:, None] == image_ids[None, :]


def _check_square(matrix: torch.Tensor, name: str) -> int:
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty square [B, B] matrix of matching pairs, got {tuple(matrix.shape)}"
        )
    return matrix.shape[0]


def triplet_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    margin: float = 0.5,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hardest-negative triplet loss in both directions (VSE++), summed over the batch.

    With the cosine distance d = 1 - cos, for each image i (text j) the hardest negative is the closest text
    (image) other than its pair; the loss is ``sum_i [margin + d_ii - d_i,neg]_+ + sum_j [margin + d_jj - d_neg,j]_+``.
    Negatives are mined without gradient and gathered with gradient.

    Args:
        image_embeds, text_embeds: [B, D] L2-normalised; row b of each is a matching pair.
        margin: published 0.5.
        positive_mask: [B, B] bool, True for pairs that are not negatives (beyond the diagonal); an anchor without
            any negative contributes 0.
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} differ")
    distances = 1 - image_embeds @ text_embeds.T
    size = _check_square(distances, "image_embeds @ text_embeds.T")
    positives = distances.diagonal()
    with torch.no_grad():
        excluded = torch.eye(size, dtype=torch.bool, device=distances.device)
        if positive_mask is not None:
            excluded = excluded | positive_mask
        candidates = distances.masked_fill(excluded, float("inf"))
        closest_text_distance, hardest_text = candidates.min(dim=1)
        closest_image_distance, hardest_image = candidates.min(dim=0)
    image_anchor = (margin + positives - distances.gather(1, hardest_text[:, None])[:, 0]).clamp(min=0)
    text_anchor = (margin + positives - distances.gather(0, hardest_image[None, :])[0]).clamp(min=0)
    image_anchor = torch.where(closest_text_distance.isfinite(), image_anchor, 0.0)
    text_anchor = torch.where(closest_image_distance.isfinite(), text_anchor, 0.0)
    return image_anchor.sum() + text_anchor.sum()


def alignment_loss(
    scale_scores: Sequence[torch.Tensor],
    logit_scale: torch.Tensor | float | None = None,
    bidirectional: bool = False,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-scale alignment: cross-entropy of each [B, B] score matrix with targets on the diagonal, summed over
    scales (published: image -> text, applied to the sigmoid scores without temperature).

    Args:
        scale_scores: list of [B, B] scores, rows = images, columns = texts.
        logit_scale: multiplier applied to the scores before the softmax (None: published, no temperature).
        bidirectional: average the image -> text and text -> image cross-entropies.
        positive_mask: [B, B] bool; off-diagonal True entries (same image) are removed from the softmax.
    """
    total = scale_scores[0].new_zeros(())
    for scores in scale_scores:
        size = _check_square(scores, "each scale score matrix")
        logits = scores if logit_scale is None else scores * logit_scale
        if positive_mask is not None:
            eye = torch.eye(size, dtype=torch.bool, device=scores.device)
            logits = logits.masked_fill(positive_mask & ~eye, float("-inf"))
        targets = torch.arange(size, device=scores.device)
        loss = F.cross_entropy(logits, targets)
        if bidirectional:
            loss = (loss + F.cross_entropy(logits.T, targets)) / 2
        total = total + loss
    return total


def consistency_loss(
    scale_scores: Sequence[torch.Tensor],
    tau: float = 2.0,
    kl: str = "student_teacher_mean",
    logit_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Cross-scale consistency: the deepest scale's scores (detached) teach each smaller scale; both are softmaxed
    over images for each text with temperature ``tau``; summed over the smaller scales.

    Args:
        scale_scores: list of [Ni, Nt] scores, smallest scale first (the last one is the teacher).
        tau: published 2.
        kl: "student_teacher_mean" (published: ``F.kl_div(log(teacher), student, reduction="mean")``, i.e.
            KL(student || teacher) averaged over all Ni * Nt entries) or "teacher_student_batchmean" (KL(teacher ||
            student) summed over images, averaged over texts).
        logit_scale: multiplier applied to all scores before dividing by ``tau`` (None: published).
    """
    if kl not in CONSISTENCY_KL:
        raise ValueError(f"kl must be one of {CONSISTENCY_KL}, got {kl!r}")
    if len(scale_scores) < 2:
        return scale_scores[0].new_zeros(())
    scale = 1.0 if logit_scale is None else logit_scale
    teacher_logits = scale_scores[-1].detach() * scale / tau
    total = scale_scores[0].new_zeros(())
    for student_scores in scale_scores[:-1]:
        student_logits = student_scores * scale / tau
        if kl == "student_teacher_mean":
            teacher = teacher_logits.softmax(dim=0)
            student = student_logits.softmax(dim=0)
            # = F.kl_div(teacher.log(), student, reduction="mean"), written out because torch deprecates "mean".
            total = total + (torch.xlogy(student, student) - student * teacher.log()).mean()
        else:
            # Rows = texts, so that batchmean averages the per-text KL over texts.
            total = total + F.kl_div(
                student_logits.log_softmax(dim=0).T,
                teacher_logits.log_softmax(dim=0).T,
                reduction="batchmean",
                log_target=True,
            )
    return total


def resolve_settings(preset: str = "paper", **overrides: Any) -> LossSettings:
    """The :class:`LossSettings` of ``preset`` with ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    known = {f.name for f in dataclasses.fields(LossSettings)}
    unknown = sorted(set(overrides) - known)
    if "use_logit_scale" in unknown:
        raise ValueError(
            "use_logit_scale is not a loss setting: the loss applies output.logit_scale whenever the model has a "
            "learnable temperature; switch it with the model config's learnable_logit_scale"
        )
    if unknown:
        raise ValueError(f"unknown loss settings {unknown}; known: {sorted(known)}")
    return dataclasses.replace(LOSS_PRESETS[preset], **overrides)


def msa_loss(
    output: MSAOutput, preset: str = "paper", image_ids: torch.Tensor | Sequence[Any] | None = None, **overrides: Any
) -> LossOutput:
    """The MSA training loss of a batch of B matching pairs.

    Args:
        output: an :class:`msa.outputs.MSAOutput` (image_embeds, text_embeds [B, D], scale_scores list of [B, B],
            logit_scale: the model's temperature, applied to the scores when not None).
        preset: "paper" (published) or "improved" (:data:`msa.configs.PRESETS`).
        image_ids: [B] ids of the images (tensor or list of hashables); with ``mask_false_negatives`` (improved),
            pairs that show the same image are not used as negatives. Ignored otherwise.
        overrides: any :class:`LossSettings` field, e.g. ``bidirectional_alignment=False``.

    Returns:
        :class:`LossOutput` with ``total``, ``triplet``, ``alignment``, ``consistency``.
    """
    settings = resolve_settings(preset, **overrides)
    size = output.image_embeds.shape[0]
    if output.text_embeds.shape[0] != size:
        raise ValueError(f"msa_loss needs B matching pairs: {size} images vs {output.text_embeds.shape[0]} texts")
    positive_mask = None
    if settings.mask_false_negatives and image_ids is not None:
        positive_mask = same_image_mask(image_ids, size, output.image_embeds.device)
    logit_scale = output.logit_scale
    triplet = triplet_loss(output.image_embeds, output.text_embeds, settings.margin, positive_mask)
    alignment = alignment_loss(output.scale_scores, logit_scale, settings.bidirectional_alignment, positive_mask)
    consistency = consistency_loss(output.scale_scores, settings.tau, settings.consistency_kl, logit_scale)
    total = triplet + settings.alignment_weight * alignment + settings.consistency_weight * consistency
    return LossOutput(total, triplet, alignment, consistency)
