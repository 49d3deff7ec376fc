"""CAP (CAP-YOLO, Xu et al. 2022): channel-attention pruning as a training :class:`Method`.

``prepare`` wraps every conv that produces prunable channels in :class:`AttentionGate` (its Conv followed by an ECA-
or SE-style attention). The attention is ``2 * sigmoid(z)`` with the last layer zero-initialised, so at the start the
gate is exactly the identity and training only moves it where a channel matters more or less. The mean attention of
each channel over the training batches is its importance: unlike BN γ, it is measured on the same scale in every
stage, so one global threshold does not over-prune the neck. ``finalize`` unwraps the gates (no extra layers remain)
and prunes by those means. On a converged model that a few hundred images cannot retrain,
:func:`yolocomp.recon.measure_attention` trains the gates alone instead.

The means are buffers of the gates, not state of the method: checkpoints, resume, the EMA and every DDP worker carry
them. Each epoch end merges them over DDP ranks (weighted by batches) and copies them into the EMA verbatim (the EMA
would otherwise average a running mean), so the checkpoint Ultralytics saves right after holds the exact statistics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from yolocomp.errors import UserError
from yolocomp.methods import Method


class ECA(nn.Module):
    """Efficient channel attention: 1-D conv across channels of the pooled features."""

    def __init__(self, channels: int, k: int | None = None):
        super().__init__()
        if k is None:  # adaptive kernel from the ECA paper: odd, grows with log2(C)
            t = int(abs((math.log2(channels) + 1) / 2))
            k = t if t % 2 else t + 1
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=True)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3)).unsqueeze(1)  # (N, 1, C)
        return 2 * torch.sigmoid(self.conv(y).squeeze(1))  # (N, C), 1.0 at init


class SE(nn.Module):
    """Squeeze-and-excitation attention."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))


class AttentionGate(nn.Module):
    """A Conv followed by channel attention; keeps the running mean attention per channel over training batches."""

    STATISTICS = ("attn_mean", "attn_batches")

    def __init__(self, block: nn.Module, kind: str = "eca"):
        super().__init__()
        channels = block.conv.out_channels
        self.block = block
        self.attn = ECA(channels) if kind == "eca" else SE(channels)
        # float, not int: a merge over DDP ranks leaves fractional counts (see merge_statistics)
        self.register_buffer("attn_mean", torch.zeros(channels))
        self.register_buffer("attn_batches", torch.zeros(()))
        for attr in ("f", "i", "type", "np"):  # a top-level layer: DetectionModel routes by these
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        a = self.attn(y)
        if self.training:
            with torch.no_grad():
                self.attn_batches += 1
                self.attn_mean += (a.detach().float().mean(0) - self.attn_mean) / self.attn_batches
        return y * a[:, :, None, None]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


class ChannelAttentionPruning(Method):
    """Insert attention gates, accumulate mean attention per channel while training, prune by it in ``finalize``."""

    name = "cap"

    def __init__(self, ratio: float | None = 0.3, flops_reduction: float | None = None, attention: str = "se",
                 layers: tuple[int, ...] | None = None, min_channels: int = 8, round_to: int = 8,
                 ignore: tuple[int, ...] = (), imgsz: int = 640, calib: torch.Tensor | None = None,
                 max_layer_ratio: float | None = None):
        if attention not in {"eca", "se"}:
            raise UserError(f"attention '{attention}' unknown; use eca or se")
        self.ratio, self.flops_reduction, self.attention = ratio, flops_reduction, attention
        self.layers = None if layers is None else tuple(layers)
        self.min_channels, self.round_to, self.ignore, self.imgsz = min_channels, round_to, tuple(ignore), imgsz
        self.max_layer_ratio = max_layer_ratio
        self.calib = calib  #: images for mean compensation when pruning (optional)
        self.importance: dict[str, torch.Tensor] | None = None  #: scores read by the last finalize
        self.batches = 0.0  #: training batches behind them (per rank under DDP)
        self.summary: dict | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["calib"] = None  # large image tensor: not shipped to DDP workers (finalize then uses the BN estimate)
        return state

    # --- structure ----------------------------------------------------------------------------------------------------
    def gate_targets(self, model: nn.Module) -> list[str]:
        """Convs producing prunable channels (optionally only in ``layers``)."""
        from yolocomp.prune.graph import build_graph

        graph = build_graph(strip_gates(model, copy=True), self.ignore)
        names = {p for s in graph.prunable_spaces() for p, _ in s.producers}
        if self.layers is not None:
            names = {n for n in names if int(n.split(".")[1]) in self.layers}
        return sorted(names)

    def prepare(self, model: nn.Module) -> bool:
        if any(isinstance(m, AttentionGate) for m in model.modules()):
            return False  # resumed: gates already there
        changed = False
        p = next(model.parameters())
        for name in self.gate_targets(model):
            _set(model, name, AttentionGate(model.get_submodule(name), self.attention).to(p.device))
            changed = True
        return changed

    # --- statistics ---------------------------------------------------------------------------------------------------
    def on_epoch_end(self, trainer: Any) -> None:
        from yolocomp.integration import unwrap
        from yolocomp.integration.access import ema_model

        model = unwrap(trainer.model)
        merge_statistics(model)
        ema = ema_model(trainer)
        if ema is not None:
            copy_statistics(model, ema)

    def scores(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Mean attention per channel of every gate of ``model``, keyed by the gated conv's name; without a model, the
        scores the last ``finalize`` read (its result has no gates left)."""
        scores = self.importance if model is None else read_statistics(model)[0]
        if scores is None:
            raise UserError("CAP has no attention statistics: train with the method attached before finalize()")
        return scores

    def finalize(self, model: nn.Module) -> nn.Module:
        self.importance, self.batches = read_statistics(model)  # kept: the returned model has no gates
        plain = strip_gates(model, copy=True)
        if self.ratio is None and self.flops_reduction is None:
            return plain
        from yolocomp.prune.pruner import prune_model

        pruned, self.summary = prune_model(plain, ratio=self.ratio, flops_reduction=self.flops_reduction,
                                           method="cap", importance=self.scores(), min_channels=self.min_channels,
                                           round_to=self.round_to, ignore=self.ignore, imgsz=self.imgsz,
                                           calib=self.calib, max_layer_ratio=self.max_layer_ratio)
        return pruned

    def __repr__(self) -> str:
        return f"ChannelAttentionPruning(ratio={self.ratio}, attention={self.attention!r})"


def strip_gates(model: nn.Module, copy: bool = False) -> nn.Module:
    """Replace every AttentionGate by the Conv it wraps (the model then holds only stock modules)."""
    from copy import deepcopy

    if not any(isinstance(m, AttentionGate) for m in model.modules()):
        return model
    out = deepcopy(model) if copy else model
    for name, m in list(out.named_modules()):
        if isinstance(m, AttentionGate):
            _set(out, name, m.block)
    return out


def read_statistics(model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, float]:
    """(mean attention per channel keyed by gated conv name, batches seen) from the gates; (None, 0) without any."""
    gates = {name.removesuffix(".block"): m for name, m in model.named_modules() if isinstance(m, AttentionGate)}
    batches = min((float(m.attn_batches) for m in gates.values()), default=0.0)
    if batches <= 0:
        return None, 0.0
    return {name: m.attn_mean.detach().float().cpu().clone() for name, m in gates.items()}, batches


def merge_statistics(model: nn.Module) -> None:
    """Make every DDP rank's gate statistics the batch-weighted mean over all ranks (no-op without DDP).

    Each rank then holds ``batches = total / world``, so merging again after more local batches stays exact.
    """
    from yolocomp.integration.access import all_reduce_sum_

    gates = [m for m in model.modules() if isinstance(m, AttentionGate)]
    totals = [t for g in gates for t in (g.attn_mean * g.attn_batches, g.attn_batches.clone().reshape(1))]
    world = all_reduce_sum_(totals)
    if world == 1:
        return
    with torch.no_grad():
        for g, weighted, batches in zip(gates, totals[0::2], totals[1::2]):
            if float(batches) > 0:
                g.attn_mean.copy_(weighted / batches)
                g.attn_batches.fill_(float(batches) / world)


def copy_statistics(source: nn.Module, target: nn.Module) -> None:
    """Copy the gates' statistics buffers from ``source`` into the same-structured ``target`` (e.g. the EMA)."""
    buffers = dict(target.named_buffers())
    with torch.no_grad():
        for name, value in source.named_buffers():
            if name.rpartition(".")[2] in AttentionGate.STATISTICS and name in buffers:
                buffers[name].copy_(value)
