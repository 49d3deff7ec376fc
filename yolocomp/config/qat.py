"""Options of the ``qat`` stage, and the training settings a short QAT of a converged detector needs.

Why these defaults (the measurements are in tools/README.md): self-distillation from the float model instead of the
label loss; SGD, because Ultralytics' ``auto`` picks AdamW for short runs, whose per-parameter steps move every
weight, BN parameter and step size at once; lr0 1e-4, because Ultralytics clips the gradient norm to 10 and a
detector's norm is far above that, so each SGD step has norm lr0·10; no warm-up, which would ramp the bias lr far
above a fine-tune's; a larger lr0 below 8 bits, where the model starts far from its float outputs; BN frozen from
the start so the folded weights keep the float statistics. From a reconstructed start (learned rounding and step
sizes, already close to the float outputs) the fine-tune is gentler: block KD (every layer's output error, not only
the head's), lr0 1e-4 at any bit width, and no mosaic, so training sees whole letterboxed images as evaluation does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from yolocomp.config.options import at_least, non_negative, option, positive, valid_bits, valid_ratio
from yolocomp.config.ptq import (
    CALIBRATORS,
    act_offset_option,
    edge_bits_option,
    known_calibrator,
    recon_affine_lr_option,
    recon_drop_option,
    reconstruction_drop,
)
from yolocomp.config.train import TrainingOptions

QAT_TRAIN_DEFAULTS: dict[str, Any] = {"optimizer": "SGD", "lr0": 1e-4, "warmup_epochs": 0}
#: lr0 when any layer has fewer than 8 bits.
QAT_LOW_BIT_LR0 = 1e-3


#: what a reconstructed start changes in :data:`QAT_TRAIN_DEFAULTS`: no mosaic (lr0 stays 1e-4 at any bit width)
QAT_RECONSTRUCTED_DEFAULTS: dict[str, Any] = {"mosaic": 0.0, "close_mosaic": 0}
#: distillation methods of ``kd_method`` (``auto``: block from a reconstructed start, else logit)
QAT_KD_METHODS = ("auto", "block", "logit")


def qat_train_defaults(weight_bits: int = 8, act_bits: int = 8, layer_bits: dict | None = None,
                       reconstructed: bool = False) -> dict[str, Any]:
    """The Ultralytics settings ``qat`` uses unless given: :data:`QAT_TRAIN_DEFAULTS`; from a ``reconstructed``
    start also :data:`QAT_RECONSTRUCTED_DEFAULTS`, otherwise lr0 :data:`QAT_LOW_BIT_LR0` when the weights,
    activations or any ``layer_bits`` entry use fewer than 8 bits."""
    if reconstructed:
        return {**QAT_TRAIN_DEFAULTS, **QAT_RECONSTRUCTED_DEFAULTS}
    return {**QAT_TRAIN_DEFAULTS, **({"lr0": QAT_LOW_BIT_LR0} if min(used_bits(weight_bits, act_bits, layer_bits)) < 8
                                     else {})}


def used_bits(weight_bits: int, act_bits: int, layer_bits: dict | None = None) -> list[int]:
    """Every bit width a quantization uses: the defaults and each ``layer_bits`` entry."""
    used = [weight_bits, act_bits]
    for v in (layer_bits or {}).values():
        used += list(v) if isinstance(v, (tuple, list)) else [v]
    return used


@dataclass
class QatConfig(TrainingOptions):
    bits: int = option(8, "bits of weights and activations", hint="use 8 or 4", check=valid_bits)
    weight_bits: int | None = option(None, "weight bits (unset: bits)", hint="use 8 or 4", check=valid_bits)
    act_bits: int | None = option(None, "activation bits (unset: bits)", hint="use 8 or 4", check=valid_bits)
    epochs: int = option(1, "training epochs", hint="use a whole number of epochs such as 3", check=at_least(1))
    export: bool = option(True, "also write the Q/DQ ONNX", hint="use true or false")
    exclude: list[str] = option([], "layer names or indices kept float", hint="use a list of layer names or indices",
                                metavar="LAYER")
    teacher: str | None = option("self", "'self' distils from the float input model, a .pt from that model; null trains "
                                 "on the labels only", hint="use self, a teacher checkpoint path, or null")
    kd_method: str = option("auto", "distillation from the teacher: block (every layer's output + head outputs) or "
                            "logit (head outputs); auto: block from a reconstructed or quantized start, else logit",
                            hint="use auto, block or logit", choices=QAT_KD_METHODS)
    label_loss: bool | None = option(None, "keep the detection loss on the labels (unset: off with teacher 'self')",
                                     hint="use true or false")
    images: str | None = option(None, "unlabelled images (folder or .txt list) to train on beside --data; the teacher "
                                "supplies their targets", hint="give a folder of images or a .txt list of image paths")
    label_free: bool = option(False, "train on --images alone: no labels at all (the data yaml only measures AP)",
                              hint="use true with images")
    pseudo_conf: float | None = option(None, "teacher detections above this confidence become labels of the unlabelled "
                                       "images (unset: no pseudo-labels)", hint="use a confidence such as 0.5",
                                       check=valid_ratio)
    calibrator: str = option("auto", "range calibration before training (auto: meanmax for 8-bit activations, "
                             "mse below)", choices=CALIBRATORS, check=known_calibrator,
                             hint="use auto (the default), percentile, mse, minmax or meanmax")
    calib_images: int = option(128, "calibration images", hint="use a number of images such as 128", check=positive)
    reconstruct: bool | None = option(None, "start from block-reconstruction PTQ (AdaRound + LSQ against the float "
                                      "model) instead of plain calibration (unset: on below 8 bits)",
                                      hint="use true or false")
    recon_iters: int = option(300, "reconstruction iterations per block", check=positive,
                              hint="use a number of iterations such as 300")
    recon_drop: float | None = recon_drop_option()
    recon_affine_lr: float = recon_affine_lr_option()
    freeze_bn_epoch: int = option(0, "epoch from which BN statistics are frozen (0 = from the start)",
                                  hint="use 0 to freeze BN from the start", check=non_negative)
    edge_bits: int = edge_bits_option()
    act_offset: bool = act_offset_option()
    layer_bits: dict | None = option(None, "per-layer bits, {layer name: bits or [weight bits, act bits]}", cli=False,
                                     hint="use a mapping such as {model.0.conv: 8}")
    eval_images: int | None = option(None, "evaluate on the first N val images (unset: all)",
                                     hint="use a number of images or null for all", check=positive)

    def bit_widths(self) -> tuple[int, int]:
        return self.weight_bits or self.bits, self.act_bits or self.bits

    def qdrop(self) -> float:
        return reconstruction_drop(self.recon_drop, self.bit_widths()[1], self.layer_bits)

    def distillation(self, reconstructed: bool) -> str:
        """The ``kd_method`` in use: as set, else block from a ``reconstructed`` start and logit otherwise."""
        if self.kd_method != "auto":
            return self.kd_method
        return "block" if reconstructed else "logit"

    def reconstruct_first(self) -> bool:
        """Whether the model starts from block-reconstruction PTQ: as set, else whenever any layer is below 8 bits."""
        if self.reconstruct is not None:
            return self.reconstruct
        return min(used_bits(*self.bit_widths(), self.layer_bits)) < 8
