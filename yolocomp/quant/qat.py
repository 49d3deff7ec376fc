"""Quantization-aware training as a :class:`yolocomp.methods.Method` (FQN + AQD style, whole detector quantized).

* ``prepare`` swaps every conv (first layer and Detect's final box/class convs included) for a :class:`QConv` with
  BN folded into the quantized weight; idempotent (a resumed checkpoint already holds QConvs).
* ``attach`` calibrates the step sizes (percentile by default: FQN's robust ranges) unless they are already set, then
  restarts the EMA so it starts from the calibrated model. It calibrates on ``calib_images`` train images letterboxed
  exactly like evaluation and deployment (what PTQ does), so the ranges do not depend on the augmentation settings
  (mosaic, HSV, scale) of the training batches. ``calib_images=0`` calibrates on ``calib_batches`` training batches instead.
* training learns the activation step sizes with LSQ (AQD: head included). Weight step sizes are learned below 8 bits;
  at 8 bits (``learn_weight_scales=None``) each channel's range instead follows its current BN-folded weight
  (max-abs, as TensorRT / ModelOpt derive weight scales): from max-abs calibration the largest weight sits on the
  clip boundary, so LSQ's step gradient is large relative to the step and learned 8-bit weight steps become the
  model's sharpest direction (measurements in tools/README.md).
* ``on_epoch_end`` freezes BN statistics after ``freeze_bn_epoch`` epochs (FQN): the folded weights then use fixed
  running statistics, exactly what is deployed. The default ``freeze_bn_epoch=0`` freezes them from the start, right
  for QAT of a converged model, where live BN over a few small batches drifts the statistics; a later freeze is for
  long QAT runs that may re-estimate them.

AQD's multi-level BN exists because RetinaNet/FCOS share one head across pyramid levels, so one BN would see the
statistics of all levels. YOLOv8's Detect has separate convs (and BNs) per level (``cv2[i]``, ``cv3[i]``), i.e. it is
already "multi-level BN": each level's BN is folded into that level's quantized conv.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from yolocomp.methods import Method, without_training_modules
from yolocomp.quant.calibrate import calibrate, is_calibrated
from yolocomp.quant.convert import quantize_model
from yolocomp.quant.modules import quant_convs, quantizers


class QuantizationAwareTraining(Method):
    name = "qat"

    def __init__(self, bits: int = 8, weight_bits: int | None = None, act_bits: int | None = None,
                 exclude: Iterable[str | int] = (), layer_bits: Mapping[str, int | tuple[int, int]] | None = None,
                 calibrator: str = "auto", calib_batches: int = 8, freeze_bn_epoch: int = 0,
                 calib_images: int = 128,
                 learn: bool = True, share: bool = True, learn_weight_scales: bool | None = None,
                 edge_bits: int | None = 8, act_offset: bool = True):
        self.weight_bits = int(weight_bits or bits)
        self.act_bits = int(act_bits or bits)
        self.exclude = list(exclude)
        self.layer_bits = dict(layer_bits or {})
        self.edge_bits = edge_bits
        self.act_offset = act_offset
        self.calibrator = calibrator
        self.calib_batches = calib_batches
        self.calib_images = calib_images
        self.freeze_bn_epoch = freeze_bn_epoch
        self.learn = learn
        self.share = share
        self.learn_weight_scales = learn_weight_scales
        self.summary: dict = {}

    def __repr__(self) -> str:
        return f"QuantizationAwareTraining(W{self.weight_bits}A{self.act_bits}, exclude={self.exclude})"

    def prepare(self, model: nn.Module) -> bool:
        with without_training_modules(model):  # distillation adapters stay float, whatever the method order
            info = quantize_model(model, self.weight_bits, self.act_bits, self.exclude, self.layer_bits, self.share,
                                  self.edge_bits, self.act_offset)
        if not self.learn:
            for q in quantizers(model):
                q.learn = False
                q.scale.requires_grad_(False)
        for conv in quant_convs(model):
            q = conv.weight_quant
            learn_w = self.learn_weight_scales if self.learn_weight_scales is not None else q.bits < 8
            if not (self.learn and learn_w):  # the range follows the weight itself (see the module docstring)
                q.learn = False
                q.scale.requires_grad_(False)
        self.summary = {"quantized": info["quantized"], "excluded": info["excluded"],
                        "edge_layers": info.get("edge_layers", [])}
        return bool(info["changed"])

    def attach(self, trainer: Any) -> None:
        from yolocomp.integration import unwrap
        from yolocomp.integration.access import restart_ema, training_images

        model = unwrap(trainer.model)
        if self.freeze_bn_epoch <= 0:
            freeze_bn(model)  # FQN with frozen BN from the start: the right choice for very short fine-tunes
        if is_calibrated(model):
            return
        device = next(model.parameters()).device
        paths = _calibration_paths(trainer, self.calib_images)
        if paths:
            from yolocomp.quant.calibrate import image_batches

            batches = image_batches(paths, int(trainer.args.imgsz), 8)
        else:
            batches = training_images(trainer, self.calib_batches)
        calibrate(model, batches, self.calibrator, device=device)
        restart_ema(trainer)  # the old EMA copy predates calibration (quantizer signs are not in the state dict)

    def on_epoch_end(self, trainer: Any) -> None:
        if trainer.epoch + 1 >= self.freeze_bn_epoch:
            from yolocomp.integration import unwrap
            from yolocomp.integration.access import ema_model

            freeze_bn(unwrap(trainer.model))
            ema = ema_model(trainer)
            if ema is not None:
                freeze_bn(ema)


def freeze_bn(model: nn.Module) -> int:
    """Stop BN statistics updates in every QConv (FQN); returns how many were newly frozen."""
    n = 0
    for conv in quant_convs(model):
        if conv.bn is not None and not conv.bn_frozen:
            conv.bn_frozen = True
            n += 1
    return n


def _calibration_paths(trainer: Any, images: int) -> list:
    """Up to ``images`` train images of the trainer's data set ([] when ``images`` is 0 or none are found)."""
    from yolocomp.integration.access import dataset_config
    from yolocomp.quant.calibrate import split_images

    data = dataset_config(trainer)
    if images <= 0 or data is None:
        return []
    try:
        return split_images(data, "train", images)
    except OSError:
        return []


__all__ = ["QuantizationAwareTraining", "freeze_bn"]
