"""Fine-grained feature imitation (Wang et al., CVPR 2019), adapted to anchor-free YOLO.

Loss per level: ``sum(mask * (adapter(student) - teacher)^2) / (2 * N_p)``, summed over channels and locations, with
``N_p`` the number of masked locations in the batch at that level (0 masked locations -> 0 loss). The total is
``weight * sum over levels``; ``weight`` is the paper's lambda (0.01, the authors' code default). The mask comes from
:func:`yolocomp.distill.masks.fgfi_masks` (psi = 0.5, virtual square priors of ``prior_scale`` cells; see there); an image without GT boxes
(unlabelled) takes the teacher's detections above ``teacher_box_conf`` (default 0.25) as its boxes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolocomp.distill.base import TeacherDistiller, teacher_box_confidence
from yolocomp.distill.masks import fgfi_masks
from yolocomp.errors import UserError


class FineGrainedImitation(TeacherDistiller):
    """Imitate the teacher's neck features near objects; one column ``fgfi_loss``."""

    name = "fgfi"

    def __init__(
        self,
        teacher: str | Path | nn.Module,
        layers: list[int] | None = None,
        weight: float = 0.01,
        psi: float = 0.5,
        prior_scale: float = 4.0,
        teacher_layers: list[int] | None = None,
        teacher_box_conf: float | None = 0.25,
    ):
        super().__init__(teacher, layers, teacher_layers)
        self.teacher_box_conf = teacher_box_confidence(teacher_box_conf)
        if not 0 < psi <= 1:
            raise UserError(f"psi={psi} is outside (0, 1]; the paper uses 0.5")
        if weight < 0:
            raise UserError(f"weight={weight} is negative; use e.g. 0.01")
        if prior_scale <= 0:
            raise UserError(f"prior_scale={prior_scale} must be positive; use e.g. 4")
        self.weight, self.psi, self.prior_scale = float(weight), float(psi), float(prior_scale)

    def imitation_loss(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        """Unweighted masked L2 summed over levels (student features already adapted to teacher width)."""
        total = s_feats[0].new_zeros((), dtype=torch.float32)
        for s, t, m in zip(s_feats, t_feats, masks):
            sq = (s.float() - t.float()).pow(2).sum(1)  # (B, h, w)
            total = total + (sq * m).sum() / (2 * m.sum().clamp(min=1))
        return total

    def losses(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor], preds: Any, teacher_out: Any, batch: dict) -> dict[str, torch.Tensor]:
        masks = fgfi_masks(self.mask_batch(batch, teacher_out), [t.shape[-2:] for t in t_feats], t_feats[0].device, self.psi, self.prior_scale)
        adapted = [self.adapt(i, s) for i, s in enumerate(s_feats)]
        return {"fgfi_loss": self.weight * self.imitation_loss(adapted, t_feats, masks)}

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, weight={self.weight}, psi={self.psi})"
