"""Mean compensation: fold the average contribution of removed channels into the next BatchNorm.

A removed channel j fed every consumer conv ``W[:, j] * a_j``. Replacing ``a_j`` by its mean ``E[a_j]`` (a constant
map), the consumer's pre-BN output loses ``sum_k W[o, j, k] * E[a_j]`` per output channel o; subtracting that from the
consumer BN's ``running_mean`` restores it (exactly for 1x1 convs and constant channels, up to padding borders for 3x3).
This matters most for BN-γ pruning: a channel with γ ≈ 0 still outputs the constant SiLU(β) != 0.

Means come from calibration images (forward pre-hooks on every consumer, exact per consumer even inside residual
chains) or, without images, from the producers' BatchNorm: ``E[act(γ z + β)]`` for ``z ~ N(0, 1)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from yolocomp.prune.graph import ChannelGraph
from yolocomp.prune.plan import Plan


def measured_means(model: nn.Module, graph: ChannelGraph, images: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """Mean input per channel of every consumer conv, over ``images`` (N, 3, H, W in 0-1)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts = {"n": 0}
    hooks = []

    def hook_for(name: str):
        def hook(_mod, args):
            x = args[0].detach().float()
            m = x.mean((0, 2, 3)) * x.shape[0]
            sums[name] = sums[name] + m if name in sums else m

        return hook

    for rec in graph.convs:
        if rec.in_layout is not None:
            conv = modules[rec.name if rec.bare else f"{rec.name}.conv"]
            hooks.append(conv.register_forward_pre_hook(hook_for(rec.name)))
    was_training = model.training
    p = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = images[i:i + batch].to(device=p.device, dtype=p.dtype)
                model(x)
                counts["n"] += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {k: (v / max(counts["n"], 1)).cpu() for k, v in sums.items()}


def _act_mean(conv_module: nn.Module) -> torch.Tensor:
    """E[act(BN(x))] per channel assuming BN-normalised pre-activations ~ N(0, 1) (Gauss-Hermite quadrature)."""
    bn = conv_module.bn
    gamma = bn.weight.detach().float().cpu()
    beta = bn.bias.detach().float().cpu()
    act = getattr(conv_module, "act", nn.Identity())
    z, w = np.polynomial.hermite_e.hermegauss(40)
    z = torch.as_tensor(z, dtype=torch.float32)
    w = torch.as_tensor(w / w.sum(), dtype=torch.float32)
    pre = gamma[:, None] * z[None, :] + beta[:, None]
    with torch.no_grad():
        return (act(pre) * w[None, :]).sum(1)


def analytic_means(model: nn.Module, graph: ChannelGraph) -> dict[str, torch.Tensor]:
    """Data-free means: each space's mean is the sum of its producers' (residual adds sum them)."""
    modules = dict(model.named_modules())
    producer_mean = {}
    space_mean = {}
    for s in graph.spaces:
        total = torch.zeros(s.size)
        for name, off in s.producers:
            if name not in producer_mean:
                producer_mean[name] = _act_mean(modules[name])
            total += producer_mean[name][off:off + s.size]
        space_mean[s.id] = total
    return {rec.name: torch.cat([space_mean[s] for s in rec.in_layout])
            for rec in graph.convs if rec.in_layout is not None}


def compensate(old: nn.Module, new: nn.Module, graph: ChannelGraph, plan: Plan,
               means: dict[str, torch.Tensor]) -> int:
    """Shift the BN running means of consumers in ``new`` by the removed channels' mean contribution.

    Returns the number of convs adjusted.
    """
    from yolocomp.prune.surgery import _index

    old_mods, new_mods = dict(old.named_modules()), dict(new.named_modules())
    adjusted = 0
    for rec in graph.convs:
        if rec.in_layout is None or rec.depthwise or rec.bare or rec.name not in means:
            continue
        keep_in = _index(rec.in_layout, graph, plan)
        n_in = sum(graph.spaces[s].size for s in rec.in_layout)
        removed = torch.ones(n_in, dtype=torch.bool)
        removed[keep_in] = False
        if not removed.any():
            continue
        w = old_mods[rec.name].conv.weight.detach().float().cpu()  # (out, in, k, k)
        delta = (w[:, removed].sum((2, 3)) * means[rec.name][removed][None, :]).sum(1)  # (out,)
        keep_out = _index(rec.out_layout, graph, plan) if rec.out_layout is not None else torch.arange(w.shape[0])
        bn = new_mods[rec.name].bn
        bn.running_mean.sub_(delta[keep_out].to(bn.running_mean))
        adjusted += 1
    return adjusted


def calibration_images(data: str, imgsz: int, n: int = 32, split: str = "train") -> torch.Tensor | None:
    """Up to ``n`` letterboxed images (N, 3, imgsz, imgsz, 0-1) from a data yaml's split (val when train is absent);
    None when the split holds no images (compensation then falls back to the BN estimate)."""
    from yolocomp.eval.images import dataset_images
    from yolocomp.eval.preprocess import batches

    paths = dataset_images(data, split, missing_ok=True)[:n]
    if not paths:
        return None
    return torch.cat([torch.from_numpy(b.array) for b in batches(paths, imgsz, 8)])
