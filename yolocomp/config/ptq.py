"""Options of the ``ptq`` stage (post-training quantization with calibration)."""

from __future__ import annotations

from dataclasses import dataclass

from yolocomp.config.options import option, positive, valid_bits

CALIBRATORS = ("minmax", "percentile", "entropy", "mse")


@dataclass
class PtqConfig:
    calibrator: str = option("percentile", "how activation ranges are set from the calibration images",
                             hint="use minmax, percentile, entropy or mse", choices=CALIBRATORS)
    images: int = option(256, "calibration images", hint="use a number of calibration images such as 256", check=positive)
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
