"""Empirical bias correction (Nagel et al., "Data-Free Quantization", sec. 4.2, with data): quantization shifts the
mean of each conv's output channels; measure the shift on calibration images and subtract it from the folded bias.

The detector is walked block by block (:mod:`yolocomp.recon.blocks`): a block is corrected with the corrected blocks
before it already feeding it, so no layer corrects an error that an upstream correction has removed. Statistics are
running sums per channel; the cache holds the feature maps a later block still reads, for the given images only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from yolocomp.quant.modules import QConv, quantizers
from yolocomp.recon.blocks import Block, OutputCache, detector_blocks, run_block


class _ChannelMeans:
    """Probe: running per-channel sums of every conv's pre-activation output."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def __call__(self, conv: QConv, y: torch.Tensor) -> None:
        k = id(conv)
        s = y.detach().double().sum((0, 2, 3))
        self.sums[k] = self.sums[k] + s if k in self.sums else s
        self.counts[k] = self.counts.get(k, 0) + y.numel() // y.shape[1]

    def mean(self, conv: QConv) -> torch.Tensor | None:
        k = id(conv)
        return (self.sums[k] / self.counts[k]).float() if k in self.sums else None


@torch.no_grad()
def _block_means(block: Block, cache: OutputCache, convs: list[QConv], device: torch.device,
                 advance: bool = False) -> _ChannelMeans:
    probe = _ChannelMeans()
    for c in convs:
        c.probe = probe
    try:
        if advance:
            cache.advance(block, device)
        else:
            for b in range(len(cache)):
                run_block(block, cache.inputs(block, b, device))
    finally:
        for c in convs:
            c.probe = None
    return probe


@torch.no_grad()
def _reference_means(block: Block, cache: OutputCache, convs: list[QConv], reference: nn.Module,
                     device: torch.device) -> _ChannelMeans:
    """Pre-activation channel sums of the float convs named like ``convs``, while ``block`` of ``reference`` runs."""
    probe = _ChannelMeans()
    handles = []
    for c in convs:
        m = reference.get_submodule(c.name)
        if isinstance(m, nn.Conv2d):  # a bare conv (Detect's output convs)
            target = m
        elif isinstance(getattr(m, "bn", None), nn.BatchNorm2d):
            target = m.bn
        else:  # Ultralytics Conv fused for inference: the conv carries the folded BN
            target = m.conv
        handles.append(target.register_forward_hook(lambda _m, _x, y, c=c: probe(c, y)))
    try:
        cache.advance(block, device)
    finally:
        for h in handles:
            h.remove()
    return probe


def _shift(conv: QConv, delta: torch.Tensor) -> None:
    if conv.bn is not None:
        conv.bn.bias.add_(delta.to(conv.bn.bias))
    elif conv.conv.bias is not None:
        conv.conv.bias.add_(delta.to(conv.conv.bias))
    else:
        conv.conv.bias = nn.Parameter(delta.to(conv.conv.weight))


@torch.no_grad()
def correct_bias(model: nn.Module, batches: Sequence[torch.Tensor], reference: nn.Module | None = None) -> dict:
    """Shift every weight-quantized conv's bias so its quantized output channels have the float model's means over
    ``batches``, block by block and, inside a block, conv by conv. ``reference``: the float model ``model`` was
    quantized from; without it the same model with its quantizers off stands in, which is the float model only while
    no rounding has been written into the weights (block reconstruction bakes its rounding in). Reports the mean
    |shift| relative to the mean |float output|, averaged over the convs."""
    qs = quantizers(model)
    enabled = {id(q): q.enabled for q in qs}
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    blocks = detector_blocks(model)
    float_blocks = detector_blocks(reference.eval()) if reference is not None else blocks
    if len(float_blocks) != len(blocks):
        raise ValueError(f"reference has {len(float_blocks)} layers, the quantized model {len(blocks)}")
    batches = [b.float() for b in batches]
    float_cache, quant_cache = OutputCache(batches, float_blocks), OutputCache(batches, blocks)
    shifts = []
    try:
        for block, float_block in zip(blocks, float_blocks):
            convs = [c for c in block.module.modules() if isinstance(c, QConv) and c.weight_quant.enabled]
            if reference is not None:
                means = _reference_means(float_block, float_cache, convs, reference, device)
            else:
                for q in qs:
                    q.enabled = False
                means = _block_means(block, float_cache, convs, device, advance=True)  # before this block changes
                for q in qs:
                    q.enabled = enabled[id(q)]
            for c in convs:  # module order: a conv is corrected after the convs feeding it inside the block
                ref, got = means.mean(c), _block_means(block, quant_cache, [c], device).mean(c)
                if ref is not None and got is not None:
                    _shift(c, ref - got)
                    shifts.append(float((ref - got).abs().mean() / ref.abs().mean().clamp_min(1e-8)))
            quant_cache.advance(block, device)
    finally:
        for q in qs:
            q.enabled = enabled[id(q)]
        model.train(was)
    return {"convs": len(shifts), "images": sum(len(b) for b in batches),
            "mean_relative_shift": round(sum(shifts) / max(1, len(shifts)), 6)}
