"""Channel importance per producing conv: BN |γ| (network slimming), filter L1 norm, random, or given scores (CAP).

Every function returns ``{conv module name: 1-D tensor over its output channels}``; the planner averages the
producers of a space (a residual chain has several) into one score per channel and ranks all spaces globally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from yolocomp.errors import UserError

Scores = dict[str, torch.Tensor]


def _producers(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    return {n: modules[n] for n in names}


def bn_gamma(model: nn.Module, names: list[str]) -> Scores:
    """|γ| of each producer's BatchNorm (Liu et al. 2017)."""
    out = {}
    for name, m in _producers(model, names).items():
        bn = getattr(m, "bn", None)
        if not isinstance(bn, nn.BatchNorm2d) or bn.weight is None:
            raise UserError(f"{name} has no BatchNorm scale; BN-γ pruning needs an unfused model with BatchNorm "
                            "(use --method l1 or random otherwise)")
        out[name] = bn.weight.detach().abs().float().cpu()
    return out


def l1_norm(model: nn.Module, names: list[str]) -> Scores:
    """Filter L1 norm (Li et al. 2017), divided by the layer's mean so one global threshold is fair across fan-ins."""
    out = {}
    for name, m in _producers(model, names).items():
        w = m.conv.weight.detach().float().cpu()
        norms = w.abs().flatten(1).sum(1)
        out[name] = norms / norms.mean().clamp_min(1e-12)
    return out


def random_scores(model: nn.Module, names: list[str], seed: int = 0) -> Scores:
    """Uniform random scores: the chance baseline (about the same share pruned in every layer)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(m.conv.out_channels, generator=gen) for name, m in _producers(model, names).items()}


METHODS: dict[str, Callable[[nn.Module, list[str]], Scores]] = {
    "bn": bn_gamma,
    "l1": l1_norm,
    "random": random_scores,
}


def compute(model: nn.Module, names: list[str], method: str | Callable | Mapping | None) -> Scores:
    """Scores for ``names`` from a method name, a callable ``(model, names) -> Scores`` or a ready mapping."""
    if method is None:
        method = "bn"
    if isinstance(method, Mapping):
        missing = [n for n in names if n not in method]
        if missing:
            raise UserError(f"importance scores missing for {len(missing)} convs (e.g. {missing[0]})")
        return {n: torch.as_tensor(method[n]).detach().float().cpu() for n in names}
    if callable(method):
        return method(model, names)
    if method not in METHODS:
        raise UserError(f"unknown importance '{method}'; choose one of {sorted(METHODS)} (cap needs attention training)")
    return METHODS[method](model, names)
