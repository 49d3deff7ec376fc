"""Box distributions across heads with different ``reg_max``: a teacher's DFL bins as targets for a student with fewer.

Both heads measure each box side in strides, one bin per stride; a head with ``R`` bins reaches ``R - 1`` strides.
The student's target keeps the teacher's probability of every distance it can express and puts the mass beyond its
reach on its last bin, so the expected distance is the teacher's wherever the student can reach it and clipped where
it cannot (what Ultralytics' own DFL target does with a ground-truth distance beyond ``reg_max - 1``).
"""

from __future__ import annotations

import torch

from yolocomp.errors import UserError


def rebin(probs: torch.Tensor, bins: int, dim: int) -> torch.Tensor:
    """``probs`` (a distribution over ``dim``) on its first ``bins`` bins, the mass of the rest added to the last."""
    have = probs.shape[dim]
    if bins > have:
        raise UserError(f"a box distribution of {have} bins cannot target {bins}; the student needs reg_max <= the "
                        "teacher's")
    if bins == have:
        return probs
    head, tail = probs.split([bins - 1, have - bins + 1], dim)
    return torch.cat([head, tail.sum(dim, keepdim=True)], dim)


def box_targets(teacher_boxes: torch.Tensor, bins: int, temperature: float = 1.0) -> torch.Tensor:
    """Target probabilities ``(B, 4 * bins, ...)`` from the teacher's raw box logits ``(B, 4 * R, ...)``: the softmax
    at ``temperature`` over each side's ``R`` bins, rebinned to ``bins``."""
    b, channels = teacher_boxes.shape[:2]
    if channels % 4:
        raise UserError(f"box logits have {channels} channels, not 4 sides x reg_max bins")
    rest = teacher_boxes.shape[2:]
    probs = (teacher_boxes.float() / temperature).view(b, 4, channels // 4, *rest).softmax(2)
    return rebin(probs, bins, 2).reshape(b, 4 * bins, *rest)


def box_kd_loss(boxes: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None,
                probabilities: bool = False) -> torch.Tensor:
    """Cross-entropy of the student's box logits ``(B, 4 * bins, ...)`` against :func:`box_targets` of the teacher's
    raw box logits (or, with ``probabilities``, against ``teacher`` as given: targets on the student's bins), summed
    over the 4 sides, averaged over positions weighted by ``weight`` (shape ``(B, ...)``, e.g. the teacher's
    confidence: a background anchor's box means nothing)."""
    b, channels = boxes.shape[:2]
    bins, rest = channels // 4, boxes.shape[2:]
    target = (teacher.float() if probabilities else box_targets(teacher, bins)).view(b, 4, bins, *rest)
    ce = -(target * boxes.float().view(b, 4, bins, *rest).log_softmax(2)).sum((1, 2))
    if weight is None:
        return ce.mean()
    return (ce * weight).sum() / weight.sum().clamp_min(1e-12)
