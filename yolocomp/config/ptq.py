"""Options of the ``ptq`` stage (post-training quantization with calibration)."""

from __future__ import annotations

from dataclasses import dataclass

from yolocomp.config.options import non_negative, one_of, option, positive, probability, valid_bits

#: ``auto``: meanmax for shifted 8-bit activation grids, percentile for symmetric ones, mse for coarser ones (a 4-bit
#: grid cannot afford the outliers)
CALIBRATORS = ("auto", "minmax", "percentile", "mse", "meanmax")
#: distances of the per-conv sensitivity analysis (``yolocomp.quant.sensitivity.layer_sensitivity``)
SENSITIVITY_METRICS = ("head_kd", "output")


#: QDrop probability of the reconstruction when some activations are below 8 bits; at 8 bits it is off (both measured
#: in tools/README.md: it helped W4A4 and cost W4A8 AP).
LOW_BIT_QDROP = 0.5

#: Adam learning rate of the per-channel weight steps and biases in a reconstruction (tools/README.md)
RECON_AFFINE_LR = 1e-3


def reconstruction_drop(recon_drop: float | None, act_bits: int, layer_bits: dict | None = None) -> float:
    """The QDrop probability a reconstruction uses: ``recon_drop`` as given, else :data:`LOW_BIT_QDROP` when
    ``act_bits`` or an activation width of ``layer_bits`` ({layer: bits or [weight bits, act bits]}) is below 8."""
    if recon_drop is not None:
        return recon_drop
    acts = [act_bits] + [v[-1] if isinstance(v, (tuple, list)) else v for v in (layer_bits or {}).values()]
    return LOW_BIT_QDROP if min(acts) < 8 else 0.0


def edge_bits_option():
    """``edge_bits``, shared by ptq and qat."""
    return option(8, "bits (weights and activations) that the first conv and Detect's output convs keep when the rest "
                  "is quantized below them (4: no exception)", check=valid_bits,
                  hint="use 8 (the default) to keep the first and last convs at 8 bits, or 4 for none")


def recon_drop_option():
    """``recon_drop``, shared by ptq and qat."""
    return option(None, "QDrop during reconstruction: share of activations kept float while each block is fitted "
                  "(unset: 0.5 when activations are below 8 bits, else 0)", check=probability,
                  hint="use a probability such as 0.5, or 0 to turn it off")


def recon_affine_lr_option():
    """``recon_affine_lr``, shared by ptq and qat."""
    return option(RECON_AFFINE_LR, "reconstruction: learning rate of each conv's per-output-channel weight step and "
                  "bias, fitted with the rounding (0: both stay as calibrated)", check=non_negative,
                  hint="use a small rate such as 1e-3, or 0 to turn it off")


def act_offset_option():
    """``act_offset``, shared by ptq and qat."""
    return option(True, "8-bit activations on a shifted grid: only as many levels below zero as the data reaches "
                  "(a few for SiLU outputs) and the rest above, kept in TensorRT's signed INT8 by a constant shift "
                  "that the next conv's bias takes back (--no-act-offset: the symmetric grid)", hint="use true or false")


def known_calibrator(value: object) -> str | None:
    """None for a calibrator in CALIBRATORS; else the problem (entropy was dropped, and says why)."""
    if value == "entropy":  # TensorRT-style KL calibration, removed: measurements in tools/README.md
        return ("'entropy' was dropped: its KL clip cuts YOLO's activations to about 0.65x their 99.99th percentile "
                "and lost 17 AP at 320")
    return one_of(*CALIBRATORS)(value)


@dataclass
class PtqConfig:
    calibrator: str = option("auto", "how activation ranges are set from the calibration images (auto: meanmax "
                             "for 8-bit activations, percentile with --no-act-offset, mse below; meanmax: the mean "
                             "over images of each image's largest value, NNCF's estimator)",
                             hint="use auto (the default), percentile, mse, minmax or meanmax", choices=CALIBRATORS,
                             check=known_calibrator)
    calib_images: int = option(256, "calibration (and reconstruction) images", check=positive,
                               hint="use a number of calibration images such as 256")
    images: str | None = option(None, "calibrate on these images (folder or .txt list, labels not needed) instead of "
                                "the data yaml's train split", hint="give a folder of images or a .txt list of image "
                                "paths; the number used is --calib-images")
    reconstruct: bool = option(False, "learn the weight rounding (AdaRound) and activation step sizes (LSQ) block by "
                               "block against the float model (BRECQ)", hint="use true or false")
    recon_iters: int = option(1000, "reconstruction iterations per block", check=positive,
                              hint="use a number of iterations such as 1000")
    recon_drop: float | None = recon_drop_option()
    recon_affine_lr: float = recon_affine_lr_option()
    bias_correction: bool = option(False, "shift each conv's bias so its quantized output channels keep the float "
                                   "means on the calibration images (not with --reconstruct, whose fit it breaks)",
                                   hint="use true or false")
    budget_mb: float | None = option(None, "mixed precision: weight bytes (MB) allowed; the most output-sensitive convs "
                                     "keep 8-bit weights, the rest get 4", check=positive,
                                     hint="use a size in MB between the all-4-bit and all-8-bit weight bytes")
    bits: int = option(8, "bits of weights and activations", hint="use 8 or 4", check=valid_bits)
    weight_bits: int | None = option(None, "weight bits (unset: bits)", hint="use 8 or 4", check=valid_bits)
    act_bits: int | None = option(None, "activation bits (unset: bits)", hint="use 8 or 4", check=valid_bits)
    edge_bits: int = edge_bits_option()
    act_offset: bool = act_offset_option()
    exclude: list[str] = option([], "layer names or indices kept float", hint="use a list of layer names or indices",
                                metavar="LAYER")
    sensitivity: bool = option(False, "per-layer sensitivity analysis and a suggested mixed-precision plan",
                               hint="use true or false")
    sensitivity_images: int = option(8, "images for the sensitivity analysis", hint="use a number such as 8", check=positive)
    sensitivity_metric: str = option("head_kd", "how far one quantized conv moves the detector: head_kd (class and "
                                     "box-bin divergence of the raw head outputs, weighted by the float model's "
                                     "confidence) or output (relative error of the decoded scores and pixel boxes)",
                                     hint="use head_kd or output", choices=SENSITIVITY_METRICS)
    ort: bool = option(False, "also write model_int8_ort.onnx: integer conv+SiLU chains for ONNX Runtime CPU (not for "
                       "TensorRT)", hint="use true to also write the ONNX Runtime integer flavour")
    batch: int = option(8, "calibration batch size", hint="use a batch size such as 8", check=positive)
    layer_bits: dict | None = option(None, "per-layer bits, {layer name: bits or [weight bits, act bits]}", cli=False,
                                     hint="use a mapping such as {model.0.conv: 8}")
    eval_images: int | None = option(None, "evaluate on the first N val images (unset: all)",
                                     hint="use a number of images or null for all", check=positive)

    def bit_widths(self) -> tuple[int, int]:
        return self.weight_bits or self.bits, self.act_bits or self.bits

    def qdrop(self) -> float:
        return reconstruction_drop(self.recon_drop, self.bit_widths()[1], self.layer_bits)
