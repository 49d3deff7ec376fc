"""Learned weight rounding (AdaRound) and activation step sizes (LSQ), fitted block by block (BRECQ).

AdaRound (Nagel et al. 2020) rounds each weight up or down by a learned choice instead of to the nearest grid point:
``w_q = s * clamp(floor(w / s) + h(V), Qn, Qp)`` with the rectified sigmoid ``h(V) in [0, 1]`` and a regulariser
``sum(1 - |2 h(V) - 1| ** beta)`` that, as ``beta`` anneals from 20 to 2, pushes every ``h`` to exactly 0 or 1.
BRECQ (Li et al. 2021) fits these per block of the network against the float block's output, with the inputs taken
from the already quantized blocks before it; the activation step sizes of the block learn at the same time (LSQ).
:class:`AdaRoundFit` is that fit as a :class:`yolocomp.recon.engine.BlockFit`, so the reconstruction engine of
pruning recovery runs it.

When a block's fit ends the rounding is made hard and baked into the conv's weight (``W_q / fold factor`` when BN is
folded into it), so the plain nearest rounding of the export reproduces exactly the learned grid values.
"""

from __future__ import annotations

import torch
from torch import nn

from yolocomp.quant.modules import QConv
from yolocomp.quant.quantizer import Quantizer
from yolocomp.recon.engine import BlockFit

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid, so h reaches 0 and 1 with finite V


class AdaRound(nn.Module):
    """The soft (then hard) rounding of one conv's BN-folded weight on its quantizer's fixed per-channel grid."""

    def __init__(self, weight: torch.Tensor, quantizer: Quantizer, gain: bool = False):
        super().__init__()
        self.qn, self.qp = quantizer.qrange
        self.register_buffer("step", quantizer.step().detach().clone())
        rest = (weight.detach() / self.step) - torch.floor(weight.detach() / self.step)
        # V such that h(V) equals the fractional part: the fit starts from the un-rounded weight
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest.clamp(1e-4, 1 - 1e-4) - GAMMA) - 1))
        # a learned per-channel step (log scale): the integers stay where rounding puts them, the grid stretches
        self.log_gain = nn.Parameter(torch.zeros_like(self.step)) if gain else None
        self.hard = False

    def grid_step(self) -> torch.Tensor:
        return self.step if self.log_gain is None else self.step * self.log_gain.exp()

    def soft(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        up = (self.alpha >= 0).to(weight.dtype) if self.hard else self.soft()
        return torch.clamp(torch.floor(weight.detach() / self.step) + up, self.qn, self.qp) * self.grid_step()

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()


@torch.no_grad()
def bake_rounding(conv: QConv) -> dict:
    """Replace ``conv``'s weight by its hard-rounded quantized value (unfolded from BN) and drop the rounding."""
    rounding: AdaRound = conv.rounding
    h = rounding.soft()
    undecided = float(((h > 0) & (h < 1)).float().mean())
    rounding.hard = True
    w, _ = conv.folded()
    wq = rounding(w)
    up = float((rounding.alpha >= 0).float().mean())
    conv.conv.weight.copy_(wq / conv.fold_factor().view(-1, 1, 1, 1) if conv.bn is not None else wq)
    scale = conv.weight_quant.scale
    scale.copy_(rounding.grid_step().reshape(scale.shape))  # the learned steps, so nearest rounding keeps the integers
    conv.rounding = None
    return {"undecided": undecided, "up": up}


def bias_parameter(conv: QConv) -> nn.Parameter | None:
    """The parameter the folded bias is made from: BN's beta, else the conv's own bias."""
    return conv.bn.bias if conv.bn is not None else conv.conv.bias


class AdaRoundFit(BlockFit):
    """Fit a quantized block: AdaRound variables of its weight-quantized convs and the step sizes of the activation
    quantizers it owns (a quantizer shared with an earlier block keeps what that block learned)."""

    def __init__(self, weight_lr: float = 1e-3, act_lr: float = 4e-5, reg_weight: float = 0.01,
                 beta: tuple[float, float] = (20.0, 2.0), warmup: float = 0.2, learn_activations: bool = True,
                 drop_prob: float = 0.0, affine_lr: float = 0.0):
        super().__init__(weight_lr)
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob={drop_prob} must be in [0, 1)")
        self.act_lr, self.reg_weight, self.beta, self.warmup = act_lr, reg_weight, beta, warmup
        self.drop_prob, self.affine_lr = drop_prob, affine_lr
        self.learn_activations = learn_activations
        self._learned: set[int] = set()
        self._convs: list[QConv] = []
        self._acts: list[Quantizer] = []

    def settings(self) -> dict:
        return {"method": "adaround+lsq", "weight_lr": self.lr, "act_lr": self.act_lr, "reg_weight": self.reg_weight,
                "beta": list(self.beta), "warmup": self.warmup, "learn_activations": self.learn_activations,
                "qdrop": self.drop_prob, "affine_lr": self.affine_lr}

    def begin(self, module: nn.Module) -> list[dict]:
        self._convs = [m for m in module.modules() if isinstance(m, QConv) and m.weight_quant.enabled]
        for conv in self._convs:
            conv.rounding = AdaRound(conv.folded()[0], conv.weight_quant, gain=self.affine_lr > 0)
        self._acts = []
        if self.learn_activations:
            for conv in self._convs:
                q = conv.act_quant
                if q.enabled and q.learn and id(q) not in self._learned:
                    self._learned.add(id(q))
                    self._acts.append(q)
                    q.train()  # LSQ path; the rest of the block (BN) stays in eval mode
                    q.drop_prob = self.drop_prob
        groups = [{"params": [c.rounding.alpha for c in self._convs], "lr": self.lr}]
        if self._acts:
            groups.append({"params": [q.scale for q in self._acts], "lr": self.act_lr})
        if self.affine_lr > 0:
            # each output channel's step and bias, so the fit can also take back the error's scale and mean
            affine = [c.rounding.log_gain for c in self._convs] + [b for b in map(bias_parameter, self._convs) if b is not None]
            groups.append({"params": affine, "lr": self.affine_lr})
        return groups

    def penalty(self, module: nn.Module, output: torch.Tensor, progress: float) -> torch.Tensor | float:
        if progress < self.warmup or not self._convs:
            return 0.0
        start, end = self.beta
        beta = end + (start - end) * (1 - (progress - self.warmup) / (1 - self.warmup))
        reg = sum(c.rounding.regulariser(beta) for c in self._convs)
        # BRECQ's and AIMET's weight 0.01 is relative to the squared error summed over channels and averaged over
        # batch and positions; the engine's loss averages over channels too, so the regulariser is divided by them
        return self.reg_weight * reg / output.shape[1]

    def end(self, module: nn.Module) -> dict:
        stats = [bake_rounding(c) for c in self._convs]
        for q in self._acts:
            q.eval()
            q.drop_prob = 0.0
        n = max(1, len(stats))
        return {"convs": len(stats), "undecided": round(sum(s["undecided"] for s in stats) / n, 4),
                "rounded_up": round(sum(s["up"] for s in stats) / n, 4)}
