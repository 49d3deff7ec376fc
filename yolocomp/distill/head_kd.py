"""Head-level knowledge distillation: class scores and box distributions (DFL bins) of the teacher's Detect head.

For every anchor point a (student and teacher share strides and image size, hence anchors):

* class KD: binary KL between ``sigmoid(t / T)`` and ``sigmoid(s / T)`` per class (YOLO's classes are independent
  sigmoids), summed over classes, times T^2;
* DFL KD: KL between ``softmax(t / T)`` and ``softmax(s / T)`` over the ``reg_max`` bins of each box side, summed
  over the 4 sides, times T^2 (localization distillation); a student with fewer bins than its teacher learns the
  teacher's distribution rebinned to its own (:mod:`yolocomp.distill.box_bins`);
* both are averaged over anchors weighted by the teacher's confidence ``max_c sigmoid(t)`` normalised over the batch
  (:func:`anchor_weights`), so the few anchors on objects dominate rather than the many empty ones (like Ultralytics'
  own score-weighted feature distillation); with unlabelled images these weights are the only notion of "object".
  ``confidence_weighting=False`` gives every anchor the same weight (a plain mean).

Columns ``kdcls_loss = cls_weight * class KD`` and ``kddfl_loss = dfl_weight * DFL KD``; both are 0 when student
and teacher outputs are equal. Their gradients are the analytic ones (``p_s - p_t`` per logit, :func:`exact_gradient`),
so they are exactly 0 there too: autograd through the log-sigmoid / log-softmax leaves ~1e-10 rounding residue, which
Adam normalises into lr-sized steps that make a model distilled into itself drift away from its AP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from yolocomp.distill.base import TeacherDistiller
from yolocomp.distill.box_bins import rebin
from yolocomp.errors import UserError


def head_outputs(preds: Any) -> dict[str, torch.Tensor]:
    """The raw one-to-many head dict (``boxes`` (B, 4*reg_max, A), ``scores`` (B, nc, A)) from train or eval output."""
    if isinstance(preds, (tuple, list)) and len(preds) == 2 and isinstance(preds[1], dict):
        preds = preds[1]  # eval mode: (decoded, raw)
    if isinstance(preds, dict) and "one2many" in preds:
        preds = preds["one2many"]
    if not isinstance(preds, dict) or "scores" not in preds or "boxes" not in preds:
        raise TypeError(f"unexpected Detect output {type(preds).__name__}; head KD needs Ultralytics' raw head dict")
    return preds


def anchor_weights(teacher_scores: torch.Tensor, confidence_weighting: bool = True) -> torch.Tensor:
    """(B, A) weights summing to 1 over the batch: the teacher's max class probability per anchor, or uniform."""
    weight = teacher_scores.float().sigmoid().amax(1) if confidence_weighting else teacher_scores.new_ones(
        teacher_scores.shape[0], teacher_scores.shape[2], dtype=torch.float32)
    return weight / weight.sum().clamp(min=1e-6)


def exact_gradient(value: torch.Tensor, logits: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``value`` (a scalar) whose gradient with respect to ``logits`` is ``grad`` exactly (both computed by the caller)."""
    surrogate = (grad.detach() * logits).sum()
    return value.detach() + (surrogate - surrogate.detach())


def head_kd_terms(student: dict, teacher: dict, reg_max: int, temperature: float, confidence_weighting: bool = True
                  ) -> dict[str, torch.Tensor]:
    s_cls, t_cls = student["scores"].float(), teacher["scores"].float()
    s_box, t_box = student["boxes"].float(), teacher["boxes"].float()
    bins = s_box.shape[1] // 4  # the student's; a teacher with more bins is rebinned to them
    if s_cls.shape != t_cls.shape or s_box.shape[2:] != t_box.shape[2:] or not 0 < s_box.shape[1] <= t_box.shape[1]:
        raise UserError(f"student head outputs {tuple(s_cls.shape)} scores and {tuple(s_box.shape)} boxes but the teacher "
                        f"{tuple(t_cls.shape)} and {tuple(t_box.shape)}; use a teacher with the same classes and strides "
                        "and at least the student's DFL bins")
    T = temperature
    weight = anchor_weights(t_cls, confidence_weighting)  # (B, A), sums to 1
    p_t = (t_cls / T).sigmoid()
    with torch.no_grad():
        cls_kl = F.binary_cross_entropy_with_logits(s_cls / T, p_t, reduction="none") - F.binary_cross_entropy_with_logits(
            t_cls / T, p_t, reduction="none"
        )  # binary KL(p_t || p_s) = cross-entropy - entropy
    # d/ds of T^2 * weight * KL(sigmoid(t/T) || sigmoid(s/T)) = T * weight * (sigmoid(s/T) - sigmoid(t/T))
    cls = exact_gradient((cls_kl.sum(1) * weight).sum() * T * T, s_cls,
                         ((s_cls / T).sigmoid() - p_t) * weight[:, None] * T)
    b, _, a = s_box.shape
    if reg_max <= 1:  # heads without DFL bins (e.g. YOLO26) regress the 4 distances directly
        box_l1 = (s_box - t_box).abs().sum(1)
        return {"cls": cls, "dfl": (box_l1 * weight).sum()}
    s_bins, t_bins = s_box.view(b, 4, bins, a) / T, t_box.view(b, 4, reg_max, a) / T
    with torch.no_grad():
        log_s, log_t = s_bins.log_softmax(2), t_bins.log_softmax(2)
        p_s, p_t_bins = log_s.exp(), rebin(log_t.exp(), bins, 2)  # the same ops on both: exactly equal at the teacher
        if bins != reg_max:
            log_t = p_t_bins.clamp_min(1e-30).log()
        dfl_kl = (p_t_bins * (log_t - log_s)).sum((1, 2))  # (B, A)
    # d/ds of T^2 * weight * KL(softmax(t/T) || softmax(s/T)) = T * weight * (softmax(s/T) - softmax(t/T)) per bin
    dfl_grad = (p_s - p_t_bins) * weight[:, None, None] * T
    return {"cls": cls, "dfl": exact_gradient((dfl_kl * weight).sum() * T * T, s_box, dfl_grad.view(b, 4 * bins, a))}


class HeadKD(TeacherDistiller):
    """Class-score and box-distribution distillation from the teacher's head (the CLI's ``--method logit``)."""

    name = "logit"
    uses_features = False

    def __init__(self, teacher: str | Path | nn.Module, temperature: float = 2.0, cls_weight: float = 1.0, dfl_weight: float = 1.0,
                 confidence_weighting: bool = True):
        super().__init__(teacher)
        self.confidence_weighting = bool(confidence_weighting)
        if temperature <= 0:
            raise UserError(f"head KD temperature={temperature} must be positive; use e.g. 2")
        if cls_weight < 0 or dfl_weight < 0:
            raise UserError(f"head KD weights must be >= 0 (got cls_weight={cls_weight}, dfl_weight={dfl_weight})")
        self.temperature, self.cls_weight, self.dfl_weight = float(temperature), float(cls_weight), float(dfl_weight)

    def needs_teacher_head(self) -> bool:
        return True

    def losses(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor], preds: Any, teacher_out: Any, batch: dict) -> dict[str, torch.Tensor]:
        reg_max = int(self.teacher.model[-1].reg_max)
        terms = head_kd_terms(head_outputs(preds), head_outputs(teacher_out), reg_max, self.temperature, self.confidence_weighting)
        return {"kdcls_loss": self.cls_weight * terms["cls"], "kddfl_loss": self.dfl_weight * terms["dfl"]}

    def __repr__(self) -> str:
        return (f"{super().__repr__()[:-1]}, temperature={self.temperature}, cls_weight={self.cls_weight}, dfl_weight={self.dfl_weight}, "
                f"confidence_weighting={self.confidence_weighting})")
