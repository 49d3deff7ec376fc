"""Keep BatchNorm in eval mode while a converged model is distilled: its running statistics stay those of the
data it was trained on, and student and teacher normalise the same way (a train-mode student would normalise with
the statistics of each augmented batch while the frozen teacher uses its running ones)."""

from __future__ import annotations

from torch import nn

from yolocomp.methods import Method


class FrozenBatchNorm(Method):
    """BatchNorm layers normalise with their running statistics during training and never update them; their
    affine parameters still train."""

    name = "frozen_bn"

    def before_batch(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()

    def __repr__(self) -> str:
        return "FrozenBatchNorm()"
