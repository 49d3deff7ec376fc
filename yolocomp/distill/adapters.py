"""Training-only modules that live beside the student: width adapters and FGD's GcBlock context modules.

They are trained together with the student but are never part of it, so neither Ultralytics' checkpoints nor its
EMA ever contain them. They get their own optimizer (:class:`AuxOptimizer`), stepped from ``Method.before_step``,
instead of a parameter group in the trainer's optimizer: Ultralytics restores a resumed run's optimizer state before
any callback runs, and a checkpointed extra group would make ``optimizer.load_state_dict`` refuse the resume.
"""

from __future__ import annotations

from typing import Any

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


def _lead_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the trainer's weight groups (not the bias group with its own warmup)."""
    lrs = [g["lr"] for g in optimizer.param_groups if g.get("param_group") != "bias"]
    return min(lrs) if lrs else optimizer.param_groups[0]["lr"]


class AuxOptimizer:
    """Optimizer for training-only modules that follows the trainer's optimizer type and learning rate.

    ``step(trainer)`` runs inside the trainer's optimizer step (after AMP unscaling of the student's gradients and
    after accumulation): it unscales these gradients by the AMP scale, averages them across DDP ranks, clips them
    like Ultralytics does (norm 10), steps and zeroes them.
    """

    def __init__(self, modules: nn.Module, trainer_optimizer: torch.optim.Optimizer | None = None):
        self.params = [p for p in modules.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer | None = None
        if not self.params:  # e.g. equal widths and no context blocks: nothing to train
            return
        lead = trainer_optimizer
        lr = _lead_lr(lead) if lead is not None else 1e-3
        if lead is not None and "momentum" in lead.defaults and "betas" not in lead.defaults:
            self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=lead.defaults.get("momentum", 0.9), nesterov=True)
        else:
            betas = lead.defaults.get("betas", (0.9, 0.999)) if lead is not None else (0.9, 0.999)
            self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, weight_decay=0.0)

    def step(self, trainer: Any) -> None:
        if self.optimizer is None:
            return
        if trainer is not None and getattr(trainer, "optimizer", None) is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = _lead_lr(trainer.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            scaler = getattr(trainer, "scaler", None)
            if scaler is not None and scaler.is_enabled():
                inv = 1.0 / float(scaler.get_scale())
                for g in grads:
                    g.mul_(inv)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                world = torch.distributed.get_world_size()
                for g in grads:
                    torch.distributed.all_reduce(g)
                    g.div_(world)
            if all(torch.isfinite(g).all() for g in grads):
                torch.nn.utils.clip_grad_norm_(self.params, max_norm=10.0)
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
