"""Training-only modules of distillation: width adapters and FGD's GcBlock context modules.

A distiller registers them on the student in ``prepare`` (:func:`yolocomp.methods.add_training_module`), before
Ultralytics builds its optimizer, so they train in its parameter groups with its AMP scaling, DDP all-reduce and
gradient clipping, and resumable checkpoints hold them (the resumed optimizer state then matches). The delivered
student never contains them: ``finalize`` and :func:`yolocomp.integration.save_model` strip them.
"""

from __future__ import annotations

import torch
from torch import nn


def make_adapter(student_channels: int, teacher_channels: int) -> nn.Module:
    """1x1 conv mapping student width to teacher width, or identity when they already match."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)


class ContextBlock(nn.Module):
    """GcBlock (Cao et al. 2019) as used by FGD's global loss: x + transform(attention-pooled context of x)."""

    def __init__(self, channels: int, ratio: float = 0.5):
        super().__init__()
        hidden = max(int(channels * ratio), 1)
        self.mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.mask.bias)
        nn.init.zeros_(self.transform[-1].weight)  # starts as identity: out == x
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        weights = self.mask(x).view(n, 1, h * w).softmax(-1)  # where to pool
        context = torch.bmm(x.view(n, c, h * w), weights.transpose(1, 2)).view(n, c, 1, 1)
        return x + self.transform(context)
