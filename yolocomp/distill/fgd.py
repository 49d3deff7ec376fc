"""Focal and global distillation (Yang et al., CVPR 2022) on the neck features feeding the Detect head.

Per level, with the student feature first mapped to teacher width by an adapter (1x1 conv when widths differ):

* attention of a feature F (N, C, H, W) at temperature T: spatial ``A_S = H*W * softmax_hw(mean_c |F| / T)``,
  channel ``A_C = C * softmax_c(mean_hw |F| / T)``;
* focal loss: ``alpha * sum(M_fg * A_S^t * A_C^t * (F^t - F^s)^2) + beta * sum(M_bg * A_S^t * A_C^t * (F^t - F^s)^2)``
  with the teacher's attention, ``M_fg`` the 1/area scale mask of the GT boxes and ``M_bg`` the background mask
  normalised to sum 1 per image (:func:`yolocomp.distill.masks.fgd_masks`); an image without GT boxes (unlabelled)
  takes the teacher's detections above ``teacher_box_conf`` (default 0.25) as its boxes, ``None`` keeps GT only;
* attention loss: ``gamma * (sum|A_C^t - A_C^s| + sum|A_S^t - A_S^s|)``;
* global loss: ``lam * sum((GC_s(F^s) - GC_t(F^t))^2)`` with two trainable GcBlocks (training-only, like adapters).

Every sum is divided by the batch size (per-image values, as the integration expects). Defaults are the paper's
one-stage (RetinaNet) settings: T=0.5, alpha=1e-3, beta=5e-4, gamma=1e-3, lam=5e-6.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolocomp.distill.adapters import ContextBlock, make_adapter
from yolocomp.distill.base import TeacherDistiller, teacher_box_confidence
from yolocomp.distill.masks import fgd_masks
from yolocomp.errors import UserError


def attention(feat: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(spatial (N, H, W), channel (N, C)) attention of FGD, each averaging to 1."""
    n, c, h, w = feat.shape
    value = feat.abs()
    spatial = (h * w) * (value.mean(1).view(n, -1) / temperature).softmax(1)
    channel = c * (value.mean((2, 3)) / temperature).softmax(1)
    return spatial.view(n, h, w), channel


def fgd_terms(
    s: torch.Tensor,
    t: torch.Tensor,
    fg: torch.Tensor,
    bg: torch.Tensor,
    temperature: float,
    gc_s: nn.Module | None = None,
    gc_t: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Unweighted FGD terms for one level: fg, bg, attention and global (per image)."""
    n = s.shape[0]
    s, t = s.float(), t.float()
    s_sp, s_ch = attention(s, temperature)
    t_sp, t_ch = attention(t, temperature)
    weight = t_sp[:, None] * t_ch[:, :, None, None]  # teacher attention weights the feature loss
    sq = weight * (s - t).pow(2)
    terms = {
        "fg": (sq * fg[:, None]).sum() / n,
        "bg": (sq * bg[:, None]).sum() / n,
        "att": ((t_ch - s_ch).abs().sum() + (t_sp - s_sp).abs().sum()) / n,
    }
    terms["global"] = ((gc_s(s) - gc_t(t)).pow(2).sum() / n) if gc_s is not None else s.new_zeros(())
    return terms


class FGD(TeacherDistiller):
    """Focal and global distillation; one column ``fgd_loss`` (the weighted sum of its four terms)."""

    name = "fgd"

    def __init__(
        self,
        teacher: str | Path | nn.Module,
        layers: list[int] | None = None,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 1e-3,
        lam: float = 5e-6,
        temperature: float = 0.5,
        teacher_layers: list[int] | None = None,
        teacher_box_conf: float | None = 0.25,
    ):
        super().__init__(teacher, layers, teacher_layers)
        self.teacher_box_conf = teacher_box_confidence(teacher_box_conf)
        for key, value in {"alpha": alpha, "beta": beta, "gamma": gamma, "lam": lam}.items():
            if value < 0:
                raise UserError(f"FGD {key}={value} is negative; use e.g. the paper's defaults (alpha 1e-3, beta 5e-4, gamma 1e-3, lam 5e-6)")
        if temperature <= 0:
            raise UserError(f"FGD temperature={temperature} must be positive; the paper uses 0.5")
        self.alpha, self.beta, self.gamma, self.lam = float(alpha), float(beta), float(gamma), float(lam)
        self.temperature = float(temperature)

    def build_aux(self, levels: list[tuple[int, int]]) -> nn.Module:
        return nn.ModuleDict(
            {
                "adapters": nn.ModuleList(make_adapter(s, t) for s, t in levels),
                "gc_student": nn.ModuleList(ContextBlock(t) for _, t in levels),
                "gc_teacher": nn.ModuleList(ContextBlock(t) for _, t in levels),
            }
        )

    def level_terms(self, level: int, s: torch.Tensor, t: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> dict[str, torch.Tensor]:
        gc_s = self.aux["gc_student"][level] if self.lam else None
        gc_t = self.aux["gc_teacher"][level] if self.lam else None
        return fgd_terms(self.adapt(level, s), t, fg, bg, self.temperature, gc_s, gc_t)

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.alpha * terms["fg"] + self.beta * terms["bg"] + self.gamma * terms["att"] + self.lam * terms["global"]

    def losses(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor], preds: Any, teacher_out: Any, batch: dict) -> dict[str, torch.Tensor]:
        masks = fgd_masks(self.mask_batch(batch, teacher_out), [t.shape[-2:] for t in t_feats], t_feats[0].device)
        total = t_feats[0].new_zeros((), dtype=torch.float32)
        for level, (s, t, (fg, bg)) in enumerate(zip(s_feats, t_feats, masks)):
            total = total + self.weighted(self.level_terms(level, s, t, fg, bg))
        return {"fgd_loss": total}

    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, lam={self.lam}, "
            f"temperature={self.temperature})"
        )
