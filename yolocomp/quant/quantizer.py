"""Fake quantizers: zero-point 0, 4 or 8 bits, per-tensor (activations) or per-output-channel (weights); symmetric,
except that an activation grid may put fewer levels below zero than above (``neg_levels``). Below 8 bits such a grid
fits in the INT8 container as it is; an 8-bit one (e.g. -2..253 for a SiLU output, which never goes below -0.28) is
stored shifted by a whole number of steps (``container_offset``): ``x - k*s`` is quantized with zero point 0 and the
consumer adds ``k*s`` back (the exporter folds it into the conv bias), which is how TensorRT's signed, symmetric INT8
gets the resolution of an asymmetric grid.

Training uses LSQ (Esser et al., "Learned Step Size Quantization"): the step size ``s`` is a parameter, the rounding
passes gradients straight through, and the gradient of ``s`` is scaled by ``g = 1 / sqrt(N * Qp)``. Evaluation and
export use ``torch.fake_quantize_per_*_affine``, the same maths, which the TorchScript ONNX exporter turns into
QuantizeLinear / DequantizeLinear pairs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from yolocomp.quant.observers import (
    HistogramObserver,
    choose_range,
    offset_grid,
    range_method,
    shifted_grid,
    weight_scales,
)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range (Qn, Qp) of a symmetric quantizer, e.g. 8-bit signed -> (-128, 127), 4-bit unsigned -> (0, 15)."""
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"bits={bits} is not supported; use 4 or 8")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Identity in the forward pass, gradient multiplied by ``g`` in the backward pass."""
    return (x - x * g).detach() + x * g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """LSQ fake quantization: ``round(clamp(x / s, Qn, Qp)) * s`` with the paper's step-size gradient scale ``g``."""
    s = grad_scale(step, g)
    return round_ste(torch.clamp(x / s, qn, qp)) * s


class Quantizer(nn.Module):
    """One fake quantizer with a learned step size (LSQ), initialised from calibration.

    ``channels=None``: per-tensor (activations); ``channels=C``: per-channel along axis 0 (weights). ``signed=None``
    decides the sign at calibration: signed at 8 bits (TensorRT's INT8 is signed only; without ``offset`` an image then
    uses 128 of the levels); below 8 bits unsigned when every observed value is >= 0 (images, ReLU outputs), else signed, and the
    ``mse`` calibrator then also chooses how many of the levels lie below zero (``neg_levels``, see
    :func:`~yolocomp.quant.observers.shifted_grid`). At 8 bits with ``offset=True`` calibration gives the grid as
    many levels below zero as the data's minimum needs (:func:`~yolocomp.quant.observers.offset_grid`) and the rest
    above. Every grid is stored in an INT8 container with zero point 0 (a sub-8-bit grid is a clamp to its levels
    before the Q/DQ pair, an 8-bit shifted grid a constant shift around it) unless 8-bit unsigned is asked for
    explicitly (UINT8, not for TensorRT).

    Modes: ``enabled=False`` passes values through; ``observing=True`` passes through and records statistics for
    calibration; ``learn=False`` learns no step size: a weight quantizer always uses its weight's current range
    (max-abs, MSE clip below 8 bits), an activation quantizer tracks an EMA of the batch max-abs while training;
    ``export=True`` uses the ONNX-exportable torch fake-quant ops.
    """

    def __init__(self, bits: int = 8, channels: int | None = None, signed: bool | None = True, learn: bool = True,
                 offset: bool = False):
        super().__init__()
        self.bits = int(bits)
        self.channels = channels
        self.signed = signed
        self.learn = learn
        self.scale = nn.Parameter(torch.ones(channels or 1), requires_grad=learn)
        # float (not bool) so Ultralytics' ModelEMA keeps it consistent; > 0.5 means initialised
        self.register_buffer("initialized", torch.zeros(()))
        self.enabled = True
        self.observing = False
        self.export = False
        self.observer: HistogramObserver | None = None
        self.sign_from_data = signed is None  # calibration decides the sign (and below 8 bits the grid)
        self.neg_levels: int | None = None  # levels under zero, when calibration chose them
        self.offset = offset  # 8 bits: calibration may shift the grid (container_offset)
        self.drop_prob = 0.0  # QDrop, while a reconstruction fits this quantizer (quant.adaround)

    # --- pickling: the observer is calibration-time state only ------------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["observer"] = None
        return state

    @property
    def is_signed(self) -> bool:
        return True if self.signed is None else bool(self.signed)

    @property
    def qrange(self) -> tuple[int, int]:
        below = getattr(self, "neg_levels", None)  # checkpoints pickled before the shifted grids lack it
        if below is not None and self.bits <= 8 and not self.channels:
            return -below, 2**self.bits - 1 - below
        return qrange(self.bits, self.is_signed)

    @property
    def container_offset(self) -> int:
        """Whole steps the grid is shifted by to fit the signed INT8 container (0 unless an 8-bit grid has fewer
        than 128 levels below zero)."""
        if self.bits != 8 or self.channels or not self.is_signed:  # an explicit UINT8 grid is its own container
            return 0
        return max(0, self.qrange[1] - 127)

    def shifts_container(self) -> bool:
        """Whether the next forward fake-quantizes a shifted 8-bit grid through the container (evaluation, export,
        fixed-range training), rather than passing through, observing or learning the step (LSQ)."""
        if not self.container_offset or not self.enabled or self.observing or self.initialized.item() < 0.5:
            return False
        return self.export or not (self.training and self.learn)

    def offset_value(self) -> float:
        """The shift ``k * s`` the container holds this grid's values by (0.0 for an unshifted grid)."""
        k = self.container_offset
        if not k or not self.enabled:
            return 0.0
        s = self.export_scale if self.export and hasattr(self, "export_scale") else self.step().detach()
        return float(k * s)

    def extra_repr(self) -> str:
        kind = f"per-channel({self.channels})" if self.channels else "per-tensor"
        sign = "auto" if self.signed is None else ("signed" if self.signed else "unsigned")
        if getattr(self, "neg_levels", None) is not None and self.bits <= 8 and not self.channels:
            sign = f"levels {self.qrange[0]}..{self.qrange[1]}"
        return f"bits={self.bits}, {kind}, {sign}, learn={self.learn}, enabled={self.enabled}"

    def step(self) -> torch.Tensor:
        """Positive step size(s), shaped to broadcast against the input."""
        s = self.scale.abs().clamp_min(1e-8)
        return s.view(-1, *([1] * 3)) if self.channels else s.view(())

    # --- calibration ------------------------------------------------------------------------------------------------
    def init_from_weight(self, w: torch.Tensor) -> None:
        """Per-channel step sizes from the weight itself (max-abs at 8 bits, MSE-optimal clipping below)."""
        qn, qp = self.qrange
        with torch.no_grad():
            self.scale.data = weight_scales(w.detach(), qp, mse=self.bits < 8).to(self.scale)
            self.initialized.fill_(1.0)

    def start_observing(self) -> None:
        self.observing = True
        self.observer = HistogramObserver()

    def finish_observing(self, method: str = "auto", **kwargs: float) -> None:
        """Set the step size from the recorded statistics with ``method`` (auto, minmax, percentile, mse, ema)."""
        self.observing = False
        obs = self.observer
        if obs is None or obs.count == 0:
            return  # never reached (e.g. unused branch): keep what it had
        chose_sign = self.signed is None or getattr(self, "sign_from_data", False)  # not fixed by the caller
        if self.signed is None:
            self.signed = self._sign_for(obs.min_value)
        shift = chose_sign and getattr(self, "offset", False) and self.bits == 8 and not self.channels
        method = range_method(method, self.bits, shifted=shift)
        if chose_sign and self.signed and self.bits < 8 and not self.channels and method == "mse":
            self.neg_levels, clip = shifted_grid(obs, self.bits)
        else:
            if chose_sign:  # recalibrated by another method: back to the plain grid of the sign
                self.neg_levels = None
            clip = choose_range(obs, method, levels=2**self.bits - 1 if shift else self.qrange[1], **kwargs)
            if shift:
                self.neg_levels = offset_grid(obs.min_value, clip, self.bits)
        with torch.no_grad():
            self.scale.data.fill_(max(clip, 1e-8) / self.qrange[1])
            self.initialized.fill_(1.0)
        self.observer = None

    # --- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            if self.observer is not None:
                self.observer.update(x.detach())
            return x
        if not self.enabled:
            return x
        if self.initialized.item() < 0.5:  # lazy init from the first batch (LSQ's rule for unseen activations)
            self._lazy_init(x)
        qn, qp = self.qrange
        if self.channels and not self.learn and not self.export:
            # weights with a tracked range: always the current weight's own range (max-abs, MSE clip below 8 bits),
            # in training and evaluation alike, so nothing is stale; stored only while training (evaluation may run
            # under inference_mode, whose tensors must not end up in the parameters)
            step = weight_scales(x.detach(), qp, mse=self.bits < 8)
            if self.training:
                with torch.no_grad():
                    self.scale.data.copy_(step.to(self.scale))
            return self._fake_quant(x, step.view(-1, 1, 1, 1))
        if self.training and not self.learn and not self.export:
            self._track_range(x, qp)  # activations' fixed-range alternative: the range follows the data
        if self.export or not (self.training and self.learn):
            return self._fake_quant(x)
        n = x.numel() / (self.channels or 1)
        xq = lsq_quantize(x, self.step(), qn, qp, 1.0 / math.sqrt(n * qp))
        drop = getattr(self, "drop_prob", 0.0)  # checkpoints pickled before QDrop lack it
        if drop > 0:
            # QDrop (Wei et al. 2022): each element keeps its float value with probability ``drop``, so the fitted
            # weights stay accurate for a neighbourhood of activation perturbations, not only the fitting ones
            return torch.where(torch.rand_like(x) < drop, x, xq)
        return xq

    @torch.no_grad()
    def _track_range(self, x: torch.Tensor, qp: int) -> None:
        """Activations: EMA of the per-batch max-abs (weights with a tracked range are handled in forward)."""
        self.scale.data.mul_(0.99).add_(0.01 * x.abs().max() / qp)

    def _sign_for(self, min_value: float) -> bool:
        return self.bits >= 8 or min_value < 0

    def _lazy_init(self, x: torch.Tensor) -> None:
        if self.channels:
            self.init_from_weight(x)
            return
        if self.signed is None:
            self.signed = self._sign_for(x.detach().min().item())
        qn, qp = self.qrange
        with torch.no_grad():
            # LSQ's initialisation 2*mean|x|/sqrt(Qp), bounded by max|x|/Qp so no range is wider than the data
            init = min(2 * x.detach().abs().mean().item() / math.sqrt(qp), x.detach().abs().max().item() / qp)
            self.scale.data.fill_(max(init, 1e-8))
            self.initialized.fill_(1.0)

    def freeze_for_export(self) -> None:
        """Store the step size and zero point as plain buffers so the exported graph holds constants, not the
        arithmetic that derives them."""
        s = self.step().detach().reshape(-1 if self.channels else ()).float().clone()
        self.register_buffer("export_scale", s, persistent=False)
        self.register_buffer("export_zp", torch.zeros(s.shape, dtype=torch.int32, device=s.device), persistent=False)
        self.export = True

    def _fake_quant(self, x: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        """Fake quantization through the torch ops that export as ONNX QuantizeLinear/DequantizeLinear (8-bit
        containers: lower bit widths clamp to their own grid first, which keeps the result exact)."""
        shift = self.offset_value()
        if shift:
            return self._fake_quant_container(x - shift, step) + shift
        return self._fake_quant_container(x, step)

    def quantize_shifted(self, x: torch.Tensor) -> torch.Tensor:
        """The container's values: the fake-quantized ``x - offset_value()`` (the caller adds the shift back, e.g.
        folded into a conv bias, so the exported graph is Sub -> Q -> DQ -> Conv)."""
        return self._fake_quant_container(x - self.offset_value())

    def _fake_quant_container(self, x: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        qn, qp = self.qrange
        lo, hi = (-128, 127) if self.is_signed or self.bits < 8 else (0, 255)
        if self.export and hasattr(self, "export_scale"):
            s, zp = self.export_scale, self.export_zp
            if self.bits < 8 and not self.channels:  # weights arrive pre-rounded to their 4-bit grid
                x = torch.clamp(x, qn * float(s), qp * float(s))
        else:
            s = (self.step() if step is None else step).detach()  # fixed grid here: LSQ's path is lsq_quantize
            if self.bits < 8:
                x = torch.clamp(x, qn * s, qp * s) if self.channels else torch.clamp(x, qn * s.item(), qp * s.item())
            s = s.reshape(-1 if self.channels else ()).float()
            zp = torch.zeros(s.shape, dtype=torch.int32, device=x.device)
        if self.channels:
            return torch.fake_quantize_per_channel_affine(x, s, zp, 0, lo, hi)
        return torch.fake_quantize_per_tensor_affine(x, s, zp, lo, hi)
