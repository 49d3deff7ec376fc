"""Ramp gates: drive chosen output channels of a Conv smoothly to zero, then remove them exactly.

A :class:`RampGate` wraps an Ultralytics ``Conv`` (conv -> BN -> act) and multiplies the BN output of its dropped
channels by ``m(t)``, going from 1 to 0 over ``ramp_total`` training iterations (linear or cosine). At ``m = 0`` the
channel outputs ``act(0) = 0`` (SiLU, ReLU, identity), so removing it from the network changes nothing: the
producers of a residual space are all gated with the same channels, and their sum is zero too.

All state lives in buffers of the gates (the ``drop`` mask, ``ramp_step`` and ``ramp_total``), never on a method:
checkpoints, resume and every DDP worker carry it. They are integer / bool tensors, so Ultralytics' EMA does not
average them; :func:`copy_ramp_state` copies them into the EMA verbatim.
"""

from __future__ import annotations

import math
from copy import deepcopy
from typing import Any

import torch
from torch import nn

from yolocomp.errors import UserError
from yolocomp.prune.graph import ChannelGraph, build_graph
from yolocomp.prune.plan import Plan, Planner, conv_costs

SHAPES = ("linear", "cosine")


def ramp_value(step: int, total: int, shape: str) -> float:
    """Multiplier of a dropped channel after ``step`` of ``total`` iterations: 1 at the start, exactly 0 at the end."""
    if total <= 0 or step >= total:
        return 0.0 if total > 0 else 1.0  # total 0: not started (schedule not set yet)
    t = step / total
    return 1.0 - t if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


class RampGate(nn.Module):
    """An Ultralytics Conv whose dropped output channels are scaled by the ramp on the BN output."""

    STATE = ("drop", "ramp_step", "ramp_total")

    def __init__(self, block: nn.Module, drop: torch.Tensor, shape: str = "cosine"):
        super().__init__()
        if shape not in SHAPES:
            raise UserError(f"ramp shape '{shape}' unknown; use one of {SHAPES}")
        if not isinstance(getattr(block, "bn", None), nn.BatchNorm2d):
            raise UserError("ramp gates need a Conv with BatchNorm (an unfused model)")
        if float(block.act(torch.zeros(1))) != 0.0:
            raise UserError(f"{type(block.act).__name__}(0) != 0: a zeroed channel would not be removable exactly")
        self.block = block
        self.shape = shape
        self.register_buffer("drop", drop.bool().clone().to(block.conv.weight.device))
        self.register_buffer("ramp_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("ramp_total", torch.zeros((), dtype=torch.long))
        for attr in ("f", "i", "type", "np"):  # a top-level layer: DetectionModel routes by these
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def value(self) -> float:
        return ramp_value(int(self.ramp_step), int(self.ramp_total), self.shape)

    def multiplier(self) -> torch.Tensor:
        """:func:`ramp_value` as a tensor on the gate's device (no host sync in the forward pass)."""
        t = (self.ramp_step.float() / self.ramp_total.clamp(min=1).float()).clamp(0.0, 1.0)
        m = 1.0 - t if self.shape == "linear" else 0.5 * (1.0 + torch.cos(math.pi * t))
        m = torch.where(t >= 1.0, torch.zeros_like(m), m)  # exactly zero at the end, whatever cos(pi) rounds to
        return torch.where(self.ramp_total > 0, m, torch.ones_like(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        # Ultralytics fuses BN into the conv for validation (Conv.fuse deletes .bn): the conv output is then the BN's.
        y = b.bn(b.conv(x)) if hasattr(b, "bn") else b.conv(x)
        scale = torch.where(self.drop, self.multiplier(), torch.ones((), device=y.device))
        y = y * scale.to(y.dtype)[None, :, None, None]
        if self.training:
            self.ramp_step += 1  # one training forward = one iteration (every DDP rank sees the same count)
        return b.act(y)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def gates(model: nn.Module) -> dict[str, RampGate]:
    """Every ramp gate of ``model``, keyed by the name of the Conv it wraps."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RampGate)}


def insert_gates(model: nn.Module, graph: ChannelGraph, plan: Plan, shape: str = "cosine") -> int:
    """Wrap every Conv that outputs a channel the plan drops (producers and depthwise convs); returns how many."""
    from yolocomp.prune.surgery import _index

    n = 0
    for rec in graph.convs:
        if rec.bare or rec.out_layout is None:
            continue
        block = model.get_submodule(rec.name)
        keep = _index(rec.out_layout, graph, plan)
        drop = torch.ones(block.conv.out_channels, dtype=torch.bool)
        drop[keep] = False
        if drop.any():
            _set(model, rec.name, RampGate(block, drop, shape))
            n += 1
    return n


def set_schedule(model: nn.Module, total: int) -> None:
    """Start every gate's ramp over ``total`` iterations (from step 0)."""
    for g in gates(model).values():
        g.ramp_total.fill_(max(int(total), 1))
        g.ramp_step.zero_()


def finish_ramps(model: nn.Module) -> None:
    """Move every gate to the end of its ramp (dropped channels exactly zero)."""
    for g in gates(model).values():
        g.ramp_total.clamp_(min=1)
        g.ramp_step.copy_(g.ramp_total)


def copy_ramp_state(source: nn.Module, target: nn.Module) -> None:
    """Copy the gates' buffers from ``source`` into the same-structured ``target`` (e.g. the EMA)."""
    buffers = dict(target.named_buffers())
    with torch.no_grad():
        for name, value in source.named_buffers():
            if name.rpartition(".")[2] in RampGate.STATE and name in buffers:
                buffers[name].copy_(value)


def strip_ramp_gates(model: nn.Module, copy: bool = False) -> nn.Module:
    """Replace every gate by the Conv it wraps (weights untouched; the ramp no longer applies)."""
    out = deepcopy(model) if copy else model
    for name, g in gates(out).items():
        _set(out, name, g.block)
    return out


def ramp_plan(model: nn.Module, plain: nn.Module, graph: ChannelGraph, imgsz: int = 640) -> Plan:
    """The plan that keeps exactly the channels no gate drops (``plain``: ``model`` without its gates)."""
    drops = {name: g.drop.cpu() for name, g in gates(model).items()}
    counts, keep = {}, {}
    for s in graph.spaces:
        dropped = torch.zeros(s.size, dtype=torch.bool)
        for name, offset in s.producers:
            if name in drops:
                dropped |= drops[name][offset:offset + s.size]
        if s.pinned and dropped.any():
            raise UserError(f"{s.name} is pinned but a ramp gate drops some of its channels")
        keep[s.id] = torch.nonzero(~dropped).flatten()
        counts[s.id] = int(keep[s.id].numel())
    planner = Planner(graph, {}, conv_costs(plain, imgsz))
    ratio, flops = planner.metrics(counts)
    return Plan(counts, keep, ratio, flops)


def remove_ramped_channels(model: nn.Module, imgsz: int = 640) -> tuple[nn.Module, dict[str, Any]]:
    """Physically remove the channels the gates drop; returns ``(plain Ultralytics model, summary)``.

    The ramps are finished first, so the result computes exactly what ``model`` computes at the end of its ramp
    (the removed channels were zero). ``model`` is not modified. ``summary["kept_channels"]``: per layer index whose
    output changed, the kept output channel indices (for :mod:`yolocomp.recon`'s ``channel_map``).
    """
    from yolocomp.prune.surgery import build_pruned, layer_keep

    if not gates(model):
        raise UserError("the model has no ramp gates: nothing to remove (train with ProgressivePruning first)")
    plain = strip_ramp_gates(model, copy=True)
    graph = build_graph(plain)
    plan = ramp_plan(model, plain, graph, imgsz)
    pruned = build_pruned(plain, graph, plan)
    summary = {"achieved": {"ratio": round(plan.ratio, 4), "flops_reduction": round(plan.flops_reduction, 4)},
               "kept_channels": layer_keep(graph, plan)}
    return pruned, summary
