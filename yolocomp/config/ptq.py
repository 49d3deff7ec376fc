"""Options of the ``ptq`` stage (post-training quantization with calibration)."""

from __future__ import annotations

from dataclasses import dataclass

from yolocomp.config.options import one_of, option, positive, valid_bits

CALIBRATORS = ("minmax", "percentile", "mse")


def known_calibrator(value: object) -> str | None:
    """None for a calibrator in CALIBRATORS; else the problem (entropy was dropped, and says why)."""
    if value == "entropy":  # TensorRT-style KL calibration, removed: measurements in tools/README.md
        return ("'entropy' was dropped: its KL clip cuts YOLO's activations to about 0.65x their 99.99th percentile "
                "and lost 17 AP at 320")
    return one_of(*CALIBRATORS)(value)


@dataclass
class PtqConfig:
    calibrator: str = option("percentile", "how activation ranges are set from the calibration images",
                             hint="use percentile (the default), mse or minmax", choices=CALIBRATORS,
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
    bias_correction: bool = option(False, "shift each conv's bias so its quantized output channels keep the float "
                                   "means on the calibration images (after reconstruction when both)",
                                   hint="use true or false")
    budget_mb: float | None = option(None, "mixed precision: weight bytes (MB) allowed; the most output-sensitive convs "
                                     "keep 8-bit weights, the rest get 4", check=positive,
                                     hint="use a size in MB between the all-4-bit and all-8-bit weight bytes")
    bits: int = option(8, "bits of weights and activations", hint="use 8 or 4", check=valid_bits)
    weight_bits: int | None = option(None, "weight bits (unset: bits)", hint="use 8 or 4", check=valid_bits)
    act_bits: int | None = option(None, "activation bits (unset: bits)", hint="use 8 or 4", check=valid_bits)
    exclude: list[str] = option([], "layer names or indices kept float", hint="use a list of layer names or indices",
                                metavar="LAYER")
    sensitivity: bool = option(False, "per-layer sensitivity analysis and a suggested mixed-precision plan",
                               hint="use true or false")
    sensitivity_images: int = option(8, "images for the sensitivity analysis", hint="use a number such as 8", check=positive)
    ort: bool = option(False, "also write model_int8_ort.onnx: integer conv+SiLU chains for ONNX Runtime CPU (not for "
                       "TensorRT)", hint="use true to also write the ONNX Runtime integer flavour")
    batch: int = option(8, "calibration batch size", hint="use a batch size such as 8", check=positive)
    layer_bits: dict | None = option(None, "per-layer bits, {layer name: bits or [weight bits, act bits]}", cli=False,
                                     hint="use a mapping such as {model.0.conv: 8}")
    eval_images: int | None = option(None, "evaluate on the first N val images (unset: all)",
                                     hint="use a number of images or null for all", check=positive)

    def bit_widths(self) -> tuple[int, int]:
        return self.weight_bits or self.bits, self.act_bits or self.bits
