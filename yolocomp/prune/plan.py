"""Turn channel scores into kept channels: one global threshold, met as a share of channels or of FLOPs.

All prunable channels are ranked once by importance (ties spread evenly over spaces), and pruning the ``k`` lowest
gives each space a wish; a family's count is the mean wish of its members (in units of its base width), rounded to
``round_to`` (layer outputs also to a multiple of 8, which Ultralytics' ``make_divisible`` needs), at least
``min_channels`` and the family's own floor. ``k`` is searched by bisection so the chosen share of channels or of
FLOPs lands as close as possible to the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from yolocomp.errors import UserError
from yolocomp.prune.graph import ChannelGraph


@dataclass
class Plan:
    counts: dict[int, int]  #: space id -> kept channel count (every space)
    keep: dict[int, torch.Tensor]  #: space id -> sorted kept indices (every space)
    ratio: float  #: achieved share of prunable channels removed
    flops_reduction: float  #: achieved share of conv FLOPs removed (analytic estimate)


def conv_costs(model: nn.Module, imgsz: int) -> dict[str, tuple[int, int, int, int, int]]:
    """MACs inputs of every Conv2d at ``imgsz``: name -> (kernel area, output pixels, groups, in, out)."""
    costs: dict[str, tuple[int, int, int, int, int]] = {}
    hooks = []

    def hook_for(name: str):
        def hook(mod: nn.Conv2d, _inp, out):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            costs[name] = (k, out.shape[-1] * out.shape[-2], mod.groups, mod.in_channels, mod.out_channels)

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(hook_for(name)))
    was_training = model.training
    p = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return costs


class Planner:
    def __init__(self, graph: ChannelGraph, scores: dict[str, torch.Tensor], costs: dict, min_channels: int = 8,
                 round_to: int = 8, max_layer_ratio: float | None = None):
        if max_layer_ratio is not None and not 0.0 < max_layer_ratio <= 1.0:
            raise UserError(f"max_layer_ratio={max_layer_ratio} must be in (0, 1] (share of one layer's channels)")
        self.max_layer_ratio = max_layer_ratio
        if round_to < 1:
            raise UserError(f"round_to={round_to} must be >= 1 (e.g. 8)")
        if min_channels < 0:
            raise UserError(f"min_channels={min_channels} must be >= 0 (e.g. 8)")
        self.g = graph
        self.min_channels = min_channels
        self.round_to = round_to
        self.costs = costs
        self.prunable = [s for s in graph.spaces if not s.pinned]
        self.importance = {s.id: self._space_importance(s, scores) for s in self.prunable}
        self._rank()
        self.total = sum(s.size for s in self.prunable)
        self.full_flops = sum(self._macs(k, hw, g, ci, co) for k, hw, g, ci, co in costs.values())
        self.base_counts = {s.id: s.size for s in graph.spaces}

    # --- importance and global order ----------------------------------------------------------------------------------
    @staticmethod
    def _space_importance(space, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [scores[name][off:off + space.size].float() for name, off in space.producers if name in scores]
        if not parts:
            return torch.zeros(space.size)
        return torch.stack(parts).mean(0)

    def _rank(self) -> None:
        imps, ties, owners = [], [], []
        for s in self.prunable:
            imp = self.importance[s.id].numpy()
            imps.append(imp)
            ties.append((np.arange(s.size) + 0.5) / s.size)
            owners.append(np.full(s.size, s.id))
        if not imps:
            self.ranks = {}
            return
        imp, tie, owner = np.concatenate(imps), np.concatenate(ties), np.concatenate(owners)
        order = np.lexsort((tie, imp))  # ascending importance; equal scores spread evenly over spaces
        position = np.empty_like(order)
        position[order] = np.arange(order.size)
        self.ranks = {s.id: np.sort(position[owner == s.id]) for s in self.prunable}

    # --- counts for a global cut --------------------------------------------------------------------------------------
    def counts_for(self, k: int) -> dict[int, int]:
        counts = dict(self.base_counts)
        spaces = self.g.spaces
        for fam in self.g.families:
            members = [(sid, f) for sid, f in fam.members if not spaces[sid].pinned]
            if not members:
                continue
            wishes = [(spaces[sid].size - int(np.searchsorted(self.ranks[sid], k))) / f for sid, f in members]
            wish = sum(wishes) / len(wishes)
            base = self._round(wish, fam)
            for sid, f in members:
                counts[sid] = int(base * f)
        return counts

    def _round(self, wish: float, fam) -> int:
        size = fam.base_size
        if wish >= size - 1e-9:
            return size
        step = math.lcm(self.round_to, 8) if fam.layer_output else self.round_to
        base = int(round(wish / step)) * step
        floor = max(self.min_channels, fam.lo)
        if self.max_layer_ratio is not None:  # per-layer limit: keep at least (1 - max) of every width
            floor = max(floor, int(math.ceil(size * (1.0 - self.max_layer_ratio))))
        floor = int(math.ceil(floor / step)) * step if floor > 0 else 0
        return min(size, max(base, floor))  # 0 only when min_channels=0; plan_for refuses that

    @staticmethod
    def _macs(k: int, hw: int, groups: int, cin: int, cout: int) -> float:
        return k * hw * (cin // groups) * cout

    def metrics(self, counts: dict[int, int]) -> tuple[float, float]:
        kept = sum(counts[s.id] for s in self.prunable)
        ratio = 1.0 - kept / self.total if self.total else 0.0
        flops = self.full_flops
        for rec in self.g.convs:
            key = rec.name if rec.bare else f"{rec.name}.conv"
            if key not in self.costs:
                continue
            k, hw, g, ci, co = self.costs[key]
            cin = sum(counts[s] for s in rec.in_layout) if rec.in_layout is not None else ci
            cout = sum(counts[s] for s in rec.out_layout) if rec.out_layout is not None else co
            if rec.depthwise:
                new = k * hw * cout
            else:
                new = self._macs(k, hw, g, cin, cout)
            flops += new - self._macs(k, hw, g, ci, co)
        return ratio, 1.0 - flops / self.full_flops

    # --- search -------------------------------------------------------------------------------------------------------
    def solve(self, ratio: float | None = None, flops_reduction: float | None = None) -> Plan:
        if (ratio is None) == (flops_reduction is None):
            raise UserError("give exactly one of ratio (share of channels) or flops_reduction (share of FLOPs)")
        target = ratio if ratio is not None else flops_reduction
        what = "ratio" if ratio is not None else "flops_reduction"
        if not 0.0 < target < 1.0:
            raise UserError(f"--{what.replace('_', '-')} {target} is outside (0, 1); pick e.g. 0.3")
        idx = 0 if ratio is not None else 1
        n = self.total

        def metric(k: int) -> float:
            return self.metrics(self.counts_for(k))[idx]

        top = metric(n)
        if top < target - 0.02:
            raise UserError(
                f"{what} {target} cannot be reached: with min_channels={self.min_channels} and round_to={self.round_to} "
                f"at most {top:.2f} can be removed from the prunable layers; lower the target or min_channels")
        lo, hi = 0, n  # metric(lo) < target <= metric(hi), metric non-decreasing in k
        if metric(0) >= target:
            hi = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if metric(mid) >= target:
                hi = mid
            else:
                lo = mid
        k = hi if abs(metric(hi) - target) <= abs(metric(lo) - target) else lo
        return self.plan_for(k)

    def plan_for(self, k: int) -> Plan:
        counts = self.counts_for(k)
        empty = [s.name for s in self.prunable if counts[s.id] <= 0]
        if empty:
            raise UserError(f"this target would remove every channel of {empty[0]}; lower it or set min_channels >= 1")
        keep = {}
        for s in self.g.spaces:
            if s.pinned or counts[s.id] == s.size:
                keep[s.id] = torch.arange(s.size)
                continue
            imp = self.importance[s.id].numpy()
            tie = (np.arange(s.size) + 0.5) / s.size
            order = np.lexsort((tie, imp))[::-1]  # most important first
            keep[s.id] = torch.as_tensor(np.sort(order[: counts[s.id]].copy()))
        ratio, flops = self.metrics(counts)
        return Plan(counts, keep, ratio, flops)
