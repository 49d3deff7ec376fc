"""Quantized building blocks: a conv with its BatchNorm folded (FQN), and a residual bottleneck whose add sees the
same quantized tensor as its first conv (so TensorRT can fuse the add into the second conv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from yolocomp.quant.quantizer import Quantizer


class QConv(nn.Module):
    """``act(bn(conv(q_a(x))))`` with the weight quantized *after* folding BN into it.

    * eval, or BN frozen: ``conv(q_a(x), q_w(W * gamma / sigma), folded bias)`` — exactly the deployed integer conv.
    * training with live BN (Jacob et al. 2018 / FQN): the folded weight uses the running sigma, the conv output is
      divided back by the fold factor and passed through train-mode BN, so the batch statistics still normalise and
      the running statistics keep updating. With quantizers off this equals ``bn(conv(x))`` in both modes.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, act: nn.Module | None = None,
                 w_bits: int = 8, a_bits: int = 8, name: str = "", act_offset: bool = True):
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.act = act if act is not None else nn.Identity()
        self.name = name
        self.act_quant = Quantizer(a_bits, channels=None, signed=None, offset=act_offset)
        self.weight_quant = Quantizer(w_bits, channels=conv.out_channels, signed=True)
        self.bn_frozen = False
        self.rounding: nn.Module | None = None  # learned rounding while PTQ reconstruction fits it (quant.adaround)
        self.probe = None  # callable(conv, pre-activation output) while statistics are gathered

    def extra_repr(self) -> str:
        return f"name={self.name!r}, bn_frozen={self.bn_frozen}"

    def fold_factor(self) -> torch.Tensor:
        bn = self.bn
        f = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return torch.where(f.abs() < 1e-12, torch.full_like(f, 1e-12), f)  # a pruned-to-zero gamma must not divide

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float weight and bias with BN folded in (running statistics)."""
        w, b = self.conv.weight, self.conv.bias
        if self.bn is None:
            return w, b
        f = self.fold_factor()
        bias = self.bn.bias - self.bn.running_mean * f
        if b is not None:
            bias = bias + b * f
        return w * f.view(-1, 1, 1, 1), bias

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    @torch.no_grad()
    def freeze_for_export(self) -> None:
        """Precompute the folded, grid-rounded weight and folded bias as constants (export graphs stay clean)."""
        w, b = self.folded()
        wq = self.weight_quant
        if wq.channels and not wq.learn and wq.enabled:
            wq.init_from_weight(w.detach())  # a tracked weight range: the exported scale is the current weight's
        was = wq.export
        wq.export = False
        w = wq(w.detach()) if wq.enabled else w.detach()
        wq.export = was
        # parameters (initializers), not buffers: buffers would be traced as constants and the weight Q/DQ folded away
        self.export_weight = nn.Parameter(w.clone(), requires_grad=False)
        self.export_bias = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)
        shift = self.act_quant.offset_value()
        self.export_shift_bias = None
        if shift:
            self.export_shift_bias = nn.Parameter(self._shifted_bias(w, b, shift).detach(), requires_grad=False)
        wq.freeze_for_export()

    @staticmethod
    def _shifted_bias(w: torch.Tensor, b: torch.Tensor | None, shift: float) -> torch.Tensor:
        """The bias of a conv that reads ``x - shift`` instead of ``x``: ``b + shift * sum(W)`` per output channel."""
        base = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
        return base + shift * w.sum((1, 2, 3))

    def _quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The BN-folded weight on its grid (or its learned rounding while a reconstruction fits it) and the bias."""
        w, b = self.folded()
        rounding = getattr(self, "rounding", None)
        return (rounding(w) if rounding is not None and self.weight_quant.enabled else self.weight_quant(w)), b

    def forward_q(self, xq: torch.Tensor) -> torch.Tensor:
        """Forward from an input that is already quantized (shared quantizer upstream)."""
        if getattr(self, "export_weight", None) is not None and self.weight_quant.export:
            # grid-rounded float weight; the exporter would constant-fold a weight Q/DQ away, so
            # yolocomp.export.onnx_qdq inserts DequantizeLinear(int8 weight) itself
            return self.act(self._conv(xq, self.export_weight, self.export_bias))
        if self.bn is None or not self.training or self.bn_frozen:
            wq, b = self._quantized_weight()
            y = self._conv(xq, wq, b)
            if getattr(self, "probe", None) is not None:
                self.probe(self, y)  # pre-activation statistics (quant.bias_correction)
            return self.act(y)
        f = self.fold_factor()
        y = self._conv(xq, self.weight_quant(self.conv.weight * f.view(-1, 1, 1, 1)), None) / f.view(1, -1, 1, 1)
        if self.conv.bias is not None:
            y = y + self.conv.bias.view(1, -1, 1, 1)
        return self.act(self.bn(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reads_shifted():
            return self.forward_shifted(x)
        return self.forward_q(self.act_quant(x))

    def reads_shifted(self) -> bool:
        """Whether this conv runs as it deploys behind a shifted 8-bit input grid: the container's values ``x - c``
        with ``c * sum(W)`` in the bias. Evaluation and export both take this form, so the fake-quant model and the
        exported graph do the same float arithmetic; training (LSQ, live BN) keeps ``conv(q_a(x))``, equal in exact
        arithmetic."""
        if getattr(self, "export_shift_bias", None) is not None and self.weight_quant.export:
            return True
        live_bn = self.training and self.bn is not None and not self.bn_frozen
        return self.act_quant.shifts_container() and not live_bn and getattr(self, "probe", None) is None

    def forward_shifted(self, x: torch.Tensor) -> torch.Tensor:
        """Pad -> Sub -> Q -> DQ -> Conv(no padding, shifted bias). The zero padding happens before the shift, so the
        border sees the same zeros as ``conv(q_a(x))``."""
        c = self.conv
        if self.weight_quant.export and getattr(self, "export_shift_bias", None) is not None:
            w, bias = self.export_weight, self.export_shift_bias
        else:
            w, b = self._quantized_weight()
            bias = self._shifted_bias(w, b, self.act_quant.offset_value())
        pad_h, pad_w = c.padding if isinstance(c.padding, tuple) else (c.padding, c.padding)
        if pad_h or pad_w:
            x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
        return self.act(F.conv2d(self.act_quant.quantize_shifted(x), w, bias, c.stride, 0, c.dilation, c.groups))


class QBottleneck(nn.Module):
    """Ultralytics Bottleneck whose residual add uses the quantized input (TensorRT fuses conv + add that way)."""

    def __init__(self, cv1: QConv, cv2: nn.Module, add: bool):
        super().__init__()
        self.cv1, self.cv2, self.add = cv1, cv2, add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cv1.reads_shifted():
            # cv1 quantizes its zero-padded input itself, so the residual quantizes x on its own; the Add still reads
            # a DQ (TensorRT fuses that add into cv2) and the shift rides on cv2's side
            y = self.cv2(self.cv1(x))
            return self.cv1.act_quant.quantize_shifted(x) + (y + self.cv1.act_quant.offset_value()) if self.add else y
        xq = self.cv1.act_quant(x)
        y = self.cv2(self.cv1.forward_q(xq))
        return xq + y if self.add else y


def quant_convs(model: nn.Module) -> list[QConv]:
    """Every QConv of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, QConv)]


def quantizers(model: nn.Module) -> list[Quantizer]:
    """Every distinct quantizer of a model (shared ones once)."""
    seen: dict[int, Quantizer] = {}
    for m in model.modules():
        if isinstance(m, Quantizer):
            seen.setdefault(id(m), m)
    return list(seen.values())


def freeze_for_export(model: nn.Module) -> None:
    """Put every quantizer and QConv of ``model`` (an export copy) into export mode with constant parameters."""
    for q in quantizers(model):
        q.observing = False  # a calibration left open must not export unquantized weights
    for conv in quant_convs(model):
        conv.freeze_for_export()
    for q in quantizers(model):
        q.freeze_for_export()


def set_quant_state(model: nn.Module, enabled: bool | None = None, export: bool | None = None) -> None:
    for q in quantizers(model):
        if enabled is not None:
            q.enabled = enabled
        if export is not None:
            q.export = export
