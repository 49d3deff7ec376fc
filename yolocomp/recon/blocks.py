"""The blocks of an Ultralytics detector, in execution order, and a streaming cache of their outputs.

A block is one entry of ``model.model`` (Conv, C2f / C3 / C3k2, SPPF, C2PSA, Concat, Upsample, Detect). Blocks
without parameters (Concat, Upsample) are run, never fitted. Detect is one block whose output is its raw head
(box distributions and class logits, ``(B, 4 * reg_max + nc, anchors)``), so fitting it needs no decoding.

:class:`OutputCache` keeps, per calibration batch, only the layer outputs a later block still reads (the detector's
skip connections), and drops each as soon as its last reader ran: peak memory is a few feature maps per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IMAGE = -1  #: source index of the input images


@dataclass
class Block:
    index: int  #: position in ``model.model``
    module: nn.Module
    sources: list[int]  #: layer indices it reads (IMAGE for the input images)
    kind: str  #: module type name
    fittable: bool  #: has trainable parameters
    last_use: int = -1  #: index of the last block reading its output (-1: none, e.g. Detect)


def _sources(i: int, f: int | list[int]) -> list[int]:
    if isinstance(f, int):
        return [IMAGE if i == 0 else (i - 1 if f == -1 else f)]
    return [i - 1 if j == -1 else j for j in f]


def detector_blocks(model: nn.Module) -> list[Block]:
    """Every layer of ``model.model`` as a :class:`Block`, with the layers it reads and who reads it last."""
    # a quantized layer keeps the kind of the float layer it replaced, so student and teacher blocks still pair up
    blocks = [Block(i, m, _sources(i, m.f), getattr(m, "float_type", type(m).__name__), any(True for _ in m.parameters()))
              for i, m in enumerate(model.model)]
    for b in blocks:
        for j in b.sources:
            if j != IMAGE:
                blocks[j].last_use = max(blocks[j].last_use, b.index)
    return blocks


def is_head(module: nn.Module) -> bool:
    from ultralytics.nn.modules import Detect

    return isinstance(module, Detect)


def run_block(block: Block, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The block's output for its inputs (a Detect block: the raw head, boxes then class logits per anchor)."""
    x = inputs[0] if isinstance(block.module.f, int) else inputs
    if is_head(block.module):
        head = block.module
        raw = head.forward_head(x, **head.one2many)
        return torch.cat([raw["boxes"], raw["scores"]], 1)
    return block.module(x)


class OutputCache:
    """Layer outputs of one model for a list of batches, kept only while a later block still reads them."""

    def __init__(self, images: list[torch.Tensor], blocks: list[Block], store: str | torch.device = "cpu"):
        self.blocks = blocks
        self.store = torch.device(store)
        self.batches = len(images)
        self.outputs: dict[int, list[torch.Tensor]] = {IMAGE: [b.to(self.store) for b in images]}
        self.last_use = {b.index: b.last_use for b in blocks}
        self.last_use[IMAGE] = max(b.index for b in blocks if IMAGE in b.sources)

    def inputs(self, block: Block, batch: int, device: torch.device) -> list[torch.Tensor]:
        return [self.outputs[j][batch].to(device) for j in block.sources]

    def __len__(self) -> int:
        return self.batches

    @torch.no_grad()
    def advance(self, block: Block, device: torch.device) -> list[torch.Tensor] | None:
        """Run ``block`` on every batch, keep its output if a later block reads it, drop what nobody reads any more.
        Returns the outputs (on the store device)."""
        outs = [run_block(block, self.inputs(block, b, device)).to(self.store) for b in range(len(self))]
        if block.last_use > block.index:
            self.outputs[block.index] = outs
        for j in [j for j in self.outputs if self.last_use[j] <= block.index]:
            del self.outputs[j]
        return outs
