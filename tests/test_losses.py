"""The MSA losses on synthetic score matrices: values, gradients, and each improved switch changing only its part."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from msa.configs import PRESETS
from msa.losses import (
    LOSS_PRESETS,
    LossSettings,
    alignment_loss,
    consistency_loss,
    msa_loss,
    same_image_mask,
    triplet_loss,
)
from msa.outputs import MSAOutput


def make_output(size: int = 6, dim: int = 16, scales: int = 4, seed: int = 0, logit_scale: float | None = 10.0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(size, dim, generator=generator), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(size, dim, generator=generator), dim=-1).requires_grad_()
    scores = [torch.rand(size, size, generator=generator).requires_grad_() for _ in range(scales)]
    scale = None if logit_scale is None else torch.tensor(logit_scale, requires_grad=True)
    return MSAOutput(image, text, scores, scale)


def test_triplet_loss_value_on_a_hand_made_batch():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = F.normalize(torch.tensor([[1.0, 0.2], [1.0, 1.0]]), dim=-1)
    cos = image @ text.T
    # image 0: d_pos = 1 - cos00, its only negative is text 1; image 1: negative text 0; same for the text anchors.
    expected = sum(
        max(0.0, 0.5 - cos[i, i].item() + cos[i, 1 - i].item())
        + max(0.0, 0.5 - cos[i, i].item() + cos[1 - i, i].item())
        for i in range(2)
    )
    assert math.isclose(triplet_loss(image, text).item(), expected, rel_tol=1e-6)
    assert triplet_loss(image, text, margin=0.0).item() < expected


def test_triplet_loss_uses_the_hardest_negative_only():
    output = make_output(size=5)
    loss = triplet_loss(output.image_embeds, output.text_embeds, margin=2.0)  # margin 2: every hinge is active
    loss.backward()
    cos = (output.image_embeds @ output.text_embeds.T).detach()
    masked = cos.masked_fill(torch.eye(5, dtype=torch.bool), -2)
    expected = (2.0 - cos.diag() + masked.max(1).values).sum() + (2.0 - cos.diag() + masked.max(0).values).sum()
    torch.testing.assert_close(loss.detach(), expected)
    assert output.image_embeds.grad.abs().sum() > 0


def test_triplet_positive_mask_removes_negatives_and_empty_anchors_give_zero():
    output = make_output(size=4)
    everything = torch.ones(4, 4, dtype=torch.bool)
    loss = triplet_loss(output.image_embeds, output.text_embeds, positive_mask=everything)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()  # no NaN gradients through the masked-out anchors
    assert torch.isfinite(output.image_embeds.grad).all()


def test_alignment_loss_is_cross_entropy_per_scale():
    output = make_output()
    targets = torch.arange(6)
    expected = sum(F.cross_entropy(scores, targets) for scores in output.scale_scores)
    torch.testing.assert_close(alignment_loss(output.scale_scores), expected)
    both = alignment_loss(output.scale_scores, bidirectional=True)
    expected_both = sum(
        (F.cross_entropy(scores, targets) + F.cross_entropy(scores.T, targets)) / 2 for scores in output.scale_scores
    )
    torch.testing.assert_close(both, expected_both)


def test_consistency_teacher_is_detached_and_identical_scales_give_zero():
    output = make_output()
    loss = consistency_loss(output.scale_scores)
    loss.backward()
    assert output.scale_scores[-1].grad is None or output.scale_scores[-1].grad.abs().sum() == 0
    assert output.scale_scores[0].grad.abs().sum() > 0
    same = [output.scale_scores[-1].detach()] * 4
    assert consistency_loss(same).abs().item() < 1e-7
    assert consistency_loss(same, kl="teacher_student_batchmean").abs().item() < 1e-7
    assert consistency_loss(output.scale_scores[:1]).item() == 0.0


def test_teacher_student_batchmean_value():
    output = make_output(size=5)
    student = output.scale_scores[0].detach() / 2
    teacher = output.scale_scores[-1].detach() / 2
    p_teacher, p_student = teacher.softmax(0), student.softmax(0)
    per_text = (p_teacher * (p_teacher.log() - p_student.log())).sum(0)  # KL(teacher || student) for each text
    value = consistency_loss([output.scale_scores[0], output.scale_scores[-1]], kl="teacher_student_batchmean")
    torch.testing.assert_close(value.detach(), per_text.mean())


def parts(loss):
    return {name: getattr(loss, name).detach() for name in ("triplet", "alignment", "consistency")}


SWITCHES = {
    # switch -> the parts it may change (with image ids that repeat, and a logit scale in the output)
    "bidirectional_alignment": {"alignment"},
    "consistency_kl": {"consistency"},
    "mask_false_negatives": {"triplet", "alignment"},
}


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_each_improved_switch_changes_only_its_part(switch):
    output = make_output(size=6, seed=3)
    image_ids = torch.tensor([0, 1, 0, 2, 3, 1])  # images 0 and 1 appear twice
    baseline = parts(msa_loss(output, "paper", image_ids=image_ids, margin=1.5))
    value = getattr(LOSS_PRESETS["improved"], switch)
    switched = parts(msa_loss(output, "paper", image_ids=image_ids, margin=1.5, **{switch: value}))
    for name in baseline:
        if name in SWITCHES[switch]:
            assert not torch.allclose(switched[name], baseline[name]), f"{switch} should change {name}"
        else:
            torch.testing.assert_close(switched[name], baseline[name], msg=f"{switch} must not change {name}")


def test_improved_preset_is_all_switches_and_weights_are_published():
    improved = LOSS_PRESETS["improved"]
    paper = LOSS_PRESETS["paper"]
    assert paper == LossSettings()
    assert (paper.margin, paper.alignment_weight, paper.consistency_weight, paper.tau) == (0.5, 15.0, 10.0, 2.0)
    for switch in SWITCHES:
        assert getattr(improved, switch) != getattr(paper, switch)
    output = make_output()
    loss = msa_loss(output, "improved")
    torch.testing.assert_close(loss.total, loss.triplet + 15 * loss.alignment + 10 * loss.consistency)
    loss.total.backward()
    assert output.logit_scale.grad is not None and output.logit_scale.grad != 0


def test_false_negative_masking_with_distinct_ids_changes_nothing():
    output = make_output()
    a = parts(msa_loss(output, "improved", image_ids=list(range(6))))
    b = parts(msa_loss(output, "improved"))
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_same_image_mask_accepts_hashable_ids():
    mask = same_image_mask(["a.jpg", "b.jpg", "a.jpg"], 3, torch.device("cpu"))
    assert mask.tolist() == [[True, False, True], [False, True, False], [True, False, True]]


def test_bad_inputs_raise_clear_errors():
    output = make_output(size=4)
    with pytest.raises(ValueError, match="preset"):
        msa_loss(output, "published")
    with pytest.raises(ValueError, match="unknown loss settings"):
        msa_loss(output, "paper", margn=0.2)
    with pytest.raises(ValueError, match="learnable_logit_scale"):
        msa_loss(output, "improved", use_logit_scale=False)
    with pytest.raises(ValueError, match="one id per pair"):
        msa_loss(output, "improved", image_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="kl must be"):
        consistency_loss(output.scale_scores, kl="reverse")
    rectangular = MSAOutput(output.image_embeds, output.text_embeds[:3], output.scale_scores)
    with pytest.raises(ValueError, match="matching pairs"):
        msa_loss(rectangular)
    with pytest.raises(ValueError, match="square"):
        alignment_loss([torch.rand(4, 3)])


def test_every_preset_has_loss_settings():
    assert tuple(LOSS_PRESETS) == PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_the_output_logit_scale_is_applied_in_every_preset(preset):
    """The model alone decides whether there is a temperature: the loss applies whatever the output carries, so the
    temperature always gets a gradient (DDP rejects parameters without one)."""
    with_scale = make_output(seed=4, logit_scale=10.0)
    without = MSAOutput(with_scale.image_embeds, with_scale.text_embeds, with_scale.scale_scores, None)
    scaled = msa_loss(with_scale, preset)
    plain = msa_loss(without, preset)
    torch.testing.assert_close(scaled.triplet, plain.triplet)
    assert not torch.allclose(scaled.alignment, plain.alignment)
    expected = alignment_loss(
        [scores * 10.0 for scores in with_scale.scale_scores],
        bidirectional=LOSS_PRESETS[preset].bidirectional_alignment,
    )
    torch.testing.assert_close(scaled.alignment, expected)
    scaled.total.backward()
    assert with_scale.logit_scale.grad is not None and with_scale.logit_scale.grad != 0


BLOCKED_IMPORTS = """
import importlib.abc
import sys


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("timm", "transformers"):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, Blocker())
"""


def test_losses_and_metrics_need_neither_timm_nor_transformers():
    script = BLOCKED_IMPORTS + textwrap.dedent(
        """
        import torch

        from msa.evaluation import retrieval_metrics
        from msa.losses import msa_loss
        from msa.model import MSAOutput as FromModel  # the model itself needs timm
        """
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "timm is blocked" in child.stderr or "transformers is blocked" in child.stderr, child.stderr

    script = BLOCKED_IMPORTS + textwrap.dedent(
        """
        import torch

        from msa.evaluation import retrieval_metrics
        from msa.losses import msa_loss
        from msa.outputs import ImageFeatures, MSAOutput, TextFeatures

        torch.manual_seed(0)
        embeds = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        scores = [torch.rand(4, 4, requires_grad=True) for _ in range(4)]
        loss = msa_loss(MSAOutput(embeds, embeds, scores, torch.tensor(10.0)), "improved", image_ids=[0, 1, 2, 3])
        loss.total.backward()
        assert scores[0].grad is not None
        assert retrieval_metrics(torch.eye(4), [0, 1, 2, 3])["mR"] == 100.0
        assert len(ImageFeatures(embeds, [embeds])[1:]) == 3
        assert len(TextFeatures(embeds, embeds[:, None], embeds, None)) == 4
        assert not {"timm", "transformers"} & set(sys.modules)
        print("ok", loss.total.item())
        """
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert child.returncode == 0 and child.stdout.startswith("ok"), child.stderr
